"""The benchmark scripts run and write well-formed results (nothing here is timed).

``benchmarks/conv_lif.py --quick`` must produce one CSV row per backend x mode for the anchor
shape, with positive ratios and the machine record; ``benchmarks/search_epoch.py`` must run a
two-batch epoch; ``benchmarks/network.py --quick`` one row per arch x mode x candidate;
``benchmarks/grad_sparsity.py`` one row per surrogate x layer. The memory helpers they rely on
are checked directly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def _bench_env() -> dict[str, str]:
    """The environment the benchmark scripts (and their children) run in here."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmarks never time the interpreter
    # One thread: on a shared 2-core runner, OpenMP spin-waiting makes 2 threads 10x slower.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=_bench_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _expected_cpu_backends() -> set[str]:
    import binslt

    st = binslt.backends()
    return {"torch"} | ({"cpu"} if st["cpu"]["usable"] else set())


def _run_csv(script: str, tmp_path: Path, *args: str, meta_keys: tuple[str, ...] = (),
             png: bool = True) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Run ``benchmarks/<script>`` with ``--threads 1 --out tmp_path``; (meta, rows) of the one
    CPU CSV it writes, after checking that its plot is there (``png``) and that its header
    records each of ``meta_keys``."""
    _run(script, *args, "--threads", "1", "--out", str(tmp_path))
    csvs = list(tmp_path.glob(f"{Path(script).stem}_cpu-*.csv"))
    assert len(csvs) == 1, list(tmp_path.iterdir())
    if png:
        assert csvs[0].with_suffix(".png").stat().st_size > 0
    meta, rows = common.read_csv(csvs[0])
    for key in meta_keys:
        assert meta.get(key), f"CSV header lacks {key!r}: {meta}"
    return meta, rows


def _num(v: str) -> float:
    x = float(v)
    assert math.isfinite(x), v
    return x


def test_conv_lif_quick_writes_csv(tmp_path):
    _, rows = _run_csv("conv_lif.py", tmp_path, "--quick", meta_keys=(
        "device", "cpu_cores", "torch", "triton", "spikingjelly", "binslt", "git_commit",
        "sj_lif_impl", "neuron"))
    assert set(rows[0]) == set(_load_columns())
    backends = _expected_cpu_backends()
    got = {(r["backend"], r["mode"]) for r in rows}
    assert got == {(b, m) for b in backends for m in ("eval_fwd", "train_fwdbwd", "eval_frozen")}
    assert len(rows) == len(got)  # one row per backend x mode
    for r in rows:
        assert r["shape"] == "anchor"
        assert (int(r["T"]), int(r["N"]), int(r["C_in"]), int(r["C_out"]), int(r["H"])) == \
            (4, 16, 128, 128, 16)
        ms, sj_ms, speedup = _num(r["ms"]), _num(r["sj_ms"]), _num(r["speedup"])
        assert ms > 0 and sj_ms > 0 and speedup > 0
        assert speedup == pytest.approx(sj_ms / ms, rel=1e-3)
        assert 0.0 <= _num(r["out_rate"]) <= 1.0 and 0.0 <= _num(r["sj_out_rate"]) <= 1.0
        if r["mode"] == "train_fwdbwd":
            saved, sj_saved = int(r["saved_bytes"]), int(r["sj_saved_bytes"])
            # SpikingJelly keeps at least the fp32 input spikes for the conv's weight gradient.
            assert sj_saved >= 4 * 4 * 16 * 128 * 16 * 16
            assert saved > 0 and _num(r["saved_ratio"]) == pytest.approx(sj_saved / saved,
                                                                        rel=1e-3)
        else:
            assert r["saved_bytes"] == "" and r["saved_ratio"] == ""
        if r["backend"] != "torch":  # checked against the reference on the same weights
            assert _num(r["spike_mismatch"]) < 0.01
            assert _num(r["grad_rel_err"]) < 1e-3


def _load_columns() -> list[str]:
    sys.path.insert(0, str(BENCH))
    import conv_lif

    return conv_lif.COLUMNS


def test_search_epoch_smoke(tmp_path):
    _, rows = _run_csv("search_epoch.py", tmp_path, "--max-batches", "2", "--repeats", "1",
                       "--batch-size", "16", meta_keys=("git_commit", "torch"), png=False)
    impls = {r["impl"] for r in rows}
    assert impls == {f"binslt-{b}" for b in _expected_cpu_backends()} | {"sj-biprop"}
    for r in rows:
        assert _num(r["epoch_s"]) > 0 and _num(r["speedup"]) > 0
        assert int(r["batches"]) == 2
        if r["impl"] != "sj-biprop":
            # The independent baseline computes the same network from the same start.
            assert _num(r["init_logit_diff"]) < 1e-3
            assert _num(r["init_grad_rel_err"]) < 1e-3


def test_network_quick_writes_csv(tmp_path):
    import network

    meta, rows = _run_csv("network.py", tmp_path, "--quick", meta_keys=(
        "device", "cpu_cores", "torch_threads", "torch", "spikingjelly", "binslt", "git_commit",
        "sj_lif_impl", "neuron", "ratio", "command"))
    assert meta["complete"] == "yes"  # rewritten whole after the rows appended as measured
    assert set(rows[0]) == set(network.COLUMNS)
    ref = f"binslt-{network.default_backends('cpu')[0]}"
    want = {("conv4", m, c) for m in network.MODES for c in (ref, *network.ANCHORS[m])}
    if ref != "binslt-torch":  # memory: the kernel backend also with counts recomputed
        want.add(("conv4", "memory", f"{ref}-recompute"))
    got = [(r["arch"], r["mode"], r["candidate"]) for r in rows]
    assert set(got) == want and len(got) == len(want)  # one row per arch x mode x candidate
    for r in rows:
        assert (int(r["N"]), int(r["T"])) == (2, 4) and r["ref"] == ref
        assert r["error"] == "", r
        value = _num(r["bytes"] if r["mode"] == "memory" else r["ms"])
        assert value > 0, r
        base = [q for q in rows if (q["mode"], q["candidate"]) == (r["mode"], ref)][0]
        base_value = _num(base["bytes"] if r["mode"] == "memory" else base["ms"])
        assert _num(r["ratio"]) == pytest.approx(value / base_value, rel=1e-3)
        if r["mode"] == "memory":
            assert r["peak_kind"] in ("rss_hwm", "ru_maxrss")
            assert r["ms"] == ""
        else:
            assert r["bytes"] == ""
        if r["mode"] == "search":  # the checked step changed the trainable parameters
            assert 0.0 < _num(r["check"]) <= 1.0
    ticket = [r for r in rows if (r["mode"], r["candidate"]) == ("eval", ref)][0]
    # The ticket loaded from its packed file gives the exported network's logits.
    assert _num(ticket["check"]) < 1e-4
    memopt = [r for r in rows if r["candidate"] == "sj-memopt"][0]
    assert "level=1" in memopt["detail"]


@pytest.mark.parametrize("arch", ["vgg11", "sj-resnet18", "sj-vgg11-bn"])
def test_network_eval_calibration_keeps_every_layer_spiking(arch):
    """The eval anchors time a network with training's activity, not one that fell silent."""
    import argparse

    import network
    import torch

    args = argparse.Namespace(seed=0, batch=2, timesteps=4, prune_rate=0.5)
    x, _ = network.make_batch(args, torch.device("cpu"))
    model = network.build_binslt(arch, args, "cpu", torch.device("cpu"))
    model.train()
    train_rates = network.input_rates(model, x)
    network.calibrate_bn(model, x)
    assert not model.training
    eval_rates = network.input_rates(model, x)
    # sj-vgg11-bn's last two linears sit behind dropouts (p=0.5): in training the fused one sees
    # half its spikes, the logits layer scaled spikes (0 or 2; its rate is measured in eval only)
    keep = {"net.classifier.3": 0.5} if arch == "sj-vgg11-bn" else {}
    eval_only = {"net.classifier.6.0"} if arch == "sj-vgg11-bn" else set()
    assert len(eval_rates) >= 8 and set(eval_rates) == set(train_rates) | eval_only
    for name, rate in eval_rates.items():
        # running statistics = the batch's own (unbiased variance: small layers differ a little)
        assert 0.05 < rate < 0.95, name
        if name not in eval_only:
            assert rate * keep.get(name, 1.0) == pytest.approx(train_rates[name], abs=0.08), name
    assert "SILENT" not in network.rate_summary(eval_rates)
    assert "SILENT: a" in network.rate_summary({"a": 0.0, "b": 0.5})


