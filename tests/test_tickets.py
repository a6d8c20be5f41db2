"""Packed ticket files (binslt.tickets): size, bit-identical reload, the packed inference path,
and clear errors for corrupt / truncated / mismatched tickets and checkpoints (also via the CLI).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from binslt.io import artifacts, tickets
from binslt.io.tickets import TicketError, export_ticket, load_ticket
from binslt.nn import models
from binslt.nn.layers import BinSpikeConv2d, BinSpikeLinear, _MaskedSignWeight

REPO = Path(__file__).resolve().parent.parent


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BN's running statistics to one batch's statistics (so that neurons fire at
    eval), then switch to eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch -> exactly its statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.fixture(scope="module")
def conv4(tmp_path_factory):
    """A searched-mode Conv-4 (binwslt, 32x32x3, T=4) with calibrated BN, its ticket and a batch."""
    torch.manual_seed(1)
    model = models.build("conv4", "binwslt", num_classes=10, in_channels=3, input_size=32)
    _calibrate(model, torch.randn(3, 3, 32, 32))
    path = tmp_path_factory.mktemp("ticket") / "conv4.safetensors"
    info = export_ticket(model, path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    return model, path, info, x, logits


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small ticket (Conv-4 on 1x8x8 digits shapes, T=2) for the corruption tests."""
    torch.manual_seed(3)
    model = models.build("conv4", "binwslt", num_classes=10, in_channels=1, input_size=8,
                         timesteps=2)
    _calibrate(model, torch.randn(16, 1, 8, 8))
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    export_ticket(model, path)
    return model, path


# ---------------------------------------------------------------------------------------------
# Size and identity
# ---------------------------------------------------------------------------------------------


def test_conv4_ticket_is_15x_smaller_than_fp32(conv4):
    model, path, info, _, _ = conv4
    size = os.path.getsize(path)
    assert size == info["ticket_bytes"]
    # fp32 reference: the sum of the state dict's tensor bytes, each masked layer's weight once
    # (scores left out), BN statistics included -- what a dense fp32 Conv-4 stores.
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, _MaskedSignWeight))
    assert weights == 2_425_024  # Conv-4 at 32x32x3, 10 classes (docs/design.md: 2.43M)
    assert info["fp32_bytes"] >= 4 * weights
    assert info["fp32_bytes"] / size >= 15.0, info
    # against torch.save of the search-time state dict (weights + scores): twice that
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert info["torch_save_bytes"] == buf.getbuffer().nbytes
    assert buf.getbuffer().nbytes / size >= 30.0
    # and it is essentially the 2 bits per weight it should be
    assert size <= 2 * weights / 8 * 1.05


def test_ticket_contents(conv4):
    model, path, _, _, _ = conv4
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        mask0 = f.get_tensor("features.2.w_mask_bits")
    assert meta["format"] == "binslt-ticket" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == json.loads(json.dumps(model.build_config))
    layers = json.loads(meta["layers"])
    assert layers["features.2"]["neuron"]["decay_input"] is False
    assert layers["features.0"]["packed_inference"] is False  # real-input first layer
    assert layers["features.2"]["packed_inference"] is True
    assert mask0.dtype == torch.int32 and tuple(mask0.shape) == (128, 3, 3, 2)
    assert not any(k.endswith((".scores", ".weight")) for k in keys)  # no latent fp32 weights
    assert "features.2.bn.running_var" in keys and "features.2.alpha" in keys
    # the planes are exactly pack_weight of the searched effective weight
    w = model.features[2].effective_weight().detach()
    ref_mask, ref_pos = torch.ops.binslt.pack_weight(w)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("features.2.w_mask_bits"), ref_mask)
        assert torch.equal(f.get_tensor("features.2.w_pos_bits"), ref_pos)


