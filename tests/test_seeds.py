"""Seeds in ``binslt sweep`` and ``binslt compare``: per-seed runs, their mean and sample std
checked by hand against each run's results.json, paired t intervals, resumption in the middle of a
multi-seed sweep, and that one seed means the same initial weights and batch order for every
method that is paired."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from binslt import cli
from binslt.cli import sweep
from binslt.training import loop as train
from binslt.training import stats

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-subset", "96", "--test-subset", "48", "--batch-size", "32", "--epochs", "1",
        "--no-progress"]
#: Two grid points (the default point and prune rate 0.3) of BinW-SLT alone.
GRID = ["--methods", "binwslt", "--prune-rates", "0.3", "--timesteps-list", "none",
        "--decays", "none"]
POINTS = ("binwslt-conv4-p0.5-T4-l0.99", "binwslt-conv4-p0.3-T4-l0.99")
#: Columns of sweep.csv that depend on the machine's load, not on the computation.
TIMING = ("wall_time_s", "mean_epoch_time_s", "dir")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


#: Student t quantiles in closed form: df=1 is Cauchy, tan(pi (p - 1/2)); df=2 is
#: (2p - 1) / sqrt(2 p (1 - p)). At p = 0.975 (two-sided 95 %): 12.706 and 4.303.
T975_DF1 = math.tan(math.pi * (0.975 - 0.5))
T975_DF2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)


def _hand_mean_std(vals: list[float]) -> tuple[float, float]:
    n = len(vals)
    mean = sum(vals) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))


# ---------------------------------------------------------------------------------------------
# binslt.stats
# ---------------------------------------------------------------------------------------------


def test_mean_std_is_the_sample_std():
    mean, sd = stats.mean_std([97.0, 98.0, 100.0])
    assert mean == pytest.approx(295.0 / 3)
    # deviations -4/3, -1/3, +5/3: squares sum to 42/9; divided by n - 1 = 2
    assert sd == pytest.approx(math.sqrt(42.0 / 9.0 / 2.0))
    assert stats.mean_std([5.0]) == (5.0, None)
    with pytest.raises(ValueError):
        stats.mean_std([])


def test_paired_difference_by_hand():
    a = {0: 99.0, 1: 98.5, 2: 99.5, 7: 50.0}  # seed 7 has no partner: not used
    b = {0: 98.0, 1: 98.0, 2: 97.5}
    d = stats.paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2] and d["diffs"] == [1.0, 0.5, 2.0]
    mean, sd = 3.5 / 3, math.sqrt(((1 - 3.5 / 3) ** 2 + (0.5 - 3.5 / 3) ** 2
                                   + (2 - 3.5 / 3) ** 2) / 2)
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert d["t"] == pytest.approx(T975_DF2, rel=1e-9)
    half = T975_DF2 * sd / math.sqrt(3)
    assert d["ci_low"] == pytest.approx(mean - half) and d["ci_high"] == pytest.approx(mean + half)
    one = stats.paired_difference({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and one["ci_low"] is None and one["std"] is None
    assert stats.t_quantile(0.975, 1) == pytest.approx(T975_DF1, rel=1e-9)
    with pytest.raises(ValueError):
        stats.paired_difference({0: 1.0}, {1: 1.0})


def test_aggregate_rejects_a_seed_counted_twice():
    rows = [{"k": 1, "seed": 0, "v": 1.0}, {"k": 1, "seed": 0, "v": 2.0}]
    with pytest.raises(ValueError, match="seed counted twice"):
        stats.aggregate(rows, ["k"], ["v"])


# ---------------------------------------------------------------------------------------------
# sweep --seeds
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_seed_sweep(tmp_path_factory) -> Path:
    """The tiny grid (two points) with seeds 0 and 1, one epoch, uninterrupted."""
    out = tmp_path_factory.mktemp("sweep") / "sw"
    assert cli.main(["sweep", *TINY, *GRID, "--seeds", "0,1", "--out", str(out)]) == 0
    return out


def test_sweep_seeds_mean_and_std_by_hand(two_seed_sweep):
    out = two_seed_sweep
    runs = _read_csv(out / "sweep.csv")
    assert sorted(Path(r["dir"]).name for r in runs) == sorted(
        f"{p}-s{s}" for p in POINTS for s in (0, 1))
    summary = {(r["prune_rate"]): r for r in _read_csv(out / "sweep_summary.csv")}
    assert set(summary) == {"0.5", "0.3"}
    for name in POINTS:
        per_seed = {s: json.loads((out / f"{name}-s{s}" / "results.json").read_text())
                    for s in (0, 1)}
        assert [per_seed[s]["config"]["seed"] for s in (0, 1)] == [0, 1]
        row = summary["0.5" if "p0.5" in name else "0.3"]
        assert row["n_seeds"] == "2" and row["seeds"] == "0;1"
        for field in ("test_acc", "best_test_acc"):
            vals = [per_seed[s][field] for s in (0, 1)]
            mean, sd = _hand_mean_std(vals)
            assert float(row[f"{field}_mean"]) == pytest.approx(mean, abs=1e-9)
            assert float(row[f"{field}_std"]) == pytest.approx(sd, abs=1e-9)
            assert [float(row[f"{field}_s{s}"]) for s in (0, 1)] == pytest.approx(vals)
    # results.json of the sweep records every seed and every run
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and "ddof=1" in res["std"]
    assert sorted((Path(r["dir"]).name, r["seed"]) for r in res["runs"]) == sorted(
        (f"{p}-s{s}", s) for p in POINTS for s in (0, 1))
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("BINSLT_DEBUG", None)
    return env


def test_resume_mid_sweep_skips_finished_points_and_gives_the_same_csv(two_seed_sweep, tmp_path,
                                                                       capsys):
    out = tmp_path / "sw"
    args = ["sweep", *TINY, *GRID, "--seeds", "0,1", "--out", str(out)]
    # Killed (os._exit) after batch 2 of the third run: seed 1's first point.
    p = subprocess.run([sys.executable, "-m", "binslt", *args, "--_crash-after-batches", "1:2:3"],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 17, p.stdout + p.stderr
    done = [f"{n}-s0" for n in POINTS]
    assert all((out / n / "results.json").is_file() for n in done)
    assert not (out / f"{POINTS[0]}-s1" / "results.json").exists()
    stamp = {n: (out / n / "results.json").stat().st_mtime_ns for n in done}
    capsys.readouterr()
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    assert log.count("done earlier") == 2
    assert all((out / n / "results.json").stat().st_mtime_ns == stamp[n] for n in done)

    def computed(path: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in _read_csv(path)]

    assert computed(out / "sweep.csv") == computed(two_seed_sweep / "sweep.csv")
    strip = [c for c in _read_csv(out / "sweep_summary.csv")[0] if not c.startswith("wall_time")]
    resumed = [{c: r[c] for c in strip} for r in _read_csv(out / "sweep_summary.csv")]
    reference = [{c: r[c] for c in strip} for r in _read_csv(two_seed_sweep / "sweep_summary.csv")]
    assert resumed == reference


def _sweep_row(surrogate: str, alpha: float, seed: int, acc: float, best: float,
               method: str = "binwslt") -> dict:
    return {"method": method, "arch": "conv4", "prune_rate": 0.5, "timesteps": 4, "decay": 0.99,
            "decay_input": False, "surrogate": surrogate, "surrogate_alpha": alpha,
            "seed": seed, "test_acc": acc, "best_test_acc": best}


def test_surrogate_pairs_by_hand():
    """Each surrogate minus the base surrogate at the same point, paired by seed; a seed that
    only one side ran is left out; methods without a surrogate are not paired."""
    base = train.RunConfig()  # atan, alpha 2
    rows = [_sweep_row("atan", 2.0, 0, 98.0, 99.0), _sweep_row("atan", 2.0, 1, 97.0, 98.0),
            _sweep_row("atan", 2.0, 2, 99.0, 99.5),
            _sweep_row("rect", 1.0, 0, 97.5, 99.0), _sweep_row("rect", 1.0, 1, 97.5, 97.5),
            _sweep_row("rect", 1.0, 2, 98.0, 99.0), _sweep_row("rect", 1.0, 5, 10.0, 10.0),
            _sweep_row("atan", 2.0, 0, 90.0, 91.0, method="bnn"),
            _sweep_row("rect", 1.0, 0, 80.0, 81.0, method="bnn")]
    pairs = {(q["a"], q["metric"]): q for q in sweep.surrogate_pairs(rows, base)}
    assert set(pairs) == {("BinW-SLT rect", "test_acc"), ("BinW-SLT rect", "best_test_acc")}
    q = pairs[("BinW-SLT rect", "test_acc")]
    assert q["b"] == "BinW-SLT atan" and q["seeds"] == "0;1;2" and q["n_seeds"] == 3
    diffs = [-0.5, 0.5, -1.0]
    mean, sd = _hand_mean_std(diffs)
    half = T975_DF2 * sd / math.sqrt(3)
    assert q["mean_diff"] == pytest.approx(mean) and q["std_diff"] == pytest.approx(sd)
    assert (q["ci_low"], q["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert pairs[("BinW-SLT rect", "best_test_acc")]["mean_diff"] == pytest.approx(-1.0 / 3)
    # Another base surrogate is the reference; no pair without the base's point.
    assert {q["b"] for q in sweep.surrogate_pairs(rows, train.RunConfig(
        surrogate="rect", surrogate_alpha=1.0))} == {"BinW-SLT rect"}
    assert sweep.surrogate_pairs(rows[3:7], base) == []


def test_sweep_over_surrogates_trains_each_and_pairs_them(tmp_path):
    out = tmp_path / "sg"
    assert cli.main(["sweep", *TINY, "--methods", "binwslt", "--prune-rates", "none",
                     "--timesteps-list", "none", "--decays", "none", "--surrogates",
                     "atan,piecewise_quadratic", "--seeds", "0,1", "--out", str(out)]) == 0
    names = {s: (f"binwslt-conv4-p0.5-T4-l0.99-s{s}",
                 f"binwslt-conv4-p0.5-T4-l0.99-piecewise_quadratic1-s{s}") for s in (0, 1)}
    res = {n: json.loads((out / n / "results.json").read_text())
           for pair in names.values() for n in pair}
    for n, r in res.items():
        want = ("piecewise_quadratic", 1.0) if "quadratic" in n else ("atan", 2.0)
        assert (r["config"]["surrogate"], r["config"]["surrogate_alpha"]) == want
    # The surrogate reaches the layers: same seed, same start, different scores after training.
    from binslt.io.artifacts import load_model

    atan, _ = load_model(out / names[0][0])
    pq, _ = load_model(out / names[0][1])
    layers = [m for m in pq.modules() if hasattr(m, "neuron") and hasattr(m, "scores")]
    assert layers and {m.neuron.surrogate for m in layers} == {"piecewise_quadratic"}
    sa, sp = atan.state_dict(), pq.state_dict()
    assert any(k.endswith("scores") and not torch.equal(sa[k], sp[k]) for k in sa)
    pairs = {q["metric"]: q for q in _read_csv(out / "sweep_pairs.csv")}
    for metric in ("test_acc", "best_test_acc"):
        diffs = [res[names[s][1]][metric] - res[names[s][0]][metric] for s in (0, 1)]
        assert float(pairs[metric]["mean_diff"]) == pytest.approx(sum(diffs) / 2, abs=1e-9)
        assert pairs[metric]["a"] == "BinW-SLT piecewise_quadratic"
    summary = {r["surrogate"]: r for r in _read_csv(out / "sweep_summary.csv")}
    assert set(summary) == {"atan", "piecewise_quadratic"}
    assert json.loads((out / "results.json").read_text())["pairs"]
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_options_are_checked(tmp_path, capsys):
    assert cli.main(["sweep", *TINY, *GRID, "--seed", "1", "--seeds", "0,1",
                     "--out", str(tmp_path / "a")]) == 2
    assert "give --seed or --seeds, not both" in capsys.readouterr().err
    assert cli.main(["compare", *TINY, "--seeds", "0,0", "--out", str(tmp_path / "b")]) == 2
    assert "--seeds lists a seed twice" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for extra, msg in ((["--methods", "bnn,ann", "--surrogates", "rect"], "has none: bnn,ann"),
                       (["--surrogates", "rect,atan,rect"], "lists a surrogate twice"),
                       (["--surrogates", "exp"], "expected a comma-separated subset")):
        try:
            rc = cli.main(["sweep", *TINY, *extra, "--out", str(tmp_path / "c")])
        except SystemExit as exc:  # argparse: a value outside the choices
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
        assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# compare --seeds
# ---------------------------------------------------------------------------------------------


def test_compare_seeds_pairs_by_hand_and_same_seed_same_start(tmp_path, monkeypatch):
    starts: dict[tuple[str, int, int], list[torch.Tensor]] = {}
    batches: dict[tuple[str, int, int], list[torch.Tensor]] = {}
    real_build, real_epoch = train.build_or_restore, train.train_one_epoch

    def build(cfg, bundle):
        model, src = real_build(cfg, bundle)
        sd = model.state_dict()  # latent weights and scores in construction order
        starts[(cfg.method, cfg.timesteps, cfg.seed)] = [
            sd[k].clone() for k in sd if k.endswith(("weight", "scores")) and sd[k].dim() > 1]
        build.key = (cfg.method, cfg.timesteps, cfg.seed)
        return model, src

    def epoch(net, loader, *a, **kw):
        batches[build.key] = [y.clone() for _, y in loader]
        return real_epoch(net, loader, *a, **kw)

    monkeypatch.setattr(train, "build_or_restore", build)
    monkeypatch.setattr(train, "train_one_epoch", epoch)
    out = tmp_path / "cmp"
    assert cli.main(["compare", *TINY, "--methods", "bnn,binwslt", "--seeds", "0,1",
                     "--out", str(out)]) == 0
    # Same seed: BinW-SLT (T=4 and T=1) and BNN-BinAct start from the same latent weights and
    # scores and see the same batches; another seed changes both.
    for s in (0, 1):
        ref = starts[("bnn", 4, s)]
        for key in (("binwslt", 4, s), ("binwslt", 1, s)):
            assert len(starts[key]) == len(ref)
            assert all(torch.equal(x, y) for x, y in zip(starts[key], ref)), key
            assert all(torch.equal(x, y) for x, y in zip(batches[key], batches[("bnn", 4, s)]))
    assert not torch.equal(starts[("bnn", 4, 0)][0], starts[("bnn", 4, 1)][0])
    assert not all(torch.equal(x, y) for x, y in zip(batches[("bnn", 4, 0)],
                                                     batches[("bnn", 4, 1)]))

    labels = {"bnn-binact": "BNN-BinAct", "binw-slt": "BinW-SLT", "binw-slt-t-1": "BinW-SLT (T=1)"}
    acc = {lab: {s: json.loads((out / f"{slug}-s{s}" / "results.json").read_text())
                 for s in (0, 1)} for slug, lab in labels.items()}
    summary = {r["label"]: r for r in _read_csv(out / "compare_summary.csv")}
    for lab in labels.values():
        vals = [acc[lab][s]["test_acc"] for s in (0, 1)]
        mean, sd = _hand_mean_std(vals)
        assert float(summary[lab]["test_acc_mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(summary[lab]["test_acc_std"]) == pytest.approx(sd, abs=1e-9)
    pairs = {(q["a"], q["b"], q["metric"]): q for q in _read_csv(out / "compare_pairs.csv")}
    assert set(pairs) == {(a, "BNN-BinAct", m) for a in ("BinW-SLT", "BinW-SLT (T=1)")
                          for m in ("test_acc", "best_test_acc")}  # no SNN row was run
    for a in ("BinW-SLT", "BinW-SLT (T=1)"):
        diffs = [acc[a][s]["test_acc"] - acc["BNN-BinAct"][s]["test_acc"] for s in (0, 1)]
        q = pairs[(a, "BNN-BinAct", "test_acc")]
        mean, sd = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
        half = T975_DF1 * sd / math.sqrt(2)
        assert float(q["mean_diff"]) == pytest.approx(mean, abs=1e-9)
        assert float(q["std_diff"]) == pytest.approx(sd, abs=1e-9)
        assert float(q["ci_low"]) == pytest.approx(mean - half, abs=1e-9)
        assert float(q["ci_high"]) == pytest.approx(mean + half, abs=1e-9)
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["label"], r["seed"]) for r in rows] == [
        (lab, s) for s in (0, 1) for lab in ("BNN-BinAct", "BinW-SLT", "BinW-SLT (T=1)")]
    for r in rows:  # delta_vs_bnn pairs within a seed
        if r["method"] == "binwslt":
            assert r["delta_vs_bnn"] == pytest.approx(
                r["test_acc"] - acc["BNN-BinAct"][r["seed"]]["test_acc"])
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and len(res["runs"]) == 6 and len(res["pairs"]) == 4
    md = (out / "compare.md").read_text()
    assert "mean ± std" in md and "BinW-SLT - BNN-BinAct" in md and "paired" in md.lower()
