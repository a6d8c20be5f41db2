#!/usr/bin/env python
"""The default ``binslt search`` end to end, at several builds of binslt, rounds interleaved.

The command a new user runs first, ``binslt search --out DIR --no-progress`` (Conv-4 on
scikit-learn digits, 30 epochs, batch 64, T=4, binslt's default threads), timed as a whole
process at each candidate build:

* ``--checkout NAME=DIR``: the binslt source tree in DIR, its extension already built in place
  (``pip install -e .`` or ``python setup.py build_ext --inplace``); ``--checkout here=.`` is
  this one;
* ``--commit REV``: the git revision REV of this repository, checked out into a worktree under
  ``--work`` and its CPU extension built there once (``BINSLT_CUDA=0 python setup.py build_ext
  --inplace``, ``MAX_JOBS`` as set; minutes per revision); a later call finds it built.

Each round runs every candidate once, in the order given on the command line, so that load on
a shared machine hits them alike: ``python -m binslt search --out TMP --no-progress
[--search-args]`` with the working directory and ``PYTHONPATH`` at the candidate's tree (checked
first: the child imports binslt from there, not from an installed copy). Per run: ``wall_s``
(the process from start to exit, start-up included), ``search_s`` (the run's own
``wall_time_s`` in ``results.json``), ``s_per_epoch``, ``user_s`` / ``sys_s`` /
``minor_faults`` (the child's CPU time and minor page faults, ``getrusage``: steadier than wall
time on a shared machine), ``test_acc``, ``best_test_acc``. The rows are appended as measured;
the table printed at the end has each candidate's medians and its ratio to the first
candidate's (``speedup`` > 1: faster). The worktrees stay for later calls (``git worktree
remove DIR`` drops one).

    python benchmarks/default_search.py --commit 530819f --checkout new=. --rounds 3
    python benchmarks/default_search.py --checkout a=/tmp/a --checkout b=. \\
        --search-args "--epochs 2" --rounds 1 --tag smoke

Writes ``<out>/default_search_<cpu slug>[_<tag>].csv`` (the machine record in its header).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    ROOT,
    CsvAppender,
    command_line,
    machine_info,
    print_table,
    result_stem,
)

COLUMNS = ["round", "candidate", "commit", "wall_s", "search_s", "s_per_epoch", "user_s",
           "sys_s", "minor_faults", "test_acc", "best_test_acc"]
SUMMARY = ["candidate", "commit", "runs", "wall_s", "search_s", "s_per_epoch", "user_s", "sys_s",
           "minor_faults", "speedup", "test_acc"]


class BenchError(Exception):
    """A candidate that cannot be run (one line, exit 2)."""


def _git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip()


def _commit_of(tree: Path) -> str:
    try:
        sha = _git("rev-parse", "--short=12", "HEAD", cwd=tree)
        dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=tree)
    except BenchError:
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("BINSLT_DEBUG", None)
    return env


def _check_imports_from(tree: Path) -> None:
    """The child at ``tree`` must import binslt from ``tree`` with its CPU extension built."""
    probe = ("import binslt, binslt.ops.library as L; print(binslt.__file__); "
             "print(L.module('cpu') is not None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=_env(tree),
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"{tree}: importing binslt failed: "
                         f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    where, built = out.stdout.split()[-2:]
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise BenchError(f"{tree}: the child imported binslt from {where}, not from this tree")
    if built != "True":
        raise BenchError(f"{tree}: binslt's CPU extension is not built there (run "
                         "'BINSLT_CUDA=0 python setup.py build_ext --inplace' in it)")


def _worktree(rev: str, work: Path) -> Path:
    """A worktree of ``rev`` under ``work`` with its CPU extension built (once)."""
    sha = _git("rev-parse", "--verify", "--short=12", f"{rev}^{{commit}}")
    tree = work / sha
    if not (tree / ".git").exists():
        work.mkdir(parents=True, exist_ok=True)
        _git("worktree", "add", "--detach", "--force", str(tree), sha)
    stamp = tree / ".default_search_built"
    if not stamp.exists():
        print(f"building {sha}'s CPU extension in {tree} ...", flush=True)
        env = {**os.environ, "BINSLT_CUDA": "0"}
        out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["?"])[-1]
            raise BenchError(f"building {sha} in {tree} failed: {tail}")
        stamp.write_text(sha + "\n")
    return tree


def run_once(tree: Path, search_args: list[str]) -> dict[str, float]:
    """One ``binslt search`` process at ``tree``: its wall time and its results.json figures."""
    with tempfile.TemporaryDirectory(prefix="default_search_") as tmp:
        out_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "binslt", "search", "--out", str(out_dir), "--no-progress",
               *search_args]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["?"])[-1]
            raise BenchError(f"{tree}: binslt search exited {out.returncode}: {tail}")
        res = json.loads((out_dir / "results.json").read_text())
    return {"wall_s": wall, "search_s": res["wall_time_s"],
            "s_per_epoch": res["mean_epoch_time_s"], "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "test_acc": res["test_acc"], "best_test_acc": res["best_test_acc"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Each candidate's medians, and the first candidate's median wall time over its own."""
    out = []
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        med = {k: statistics.median(r[k] for r in mine)
               for k in ("wall_s", "search_s", "s_per_epoch", "user_s", "sys_s", "minor_faults",
                         "test_acc")}
        out.append({"candidate": name, "commit": mine[0]["commit"], "runs": len(mine), **med})
    for s in out:
        s["speedup"] = out[0]["wall_s"] / s["wall_s"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Both kinds go to one list, in the order given on the command line (the rounds' order).
    p.add_argument("--checkout", dest="cands", action="append", default=[], metavar="NAME=DIR",
                   type=lambda v: ("checkout", v),
                   help="a binslt tree with its extension built (repeatable)")
    p.add_argument("--commit", dest="cands", action="append", metavar="REV",
                   type=lambda v: ("commit", v),
                   help="a revision of this repository, built in a worktree (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--search-args", default="",
                   help="more arguments for binslt search (one shell-quoted string)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "binslt_default_search"),
                   help="where --commit worktrees are made (default %(default)s)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default %(default)s)")
    p.add_argument("--tag", default="", help="suffix for the CSV name")
    args = p.parse_args(argv)
    if not args.cands:
        p.error("name at least one candidate (--checkout NAME=DIR or --commit REV)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def candidates(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(name, tree) in the order given on the command line."""
    out = []
    for kind, spec in args.cands:
        if kind == "commit":
            out.append((spec, _worktree(spec, Path(args.work))))
            continue
        name, sep, where = spec.partition("=")
        tree = Path(where).expanduser()
        if not sep or not name or not where:
            raise BenchError(f"--checkout {spec!r}: expected NAME=DIR")
        if not (tree / "binslt" / "__init__.py").is_file():
            raise BenchError(f"--checkout {spec}: {tree} holds no binslt source tree")
        out.append((name, tree.resolve()))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise BenchError(f"candidate names must differ, got {names}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sink, rows = None, []
    try:
        cands = candidates(args)
        for _, tree in cands:
            _check_imports_from(tree)
        search_args = shlex.split(args.search_args)
        meta = machine_info(torch.device("cpu"))
        meta.pop("torch_threads", None)  # the children's: binslt's default for the command
        meta["git_commit"] = "; ".join(f"{n}: {_commit_of(t)}" for n, t in cands)
        meta["search"] = "binslt search --out TMP --no-progress " + args.search_args
        meta["command"] = command_line(argv)
        stem = result_stem("default_search", torch.device("cpu"), args.tag)
        path = Path(args.out) / f"{stem}.csv"
        sink = CsvAppender(path, COLUMNS, meta)
        for r in range(1, args.rounds + 1):
            for name, tree in cands:
                row = {"round": r, "candidate": name, "commit": _commit_of(tree),
                       **run_once(tree, search_args)}
                print(f"round {r} {name}: {row['wall_s']:.1f} s (search {row['search_s']:.1f} s,"
                      f" {row['test_acc']:.2f} %)", flush=True)
                rows.append(row)
                sink.add([row])
        sink.finish(rows, meta)
    except BenchError as exc:
        print(f"default_search: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"; the {len(rows)} finished runs are in {path}" if sink is not None else ""
        print(f"default_search: interrupted{kept}", file=sys.stderr)
        return 130
    print_table(summarise(rows), SUMMARY)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
