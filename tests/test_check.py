"""``binslt check``: every op of each kernel backend against the reference, the cross-backend
spike equality on planted near-threshold input, the verdict file; and that a planted wrong
kernel fails with its op named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from binslt import cli, ops
from binslt.ops import check
from binslt.ops import fallback as fb
from binslt.ops.schemas import SCHEMAS

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROOT = Path(__file__).resolve().parents[1]


def _lines(rep, backend):
    return {r.op: r for r in rep.results if r.backend == backend}


def test_cli_check_passes_and_writes_the_verdict(tmp_path):
    """The command in a subprocess: one line per op and backend, exit 0, the JSON verdict."""
    env = dict(os.environ, BINSLT_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "v.json"
    r = subprocess.run([sys.executable, "-m", "binslt", "check", "--device", "cpu", "--json",
                        str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    backends = ["cpu"] + (["triton"] if INTERPRET else [])
    for be in backends:
        for op in SCHEMAS:
            assert any(line.split()[:3] == [be, op, "ok"] for line in r.stdout.splitlines()), \
                (be, op, r.stdout)
    if INTERPRET:
        assert "cpu=triton   bn_lif[planted]" in r.stdout
    v = json.loads(out.read_text())
    assert v["ok"] is True and set(v["backends"]) == set(backends)
    assert v["key"] == {**fb.verdict_key(torch.device("cpu")), "build": v["key"]["build"]}
    assert v["key"]["build"] == fb.build_id()
    saved = json.loads((tmp_path / "cache" / "check.json").read_text())
    assert saved["verdicts"] == [v]


@pytest.mark.parametrize("args, match", [
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "cpu", "--backend", "cuda"], "--backend cuda needs --device cuda"),
    (["--device", "cpu", "--backend", "torch"], "unknown kernel backend 'torch'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--backend", "x"],
     "--device cuda" if not torch.cuda.is_available() else "unknown kernel backend"),
])
def test_bad_arguments_one_line_exit_2(capsys, tmp_path, args, match):
    assert cli.main(["check", *args, "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binslt check: error: ") and err.count("\n") == 1, err
    assert match in err


def test_cpu_backend_passes_every_op():
    rep = check.run_check("cpu", "cpu")
    assert rep.ok, "\n".join(r.line() for r in rep.results)
    lines = _lines(rep, "cpu")
    assert set(lines) == set(SCHEMAS)
    assert all(r.cases >= 3 for r in lines.values())
    v = rep.verdict(fb.verdict_key(torch.device("cpu")))
    assert v["backends"] == {"cpu": {"ok": True, "failed": []}}


def _flip_one_spike(orig):
    def wrong(*args):
        out = orig(*args)
        s = out[0].clone()
        s.view(-1)[s.numel() // 2] = 1 - s.view(-1)[s.numel() // 2]
        return (s, *out[1:])
    return wrong


def test_planted_wrong_cpu_kernel_fails_with_its_op_named(monkeypatch, tmp_path):
    """bconv_lif flips one spike; pack_weight raises: both lines fail, the rest pass, exit 1."""
    monkeypatch.setattr(torch.ops.binslt, "bconv_lif", _flip_one_spike(torch.ops.binslt.bconv_lif))

    def broken(*args):
        raise RuntimeError("planted kernel error")

    monkeypatch.setattr(torch.ops.binslt, "pack_weight", broken)
    rep = check.run_check("cpu", "cpu")
    lines = _lines(rep, "cpu")
    assert not rep.ok
    assert not lines["bconv_lif"].ok and "spikes differ" in lines["bconv_lif"].reason
    assert lines["bconv_lif"].worst > 0
    assert not lines["pack_weight"].ok and "planted kernel error" in lines["pack_weight"].reason
    assert "FAIL" in lines["bconv_lif"].line() and "bconv_lif" in lines["bconv_lif"].line()
    assert {op for op, r in lines.items() if not r.ok} == {"bconv_lif", "pack_weight"}
    v, written = check.write_report(rep, tmp_path / "v.json", save=False)
    assert v["backends"]["cpu"] == {"ok": False, "failed": ["pack_weight", "bconv_lif"]}
    assert written == [tmp_path / "v.json"]
    # and the command exits 1
    monkeypatch.setenv("BINSLT_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["check", "--device", "cpu", "--backend", "cpu"]) == 1
    saved = json.loads((tmp_path / "cache" / "check.json").read_text())["verdicts"][0]
    assert saved["backends"]["cpu"]["ok"] is False


@pytest.mark.skipif(not INTERPRET, reason="the Triton backend runs on the CPU under "
                    "TRITON_INTERPRET=1 only")
def test_planted_wrong_triton_gradient_and_tie_flip_fail(monkeypatch):
    """Triton's bn_lif_bwd scales one gradient by 1 + 1e-4: its line fails. The CPU's bn_lif
    flips the spikes of neurons within 1e-6 of the threshold at t = 0: the tie band lets that
    pass against the reference, the bit-exact cross-backend check does not."""
    assert ops.load_triton() == ""
    tri_bwd = torch.ops.binslt.bn_lif_bwd_triton

    def scaled(*args):
        g_z, g_cur, g_sc, g_sh = tri_bwd(*args)
        return g_z, g_cur, g_sc * (1 + 1e-4), g_sh

    monkeypatch.setattr(torch.ops.binslt, "bn_lif_bwd_triton", scaled)
    cpu_bn = torch.ops.binslt.bn_lif

    def tie_flip(z, scale, shift, residual, bn_train, eps, tau, decay_input, v_th, v_reset):
        s, m, v = cpu_bn(z, scale, shift, residual, bn_train, eps, tau, decay_input, v_th,
                         v_reset)
        if not bn_train and residual is None:
            x0 = z[0] * scale.view(1, -1, *[1] * (z.dim() - 3)) + shift.view(
                1, -1, *[1] * (z.dim() - 3))
            h0 = x0 / tau if decay_input else x0
            s = s.clone()
            near = (h0 - v_th).abs() < 1e-6
            s[0][near] = 1 - s[0][near]
        return s, m, v

    monkeypatch.setattr(torch.ops.binslt, "bn_lif", tie_flip)
    rep = check.run_check("cpu", "cpu,triton")
    bad = {(r.backend, r.op) for r in rep.results if not r.ok}
    assert bad == {("triton", "bn_lif_bwd"), ("cpu=triton", "bn_lif[planted]")}, \
        "\n".join(r.line() for r in rep.results)
    tri = _lines(rep, "triton")["bn_lif_bwd"]
    assert "grad_scale relative error" in tri.reason
    v = rep.verdict(fb.verdict_key(torch.device("cpu")))
    assert v["backends"]["triton"]["failed"] == ["bn_lif_bwd", "bn_lif[planted]"]
    assert v["backends"]["cpu"]["failed"] == ["bn_lif[planted]"]


def test_comparison_rules_are_the_tests():
    """tests/helpers.py takes its rules from binslt.check (one definition)."""
    import helpers

    assert helpers.tie_mask is check.tie_mask and helpers.TIE_BAND == check.TIE_BAND
    h = torch.tensor([[0.5, 1.0 + 2e-6, 2.0], [0.2, 0.3, 0.1]], dtype=torch.float64)
    ok = check.tie_mask(h, 1.0)
    assert ok.tolist() == [[True, False, True], [True, False, True]]
    s = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert check.spike_mismatch(s, s, h, 1.0) == ""
    flipped = s.clone()
    flipped[0, 1] = 0  # inside the band: allowed
    assert check.spike_mismatch(flipped, s, h, 1.0) == ""
    flipped[1, 0] = 1  # outside: reported
    assert "1 spikes differ" in check.spike_mismatch(flipped, s, h, 1.0)