@pytest.mark.parametrize("name", ["rect", "piecewise_quadratic"])
def test_network_surrogate_reaches_binslt_and_the_anchors(name):
    """``--surrogate``: binslt's layers and SpikingJelly's LIF nodes (dense and biprop) get the
    same surrogate at SpikingJelly's default alpha."""
    import argparse

    import network
    from spikingjelly.activation_based import neuron, surrogate

    args = argparse.Namespace(seed=0, batch=2, timesteps=4, prune_rate=0.5, surrogate=name)
    cls = {"rect": surrogate.Rect, "piecewise_quadratic": surrogate.PiecewiseQuadratic}[name]
    model = network.build_binslt("conv4", args, "cpu", torch.device("cpu"))
    layers = [m for m in model.modules() if hasattr(m, "neuron") and hasattr(m, "scores")]
    assert len(layers) == 6
    assert {(m.neuron.surrogate, m.neuron.surrogate_alpha) for m in layers} == {(name, 1.0)}
    for masked in (False, True):
        sj = network.build_anchor("conv4", args, masked, torch.device("cpu"), like=model)
        nodes = [m for m in sj.modules() if isinstance(m, neuron.LIFNode)]
        assert len(nodes) == 6
        assert all(type(m.surrogate_function) is cls and m.surrogate_function.alpha == 1.0
                   for m in nodes)


