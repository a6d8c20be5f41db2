"""``python -m binslt.cli ...`` (the same as ``python -m binslt``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