def test_reload_gives_bit_identical_logits(conv4):
    model, path, _, x, logits = conv4
    ticket = load_ticket(path)
    assert not ticket.training
    assert all(m.mode == "frozen" for m in ticket.modules() if isinstance(m, _MaskedSignWeight))
    with torch.no_grad():
        got = ticket(x)
    # not vacuous: the network fires and the logits differ between images
    assert got.abs().sum() > 0 and (got.std(0) > 0).any()
    assert torch.equal(got, logits)
    assert torch.equal(got.argmax(1), logits.argmax(1))
    # with autograd on, the ticket runs the unpacked path; still the same logits
    assert torch.equal(ticket(x).detach(), logits)


def test_ticket_infers_from_packed_bits(conv4, monkeypatch):
    """Under no_grad, spike-input layers never unpack their weights to float; the real-input
    first layer and the classifier do (their ops need float weights)."""
    _, path, _, x, logits = conv4
    ticket = load_ticket(path, backend="cpu")
    calls: dict[str, int] = {}
    for name, m in ticket.named_modules():
        if isinstance(m, _MaskedSignWeight):
            orig = m.effective_weight

            def spy(orig=orig, name=name):
                calls[name] = calls.get(name, 0) + 1
                return orig()

            monkeypatch.setattr(m, "effective_weight", spy)
    with torch.no_grad():
        got = ticket(x)
    assert torch.equal(got, logits)
    packed = [n for n, m in ticket.named_modules()
              if isinstance(m, (BinSpikeConv2d, BinSpikeLinear)) and m.input == "spike"]
    assert len(packed) == 5
    assert not any(n in calls for n in packed), calls
    assert set(calls) == {"features.0", "classifier.layer"}


def test_loaded_ticket_holds_no_latent_weights(conv4):
    _, path, info, _, _ = conv4
    ticket = load_ticket(path)
    stored = sum(t.untyped_storage().nbytes() for t in
                 list(ticket.parameters()) + list(ticket.buffers()))
    assert stored <= info["ticket_bytes"], (stored, info["ticket_bytes"])
    assert models.count_parameters(ticket) > 2_400_000  # shapes are kept


@pytest.mark.parametrize("arch,variant,options", [
    ("resnet19", "binwslt", {}),  # BinConv2d shortcuts, real-input BinSpikeLinear after avgpool
    ("conv4", "binwslt", dict(binarize_first_last=False, bn_affine=True, per_channel_gain=True,
                              v_reset=None, decay=0.5)),  # dense first/last layers, affine BN
    ("vgg9", "bnn", {}),  # BNN-BinAct: BinConv2d/BinLinear with sign activations
    ("conv4", "snn", {}),  # no masked layer at all: every tensor stored as it is
])
def test_other_networks_reload_bit_identically(arch, variant, options, tmp_path):
    torch.manual_seed(4)
    model = models.build(arch, variant, in_channels=1, input_size=8, timesteps=2, **options)
    _calibrate(model, torch.randn(4, 1, 8, 8))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    path = tmp_path / "t.safetensors"
    info = export_ticket(model, path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        got = load_ticket(path)(x)
    assert (want.std(0) > 0).any()
    assert torch.equal(got, want)
    masked = [m for m in model.modules() if isinstance(m, _MaskedSignWeight)]
    assert len(info["packed_layers"]) == len(masked)
    if not options.get("binarize_first_last", True) or not masked:
        assert any(k.endswith(".weight") for k in info["dense_tensors"])


def test_export_does_not_change_the_model(small, tmp_path):
    model, _ = small
    modes = [m.mode for m in model.modules() if isinstance(m, _MaskedSignWeight)]
    export_ticket(model, tmp_path / "again.safetensors")
    assert modes == [m.mode for m in model.modules() if isinstance(m, _MaskedSignWeight)]
    assert all(m == "search" for m in modes)


def test_export_needs_a_built_model(tmp_path):
    with pytest.raises(TypeError, match="build_config"):
        export_ticket(BinSpikeConv2d(4, 4, 3), tmp_path / "x.safetensors")


def test_torch_backend_ticket_matches(small):
    model, path = small
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        got = load_ticket(path, backend="torch")(x)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, *, meta=None, tensors=None, redigest=True) -> Path:
    """Copy a ticket with edited metadata / tensors (a well-formed file with bad contents)."""
    with safe_open(str(src), "pt") as f:
        m = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    if meta:
        meta(m)
    if tensors:
        tensors(t)
    if redigest:
        m["sha256"] = tickets._digest(m, t)
    save_file(t, str(dst), metadata=m)
    return dst