def test_network_rejects_bad_options(capsys):
    import network

    for args, msg in ((["--arch", "vgg7"], "unknown --arch"),
                      (["--modes", "train"], "unknown --modes"),
                      (["--batch", "0"], "--batch must be >= 1"),
                      (["--memopt-level", "2"], "needs CUDA"),
                      (["--surrogate", "exp"], "invalid choice"),
                      (["--memory-repeats", "0"], "--memory-repeats must be >= 1"),
                      (["--arch", "vgg11,sj-resnet18", "--surrogate", "rect"],
                       "keep their own neurons")):
        with pytest.raises(SystemExit) as exc:
            network.parse_args(args)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_network_memory_rounds_give_their_median():
    """--memory-repeats: a row holds the median round (the lower middle of an even count) and
    lists every round; a failed round makes the row an error."""
    import network

    mib = 2**20
    rounds = [{"bytes": 180 * mib, "peak_kind": "rss_hwm", "detail": "2 steps"},
              {"bytes": 150 * mib, "peak_kind": "rss_hwm", "detail": "2 steps"},
              {"bytes": 165 * mib, "peak_kind": "rss_hwm", "detail": "2 steps"}]
    med = network._median_memory(rounds)
    assert med["bytes"] == 165 * mib
    assert med["detail"] == "median of 3 rounds: 180.0, 150.0, 165.0 MiB; 2 steps"
    assert network._median_memory(rounds[:2])["bytes"] == 150 * mib
    assert network._median_memory(rounds[:1]) == rounds[0]
    assert network._median_memory(rounds + [{"error": "boom"}]) == {"error": "boom"}


