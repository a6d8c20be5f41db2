"""DistributedDataParallel on GPUs: ``torchrun -m binslt search`` with the nccl backend.

One process per visible GPU (``--nproc_per_node=1`` on a one-GPU machine, which still joins an
nccl process group under torchrun) against the same configuration in a plain single process.
The tolerance is the gloo test's (tests/test_cli.py): best epoch and the mean of the last three
epochs within 1 point. With one rank the two runs see identical batches and BatchNorm statistics,
so they differ only by float reduction order.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.gpu


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _last3(run: Path) -> float:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return sum(float(r["test_acc"]) for r in rows[-3:]) / 3


def _search(tmp_path, name: str, opts: list[str], nproc: int | None) -> dict:
    """``binslt search`` (under torchrun with ``nproc`` processes unless None); results.json."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
    r = subprocess.run([*launch, "-m", "binslt", "search", *opts, "--out", str(tmp_path / name)],
                       env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / name / "results.json").read_text())


def test_torchrun_nccl_short(tmp_path):
    """One epoch on a 512-image training subset: the nccl group forms, the epoch trains, and
    with one rank the accuracy equals the single-process run's within 1 point."""
    nproc = min(torch.cuda.device_count(), 2)
    opts = ["--epochs", "1", "--batch-size", "32", "--device", "cuda", "--no-progress",
            "--train-subset", "512"]
    ddp = _search(tmp_path, "ddp", opts, nproc)
    assert ddp["world_size"] == nproc and ddp["dist_backend"] == "nccl", ddp
    assert ddp["device"].startswith("cuda")
    assert ddp["epochs"] == 1
    if nproc == 1:
        one = _search(tmp_path, "one", opts, None)
        assert one["world_size"] == 1 and one["dist_backend"] is None, one
        assert abs(ddp["test_acc"] - one["test_acc"]) <= 1.0, (ddp, one)


@pytest.mark.slow
def test_torchrun_nccl_matches_single_process(tmp_path):
    nproc = min(torch.cuda.device_count(), 2)
    opts = ["--epochs", "10", "--batch-size", "32", "--device", "cuda", "--no-progress"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", "-m", "binslt", "search", *opts,
         "--out", str(tmp_path / "ddp")],
        env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = subprocess.run([sys.executable, "-m", "binslt", "search", *opts, "--out",
                         str(tmp_path / "one")], env=_env(), capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
    assert r1.returncode == 0, r1.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert ddp["world_size"] == nproc and ddp["dist_backend"] == "nccl", ddp
    assert one["world_size"] == 1 and one["dist_backend"] is None, one
    assert ddp["device"].startswith("cuda") and one["device"].startswith("cuda")
    assert ddp["test_acc"] > 95.0 and one["test_acc"] > 95.0
    assert abs(ddp["best_test_acc"] - one["best_test_acc"]) <= 1.0, (ddp, one)
    last3 = {d: _last3(tmp_path / d) for d in ("ddp", "one")}
    assert abs(last3["ddp"] - last3["one"]) <= 1.0, last3
