"""docs/reproduce.md cannot rot: every Table 1/2 command in it runs end to end, with tiny
overrides (one seed, one epoch of one batch of 4 images, CPU), on fake CIFAR files in torchvision's
layout, and writes its tables; the paper's numbers quoted beside each command match the doc's
copy of the paper's tables."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from binslt import cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproduce.md"
#: What the overrides change: every option the recipe gives keeps its value, except these.
TINY = ["--seeds", "0", "--epochs", "1", "--train-subset", "4", "--test-subset", "2",
        "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-progress"]
TABLES = {"Table 1": "cifar10", "Table 2": "cifar100"}
EXPECTED = {("conv4", "cifar10"), ("vgg9", "cifar10"), ("vgg11", "cifar10"),
            ("resnet19", "cifar10"), ("vgg11", "cifar100"), ("resnet19", "cifar100")}


def recipe() -> list[tuple[str, str, str]]:
    """``(section, command, comment)`` for every ``binslt`` line of the ``bash`` blocks under the
    "## Table 1" / "## Table 2" headings."""
    out, section, in_bash = [], None, False
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = next((t for t in TABLES if line[3:].startswith(t)), None)
        elif line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
        elif in_bash and section and line.startswith("binslt "):
            cmd, _, comment = line.partition("#")
            out.append((section, cmd.strip(), comment.strip()))
    return out


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_recipe_covers_both_tables():
    cmds = recipe()
    got = set()
    for section, cmd, _ in cmds:
        argv = shlex.split(cmd)
        assert argv[:2] == ["binslt", "compare"], cmd
        assert _option(argv, "--dataset") == TABLES[section], cmd
        assert _option(argv, "--seeds") == "0,1,2" and _option(argv, "--device") == "cuda", cmd
        got.add((_option(argv, "--arch"), _option(argv, "--dataset")))
    assert got == EXPECTED and len(cmds) == len(EXPECTED)


def test_quoted_paper_numbers_match_the_docs_tables():
    lines = DOC.read_text().splitlines()
    names = {"conv4": "Conv-4", "vgg9": "VGG-9", "vgg11": "VGG-11", "resnet19": "ResNet-19"}
    for section, cmd, comment in recipe():
        argv = shlex.split(cmd)
        quoted = dict(re.findall(r"(BinW-SLT|BNN-BinAct|SNN|ANN) (\d+\.\d+)", comment))
        assert set(quoted) == {"BinW-SLT", "BNN-BinAct", "SNN", "ANN"}, comment
        # the network's row(s) in the section's table: one in Table 1, one per method in Table 2
        start = lines.index(next(x for x in lines if x.startswith(f"## {section}")))
        first = next(i for i in range(start, len(lines))
                     if lines[i].startswith(f"| {names[_option(argv, '--arch')]} ("))
        rows = lines[first: first + (1 if section == "Table 1" else 4)]
        for method, value in quoted.items():
            cells = rows[0] if section == "Table 1" else next(
                r for r in rows if r.split("|")[2].strip() == method)
            assert value in cells, (cmd, method, value)


@pytest.fixture
def fake_cifar_root(tmp_path, monkeypatch):
    """CIFAR-10 and CIFAR-100 in torchvision's extracted layout, 15-16 training and 8 test images
    each (the md5 checks patched out, as in tests/test_data.py: the real archives cannot be
    fetched here)."""
    import torchvision.datasets.cifar as tvc
    from helpers import fake_cifar

    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    for name in ("cifar10", "cifar100"):
        fake_cifar(tmp_path / "data", name, 15 if name == "cifar10" else 16, 8, 100)
    return tmp_path / "data"


@pytest.mark.slow
@pytest.mark.parametrize("section, cmd, comment", recipe(),
                         ids=[f"{s.split()[1]}-{shlex.split(c)[3]}" for s, c, _ in recipe()])
def test_recipe_command_runs_onfake_cifar(section, cmd, comment, fake_cifar_root, tmp_path):
    argv = [a.replace("$DATA", str(fake_cifar_root)) for a in shlex.split(cmd)[1:]]
    out = tmp_path / "out"
    assert cli.main([*argv, *TINY, "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in rows] == ["ANN", "SNN", "BNN-BinAct", "BinW-SLT",
                                          "BinW-SLT (T=1)"]
    assert all(r["arch"] == _option(argv, "--arch") and r["prune_rate"] == 0.4 for r in rows)
    assert {r["dataset"] for r in rows} == {TABLES[section]}
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0] and len(res["runs"]) == 5
    md = (out / "compare.md").read_text()
    assert "mean ± std" in md and "BinW-SLT - BNN-BinAct" in md