def test_cpu_algos_smoke(tmp_path):
    import binslt

    if not binslt.backends()["cpu"]["usable"]:
        pytest.skip("binslt._C (the C++ CPU kernels) is not built")
    _run("cpu_algos.py", "--shape", "1,2,40,20,9", "--rates", "0.1,0.6", "--repeats", "1",
         "--isas", "scalar", "--out", str(tmp_path))
    meta, rows = common.read_csv(tmp_path / f"cpu_algos_{common.device_slug(torch.device('cpu'))}.csv")
    assert meta.get("git_commit")
    fwd = [r for r in rows if r["part"] == "forward"]
    assert {(r["rate"], r["algo"]) for r in fwd} == {(r, a) for r in ("0.1", "0.6")
                                                    for a in ("dense", "event")}
    gw = [r for r in rows if r["part"] == "weight_grad"]
    # (the unfold form too: this map's matrix is 21 MB, under the benchmark's 64 MiB bound; and
    # the per-tap GEMM form, forced here although the auto rule keeps it for maps <= 4x4; and
    # the int8 limb form, forced here although the plan takes it on AMX only)
    assert {(r["rate"], r["algo"]) for r in gw} == {
        (r, a) for r in ("0.1", "0.6") for a in ("event", "dense", "unfold", "taps", "int8")}
    # Every algorithm gave the same spikes and counts (forward) / gradient (backward).
    assert all(r["same_result"] == "True" for r in rows)
    assert all(_num(r["ms"]) > 0 for r in rows)


def test_saved_tensor_bytes_dedups_storages():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes
    with common.SavedTensorBytes() as saved:
        y = x * x  # saves x twice (same storage)
    assert saved.nbytes == 4000
    with common.SavedTensorBytes() as saved2:
        z = torch.sigmoid(x[:500])  # saves its 500-element output
        w = x[:10].exp()  # saves its own output
    assert saved2.nbytes == 500 * 4 + 10 * 4
    (y.sum() + z.sum() + w.sum()).backward()


def test_peak_memory_sees_a_large_cpu_allocation():
    with common.PeakMemory(torch.device("cpu")) as peak:
        t = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB, touched
        del t
    if peak.kind == "rss_hwm":
        assert peak.nbytes >= 15 << 20
    else:  # process-wide peak: at least as large
        assert peak.absolute >= 16 << 20


def test_grad_sparsity_smoke(tmp_path):
    out = tmp_path / "gs.csv"
    _run("grad_sparsity.py", "--arch", "conv4", "--batch", "2", "--size", "8", "--threads", "1",
         "--csv", str(out))
    meta, rows = common.read_csv(out)
    assert meta.get("command") and meta.get("git_commit") and meta.get("setup")
    by = {}
    for r in rows:
        by.setdefault(r["surrogate"], []).append(r)
    assert set(by) == {"atan", "rect", "piecewise_quadratic"}
    n = len(by["atan"])
    assert n >= 4 and all(len(v) == n for v in by.values())
    for i in range(n):
        atan = by["atan"][i]
        assert _num(atan["gx_nonzero"]) > 0.3  # ATan's g' is never 0
        for kind in ("rect", "piecewise_quadratic"):
            r = by[kind][i]
            assert (r["op"], r["shape"]) == (atan["op"], atan["shape"])
            # the compact surrogates zero dL/dX outside their window; BN's backward refills dL/dZ
            assert 0 < _num(r["gx_nonzero"]) < _num(atan["gx_nonzero"])
            assert _num(r["gz_nonzero"]) >= _num(r["gx_nonzero"])


