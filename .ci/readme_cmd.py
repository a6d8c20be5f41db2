"""Print a command block of README.md marked with <!-- ci:NAME --> (the line before its fence).

.ci/run executes these blocks word for word, so the README's commands are what CI tests.
"""

import pathlib
import sys

name = sys.argv[1]
lines = pathlib.Path(__file__).resolve().parent.parent.joinpath("README.md").read_text().splitlines()
marker = f"<!-- ci:{name} -->"
try:
    i = lines.index(marker)
except ValueError:
    sys.exit(f"README.md has no {marker} block")
if not lines[i + 1].startswith("```"):
    sys.exit(f"{marker} must be followed by a fenced code block")
body = []
for line in lines[i + 2:]:
    if line.startswith("```"):
        break
    body.append(line)
print("\n".join(body))
