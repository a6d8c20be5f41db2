"""``binslt search --early-time``: Kim et al.'s early-time tickets adapted to the score search.

The KL divergences are checked by hand on a toy model whose per-timestep outputs are fixed, the
rule on hand-made divergences, and a tiny run for where it runs at T' and where at T (every
evaluation, the last epochs, the ticket, a finetune from it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binslt import cli
from binslt.training import loop as train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-subset", "96", "--test-subset", "48", "--batch-size", "32", "--epochs", "2",
        "--no-progress"]
EARLY = ["--early-time", "--early-time-threshold", "1.0", "--early-time-tune-epochs", "1"]


class Toy(nn.Module):
    """Per-timestep logits fixed in advance: the output at T is their mean over the first T."""

    def __init__(self, steps: torch.Tensor):
        super().__init__()
        self.register_buffer("steps", steps)  # [T_max, N, classes]
        self.timesteps = steps.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps[: self.timesteps].mean(0) + 0 * x.sum()


def _kl_by_hand(p_logits: list[float], q_logits: list[float]) -> float:
    zp = sum(math.exp(v) for v in p_logits)
    zq = sum(math.exp(v) for v in q_logits)
    p = [math.exp(v) / zp for v in p_logits]
    q = [math.exp(v) / zq for v in q_logits]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_divergences_by_hand_on_a_toy_model():
    steps = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
                          [[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]],
                          [[1.0, 1.0, 1.0], [0.5, 0.0, 0.0]],
                          [[-1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]])
    model = Toy(steps)
    model.eval()
    div = train.early_time_divergences(model, torch.zeros(2, 1), 4)
    assert sorted(div) == [1, 2, 3]
    s = steps.tolist()
    for t in (1, 2, 3):
        want = 0.0
        for n in range(2):
            full = [sum(s[k][n][c] for k in range(4)) / 4 for c in range(3)]
            part = [sum(s[k][n][c] for k in range(t)) / t for c in range(3)]
            want += _kl_by_hand(full, part) / 2  # mean over the batch
        # the model's outputs are float32 (their mean over T rounds at ~6e-8); the KL of them
        # is float64
        assert div[t] == pytest.approx(want, rel=1e-6), t
    # the model itself is left as it was
    assert model.timesteps == 4 and not model.training


def test_divergences_leave_a_real_network_untouched():
    cfg = train.RunConfig(train_subset=64)
    torch.manual_seed(0)
    model = train.build_model(cfg, 10, 1, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 8, 8)
    div = train.early_time_divergences(model, x, 4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert model.timesteps == 4
    # the same numbers from the network run at each T' in training mode, KL by torch
    import copy

    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        out = {}
        for t in (1, 2, 3, 4):
            probe.timesteps = t
            out[t] = F.log_softmax(probe(x).double(), 1)
    for t in (1, 2, 3):
        want = F.kl_div(out[t], out[4], log_target=True, reduction="batchmean").item()
        assert div[t] == pytest.approx(want, rel=1e-9), t
        assert div[t] >= 0


def test_selection_rule():
    # normalised by the largest: 1, 0.7, 0.2 -> the smallest under 0.6 is T'=3
    t, norm = train.select_early_time({1: 0.5, 2: 0.35, 3: 0.1}, 4, 0.6)
    assert t == 3 and norm == pytest.approx({1: 1.0, 2: 0.7, 3: 0.2})
    assert train.select_early_time({1: 0.5, 2: 0.2, 3: 0.1}, 4, 0.6)[0] == 2
    # the largest normalises to 1: under no threshold <= 1, so it is never chosen by it
    assert train.select_early_time({1: 0.5, 2: 0.5}, 3, 1.0)[0] == 3
    # none under the threshold: search at T itself
    assert train.select_early_time({1: 0.5, 2: 0.3, 3: 0.1}, 4, 0.1)[0] == 4
    # no divergence anywhere: every T' normalises to 0, the smallest wins
    t, norm = train.select_early_time({1: 0.0, 2: 0.0}, 3, 0.6)
    assert t == 1 and norm == {1: 0.0, 2: 0.0}


@pytest.fixture(scope="module")
def early_run(tmp_path_factory, request) -> tuple[Path, dict[str, list[int]]]:
    """A tiny early-time search (2 epochs, the last at T), recording the T of every training
    epoch and every evaluation."""
    seen: dict[str, list[int]] = {"train": [], "eval": []}
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    real_epoch, real_eval = train.train_one_epoch, train.evaluate

    def epoch(net, *a, **kw):
        seen["train"].append(net.timesteps)
        return real_epoch(net, *a, **kw)

    def evaluate(model, *a, **kw):
        seen["eval"].append(model.timesteps)
        return real_eval(model, *a, **kw)

    mp.setattr(train, "train_one_epoch", epoch)
    mp.setattr(train, "evaluate", evaluate)
    out = tmp_path_factory.mktemp("early") / "run"
    assert cli.main(["search", *TINY, *EARLY, "--out", str(out)]) == 0
    mp.undo()
    return out, seen


def test_run_searches_at_t_prime_and_evaluates_at_t(early_run):
    out, seen = early_run
    res = json.loads((out / "results.json").read_text())
    et = res["early_time"]
    kl = {int(t): v for t, v in et["kl"].items()}
    t_prime, norm = train.select_early_time(kl, 4, 1.0)
    assert et["T"] == 4 and et["T_prime"] == t_prime and sorted(kl) == [1, 2, 3]
    assert {int(t): v for t, v in et["normalised"].items()} == pytest.approx(norm)
    assert t_prime < 4  # with threshold 1.0 only the largest divergence is excluded
    assert et["search_epochs"] == 1 and et["tune_epochs"] == 1 and et["threshold"] == 1.0
    assert seen["train"] == [t_prime, 4]  # search at T', the last epoch at T
    assert seen["eval"] == [4, 4]  # every evaluation at T
    assert res["config"]["early_time"] is True and res["config"]["timesteps"] == 4
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["build_config"]["timesteps"] == 4
    # the ticket is the network at the full T
    from binslt.io import tickets

    model = tickets.load_ticket(out / "ticket.safetensors")
    assert model.timesteps == 4
    assert et["search_train_time_s"] > 0 and et["tune_train_time_s"] > 0


def test_finetune_of_an_early_time_ticket_runs_at_t(early_run, tmp_path, monkeypatch):
    out, _ = early_run
    seen = []
    real_epoch = train.train_one_epoch

    def epoch(net, *a, **kw):
        seen.append(net.timesteps)
        return real_epoch(net, *a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", epoch)
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--from", str(out), "--epochs", "1", "--out", str(ft),
                     "--no-progress"]) == 0
    res = json.loads((ft / "results.json").read_text())
    assert seen == [4] and res["config"]["early_time"] is False and "early_time" not in res


def test_resumed_early_time_run_is_the_uninterrupted_one(early_run, tmp_path):
    ref, _ = early_run
    out = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "binslt", "search", *TINY, *EARLY, "--out",
                        str(out), "--_crash-after-batches", "2:1"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 17, p.stdout + p.stderr
    assert cli.main(["search", *TINY, *EARLY, "--out", str(out), "--resume"]) == 0
    a = torch.load(ref / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert ra["early_time"]["kl"] == rb["early_time"]["kl"]
    assert ra["test_acc"] == rb["test_acc"]


@pytest.mark.parametrize("extra, msg", [
    (["-T", "1"], "--early-time needs T >= 2"),
    (["--early-time-threshold", "0"], "--early-time-threshold"),
    (["--early-time-tune-epochs", "2"], "--early-time-tune-epochs must be in [0, epochs=2)"),
])
def test_bad_early_time_options(tmp_path, capsys, extra, msg):
    assert cli.main(["search", *TINY, "--early-time", *extra, "--out", str(tmp_path / "r")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