def test_plan_check_quick_times_auto_against_every_forced_algorithm(tmp_path):
    """plan_check.py --quick: auto (table and measured) and each forced forward algorithm on the
    anchor shape; the ratio is the row's time over the fastest forced one's, whose name and time
    it records. (The tolerance is opened wide: the verdict is a measurement, not a test.)"""
    _, rows = _run_csv("plan_check.py", tmp_path, "--quick", "--modes", "eval_fwd",
                       "--tolerance", "9.9", meta_keys=("git_commit", "plan_cache"), png=False)
    variants = {r["variant"]: r for r in rows}
    assert {"auto_table", "auto_measured", "conv=dense", "conv=event"} <= set(variants)
    forced = {k: _num(r["ms"]) for k, r in variants.items() if k.startswith("conv=")}
    best = min(forced, key=forced.get)
    for r in rows:
        assert r["shape"] == "anchor" and r["mode"] == "eval_fwd"
        assert r["best_forced"] == best and _num(r["best_forced_ms"]) == pytest.approx(forced[best])
        assert _num(r["ratio"]) == pytest.approx(_num(r["ms"]) / forced[best], rel=1e-3)
    assert variants["auto_table"]["verdict"] == variants["auto_measured"]["verdict"] == "pass"
    assert variants["auto_table"]["plan"].startswith("forward=")
    # the measured plan names the op and one of its forward candidates
    assert variants["auto_measured"]["plan"].split("=")[1] in {"dense", "event", "onednn"}


def test_plan_check_reads_table_and_measured_plans_alike():
    """plan_check's 'same plan' verdict compares plans field by field: the table's text and the
    measured winners' text of the same algorithms give the same fields, the measured ones over
    the table's where only some fields were measured."""
    import plan_check

    table = "forward=event grad_x=dense grad_w=event"
    measured = "bconv_lif=event bconv_lif_bwd.grad_w=event bconv_lif_bwd.grad_x=dense"
    want = {"forward": "event", "grad_x": "dense", "grad_w": "event"}
    assert plan_check.plan_fields(table) == plan_check.plan_fields(measured) == want
    assert plan_check.plan_fields("bconv_lif_infer=dense") == {"forward": "dense"}
    over = {**plan_check.plan_fields(table),
            **plan_check.plan_fields("bconv_lif_bwd.grad_w=dense")}
    assert over == {**want, "grad_w": "dense"}