def _raises(path: Path, match: str) -> str:
    with pytest.raises(TicketError, match=match) as ei:
        load_ticket(path)
    msg = str(ei.value)
    assert str(path) in msg, msg  # names the file
    assert "\n" not in msg
    return msg


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, "header-1", "data-half", "last-1"])
def test_truncated_ticket(small, tmp_path, keep):
    _, path = small
    data = path.read_bytes()
    hl = _header_len(path)
    n = {"header-1": hl - 1, "data-half": (hl + len(data)) // 2, "last-1": len(data) - 1}.get(
        keep, keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:n])
    _raises(bad, "truncated|corrupt")


def test_flipped_bytes_in_header_and_data(small, tmp_path):
    _, path = small
    data = path.read_bytes()
    hl = _header_len(path)
    header_pos = sorted({0, 1, 3, 7, 8, 9} | set(range(10, hl, max(1, hl // 60))) | {hl - 1})
    data_pos = sorted(set(range(hl, len(data), max(1, (len(data) - hl) // 40))) | {len(data) - 1})
    bad = tmp_path / "flip.safetensors"
    for pos in header_pos + data_pos:
        b = bytearray(data)
        b[pos] ^= 0xFF
        bad.write_bytes(bytes(b))
        with pytest.raises(TicketError) as ei:
            load_ticket(bad)
        assert str(bad) in str(ei.value), (pos, str(ei.value))
        if pos >= hl:
            assert "sha256" in str(ei.value), (pos, str(ei.value))


def test_wrong_version_and_format(small, tmp_path):
    _, path = small
    newer = _rewrite(path, tmp_path / "v2.safetensors",
                     meta=lambda m: m.update(format_version="2"))
    msg = _raises(newer, "format version 2 is not supported")
    assert "upgrade" in msg
    garbled = _rewrite(path, tmp_path / "vx.safetensors",
                       meta=lambda m: m.update(format_version="one"))
    _raises(garbled, "unreadable ticket format version")
    other = _rewrite(path, tmp_path / "fmt.safetensors", meta=lambda m: m.update(format="other"))
    _raises(other, "not a binslt ticket")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    _raises(plain, "not a binslt ticket")


def test_missing_and_extra_tensors(small, tmp_path):
    _, path = small
    gone = _rewrite(path, tmp_path / "gone.safetensors",
                    tensors=lambda t: t.pop("features.2.w_pos_bits"))
    _raises(gone, r"missing tensors \['features.2.w_pos_bits'\]")
    nobn = _rewrite(path, tmp_path / "nobn.safetensors",
                    tensors=lambda t: t.pop("features.0.bn.running_mean"))
    _raises(nobn, "missing tensors")
    extra = _rewrite(path, tmp_path / "extra.safetensors",
                     tensors=lambda t: t.update({"features.2.weight": torch.zeros(3)}))
    _raises(extra, "unexpected tensors")
    # the same edit without a fresh digest is caught as corruption first
    raw = _rewrite(path, tmp_path / "raw.safetensors",
                   tensors=lambda t: t.pop("features.2.w_pos_bits"), redigest=False)
    _raises(raw, "sha256")


def _edit_config(**change):
    def edit(m):
        c = json.loads(m["config"])
        c.update(change)
        m["config"] = json.dumps(c)
    return edit


def test_config_mismatch(small, tmp_path):
    _, path = small
    _raises(_rewrite(path, tmp_path / "c1.safetensors", meta=_edit_config(num_classes=100)),
            r"does not match its config .*classifier.layer.w_mask_bits")
    _raises(_rewrite(path, tmp_path / "c2.safetensors", meta=_edit_config(in_channels=3)),
            "does not match its config")
    _raises(_rewrite(path, tmp_path / "c3.safetensors", meta=_edit_config(arch="vgg11")),
            "does not match its config")
    _raises(_rewrite(path, tmp_path / "c4.safetensors", meta=_edit_config(arch="nope")),
            "config does not build a network")
    _raises(_rewrite(path, tmp_path / "c5.safetensors", meta=lambda m: m.update(config="{")),
            "'config' is not valid JSON")
    _raises(_rewrite(path, tmp_path / "c6.safetensors",
                     meta=lambda m: m.update(config=json.dumps({"arch": "conv4"}))),
            "lacks 'variant'")


def test_invalid_bit_planes_and_gain(small, tmp_path):
    _, path = small

    def sign_without_mask(t):
        t["features.2.w_pos_bits"] = t["features.2.w_pos_bits"] | ~t["features.2.w_mask_bits"]

    _raises(_rewrite(path, tmp_path / "b1.safetensors", tensors=sign_without_mask),
            "sign bits set where its mask bits are not")

    def high_bits(t):  # features.0 has 1 input channel: bits 1..31 must be clear
        t["features.0.w_mask_bits"] = t["features.0.w_mask_bits"] | 6

    _raises(_rewrite(path, tmp_path / "b2.safetensors", tensors=high_bits),
            "beyond its 1 input channels")

    def nan_alpha(t):
        t["features.2.alpha"] = t["features.2.alpha"].clone().fill_(float("nan"))

    _raises(_rewrite(path, tmp_path / "b3.safetensors", tensors=nan_alpha), "non-finite gain")

    def dtype(t):
        t["features.2.alpha"] = t["features.2.alpha"].double()

    _raises(_rewrite(path, tmp_path / "b4.safetensors", tensors=dtype),
            r"'features.2.alpha' is torch.float64")


def test_not_a_ticket_files(small, tmp_path):
    model, _ = small
    _raises(tmp_path / "nope.safetensors", "no such ticket file")
    _raises(tmp_path, "not a file")
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict()}, pt)
    _raises(pt, "torch.save file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _raises(empty, "truncated")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    _raises(junk, "corrupt")


# ---------------------------------------------------------------------------------------------
# Checkpoints (binslt.artifacts' loading path)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(small, tmp_path):
    model, _ = small
    path = tmp_path / "checkpoint.pt"
    artifacts.atomic_torch_save({"format": artifacts.CHECKPOINT_FORMAT, "config": {},
                             "build_config": dict(model.build_config), "epoch": 1,
                             "model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("cut", [0, 10, "half", "last-1"])
def test_truncated_checkpoint_is_a_clear_error(checkpoint, cut):
    data = checkpoint.read_bytes()
    n = {"half": len(data) // 2, "last-1": len(data) - 1}.get(cut, cut)
    checkpoint.write_bytes(data[:n])
    with pytest.raises(artifacts.ArtifactError, match="corrupt") as ei:
        artifacts.load_source(str(checkpoint))
    assert str(checkpoint) in str(ei.value)


def test_flipped_checkpoint_data_is_a_clear_error(checkpoint):
    """torch.load does not check the zip CRCs; flipped tensor bytes must still be caught."""
    data = checkpoint.read_bytes()
    obj = torch.load(checkpoint, weights_only=True)
    raw = obj["model"]["features.2.weight"].numpy().tobytes()
    pos = data.find(raw[:64])
    assert pos > 0
    bad = bytearray(data)
    bad[pos + 10] ^= 0xFF
    checkpoint.write_bytes(bytes(bad))
    with pytest.raises(artifacts.ArtifactError, match="corrupt") as ei:
        artifacts.load_source(str(checkpoint))
    assert str(checkpoint) in str(ei.value)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cli(*args) -> subprocess.CompletedProcess:
    """The real command line, in a fresh process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "binslt.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def _main(capsys, *args) -> tuple[int, str, str]:
    """binslt.cli.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from binslt import cli

    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, out: str, err: str, what: str) -> str:
    assert rc != 0, (rc, out, err)
    assert "Traceback" not in err + out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert what in lines[0], lines[0]
    return lines[0]


def test_cli_eval_on_corrupt_ticket(small, tmp_path, capsys):
    _, path = small
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    res = _cli("eval", cut, "--data", "digits")
    line = _one_line_error(res.returncode, res.stdout, res.stderr, "truncated")
    assert line.startswith("binslt eval: error:") and str(cut) in line
    flip = tmp_path / "flip.safetensors"
    b = bytearray(data)
    b[-5] ^= 0xFF
    flip.write_bytes(bytes(b))
    _one_line_error(*_main(capsys, "eval", flip, "--data", "digits"), "sha256")
    _one_line_error(*_main(capsys, "eval", tmp_path / "missing.safetensors"),
                    "no such ticket file")


def test_cli_export_then_eval(small, checkpoint, tmp_path, capsys):
    """`binslt export` of a run's checkpoint, then `binslt eval` of the ticket on digits: the
    accuracy equals the source model's, computed here in-process."""
    from binslt.training import data

    model, _ = small
    out = tmp_path / "t.safetensors"
    rc, stdout, err = _main(capsys, "export", checkpoint, "-o", out)
    assert rc == 0, err
    assert "x smaller" in stdout and out.is_file()
    cfg = tickets.read_ticket_metadata(out)["config"]
    assert cfg == json.loads(json.dumps(model.build_config))  # backend 'auto' kept, etc.
    rc, stdout, err = _main(capsys, "eval", out, "--data", "digits", "--limit", "64", "--json")
    assert rc == 0, err
    got = json.loads(stdout.strip().splitlines()[-1])
    bundle = data.load("digits")
    xs = torch.stack([bundle.test[i][0] for i in range(64)])
    ys = torch.tensor([int(bundle.test[i][1]) for i in range(64)])
    with torch.no_grad():
        correct = int((model(xs).argmax(1) == ys).sum())
    assert got["examples"] == 64 and got["correct"] == correct


def test_cli_export_of_corrupt_checkpoint(checkpoint, tmp_path, capsys):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 3])
    line = _one_line_error(*_main(capsys, "export", checkpoint, "-o", tmp_path / "t.safetensors"),
                           "corrupt")
    assert str(checkpoint) in line


def test_cli_eval_shape_mismatch(small, tmp_path, capsys):
    _, path = small  # a 1x8x8 ticket; an npz dataset of 3x8x8 images does not fit it
    import numpy as np

    npz = tmp_path / "rgb.npz"
    np.savez(npz, x=np.zeros((20, 8, 8, 3), dtype=np.uint8), y=np.arange(20) % 10)
    _one_line_error(*_main(capsys, "eval", path, "--data", f"npz:{npz}"),
                    "the ticket takes images [1, 8, 8]")


def test_mismatched_or_wrong_version_checkpoint(small, tmp_path, capsys):
    model, _ = small
    wrong = tmp_path / "wrong.pt"
    cfg = dict(model.build_config, num_classes=7)
    artifacts.atomic_torch_save({"format": artifacts.CHECKPOINT_FORMAT, "config": {},
                             "build_config": cfg, "model": model.state_dict()}, wrong)
    line = _one_line_error(*_main(capsys, "export", wrong, "-o", tmp_path / "t.safetensors"),
                           "do not match its build config")
    assert str(wrong) in line and "classifier.layer" in line
    newer = tmp_path / "newer.pt"
    artifacts.atomic_torch_save({"format": "binslt-checkpoint-v9", "build_config": cfg,
                             "model": model.state_dict()}, newer)
    with pytest.raises(artifacts.ArtifactError, match="binslt-checkpoint-v9") as ei:
        artifacts.load_source(str(newer))
    assert str(newer) in str(ei.value)