def test_split_precision_times_and_checks_every_form(tmp_path):
    """split_precision.py on three small layers (3x3, 3x3 at stride 2, 1x1): every form that
    runs the layer gives a row, forced forms plan what they force, and every gradient is within
    the tests' 1e-5 of float64 (which the script computes from binslt.ops.reference)."""
    meta, rows = _run_csv("split_precision.py", tmp_path, "--layers", "32x48x8,32x64x8x2,32x48x4x1x1",
                          "--t", "2", "--n", "2", "--repeats", "1",
                          meta_keys=("git_commit", "features", "command"), png=False)
    layers = {r["layer"] for r in rows}
    assert layers == {"32x48x8", "32x64x8/s2", "32x48x4/1x1"}
    for layer in layers:
        forms = {r["form"]: r for r in rows if r["layer"] == layer}
        assert {"auto", "dense", "bf16x3"} <= set(forms)
        assert forms["bf16x3"]["plan"] == "grad_x=bf16x3 grad_w=bf16x3"
        assert forms["dense"]["plan"] == "grad_x=dense grad_w=dense"
    for r in rows:
        assert _num(r["ms"]) > 0
        for col in ("err_grad_x", "err_grad_w", "err_score"):
            assert 0 <= _num(r[col]) < 1e-5, (r["layer"], r["form"], col, r[col])
    bad = subprocess.run([sys.executable, str(BENCH / "split_precision.py"), "--layers", "32x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "is not CinxCoutxH" in bad.stderr


_TINY_SEARCH = "--epochs 1 --train-subset 96 --test-subset 48 --batch-size 32"


def test_default_search_times_each_candidate_in_interleaved_rounds(tmp_path):
    import json

    import binslt

    if not binslt.backends()["cpu"]["usable"]:
        pytest.skip("binslt._C (the C++ CPU kernels) is not built")
    out = _run("default_search.py", "--checkout", f"a={ROOT}", "--checkout", f"b={ROOT}",
               "--rounds", "2", "--search-args", _TINY_SEARCH, "--out", str(tmp_path)).stdout
    meta, rows = common.read_csv(
        tmp_path / f"default_search_{common.device_slug(torch.device('cpu'))}.csv")
    assert meta["complete"] == "yes" and meta["git_commit"].startswith("a: ")
    assert _TINY_SEARCH in meta["search"]
    assert [(r["round"], r["candidate"]) for r in rows] == [("1", "a"), ("1", "b"), ("2", "a"),
                                                            ("2", "b")]
    assert all(_num(r["wall_s"]) > _num(r["search_s"]) > 0 for r in rows)
    assert all(_num(r["user_s"]) > 0 and _num(r["minor_faults"]) > 0 for r in rows)
    # Each row is a real run: the accuracy that binslt search gives for those arguments when
    # run directly (one thread, as the script's children here).
    run = tmp_path / "direct"
    direct = subprocess.run([sys.executable, "-m", "binslt", "search", "--out", str(run),
                             "--no-progress", *_TINY_SEARCH.split()], cwd=ROOT, env=_bench_env(),
                            capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stderr
    acc = json.loads((run / "results.json").read_text())["test_acc"]
    assert all(math.isclose(_num(r["test_acc"]), acc, abs_tol=1e-6) for r in rows)
    assert "speedup" in out and "wrote" in out


@pytest.mark.parametrize("args,says", [
    (["--checkout", "nodir"], "expected NAME=DIR"),
    (["--checkout", "x=/"], "holds no binslt source tree"),
    (["--checkout", f"x={ROOT}", "--checkout", f"x={ROOT}"], "names must differ"),
    (["--commit", "no-such-revision"], "git rev-parse"),
    ([], "name at least one candidate"),
])
def test_default_search_refuses_bad_candidates(tmp_path, args, says):
    proc = subprocess.run([sys.executable, str(BENCH / "default_search.py"), *args,
                           "--work", str(tmp_path), "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.csv"))


def test_default_search_interrupted_keeps_the_finished_runs(tmp_path):
    import signal
    import time

    import binslt

    if not binslt.backends()["cpu"]["usable"]:
        pytest.skip("binslt._C (the C++ CPU kernels) is not built")
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "default_search.py"), "--checkout", f"a={ROOT}",
         "--rounds", "20", "--search-args", _TINY_SEARCH, "--out", str(tmp_path)],
        cwd=ROOT, env=_bench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    csv_path = tmp_path / f"default_search_{common.device_slug(torch.device('cpu'))}.csv"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # until one run is written
        if csv_path.exists() and common.read_csv(csv_path)[1]:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted; the" in err, err
    meta, rows = common.read_csv(csv_path)
    assert meta["complete"].startswith("no") and 1 <= len(rows) < 20
    assert all(_num(r["wall_s"]) > 0 for r in rows)


_CPUINFO_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni avx512_vpopcntdq

processor\t: 1
cpu family\t: 99
model\t\t: 99
flags\t\t: amx_int8
"""


def test_cpu_identity_reads_the_first_processor():
    """The CSV record's cpu_id: family, model, stepping and binslt's ISA features of the first
    processor block only (the second's fields and flags are not mixed in)."""
    assert common.cpu_identity(_CPUINFO_ZEN4) == (
        "family 25 model 17 stepping 1; avx2 avx512f avx512bw avx512vl avx512_vpopcntdq "
        "avx512_vnni avx512_bf16")
    xeon = ("processor : 0\ncpu family : 6\nmodel : 143\nstepping : 8\n"
            "flags : avx2 avx512f amx_bf16 amx_int8 amx_tile\n")
    assert common.cpu_identity(xeon) == "family 6 model 143 stepping 8; avx2 avx512f amx_bf16 amx_int8"
    assert common.cpu_identity("processor : 0\nflags : sse2\n").startswith("?; none of avx2")
    assert common.cpu_identity("") == "?"
    assert "cpu_id" in common.machine_info(torch.device("cpu"))
