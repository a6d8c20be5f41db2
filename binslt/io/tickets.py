"""Packed ticket files: export a found ticket in 2 bits per weight, load it for inference.

A ticket file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file holding

* for every masked sign-weight layer (``BinSpikeConv2d``, ``BinSpikeLinear``, ``BinConv2d``,
  ``BinLinear``) under its state-dict prefix ``P``: ``P.w_mask_bits`` and ``P.w_pos_bits``, the
  int32 bit planes of ``binslt::pack_weight`` (``[C_out, kh, kw, ceil(C_in/32)]``, linear layers
  as ``kh = kw = 1``; bit ``c % 32`` of word ``c // 32``), and ``P.alpha`` (``[C_out]`` float32,
  the gain). The latent real weights and the scores are *not* stored: W_eff = alpha * sign * M
  is all inference needs;
* every other state-dict tensor as it is: BatchNorm running statistics (and affine parameters if
  any), dense (non-binarised) layer weights;
* string metadata: ``format`` (``"binslt-ticket"``), ``format_version`` (``"1"``), ``config``
  (JSON of ``model.build_config``: ``binslt.models.build(**config)`` rebuilds the network),
  ``layers`` (JSON: per masked layer its type, weight shape, input kind and neuron settings),
  ``binslt_version``, and ``sha256``: a digest of all other metadata and of every tensor's name,
  dtype, shape and bytes. safetensors itself checks the header and the offsets; the digest
  catches flipped bytes in the tensor data, which safetensors cannot see.

Every ``binslt search`` / ``train`` / ``finetune`` run writes its final network in this format
(``RUN/ticket.safetensors``); ``binslt export`` writes the same file from a checkpoint. A dense
model (ann, snn) has no masked layer, so its ticket holds its state dict's tensors unpacked.

:func:`load_ticket` rebuilds the network, checks the file (format, version, digest, tensor names,
shapes, dtypes and the bit planes' invariants) and returns the model in ``'frozen'`` mode and in
eval mode. Any problem raises :class:`TicketError` naming the file and what is wrong.

Which layers of a loaded ticket compute from the packed bits (CPU / CUDA backends, under
``torch.no_grad()`` or ``torch.inference_mode()``):

* ``BinSpikeConv2d`` and ``BinSpikeLinear`` with spike input: yes. The input spikes are packed
  and ``binslt::bconv_lif`` runs on the stored mask/sign planes (AND + popcount); the weights are
  never unpacked to float.
* ``BinSpikeConv2d`` / ``BinSpikeLinear`` with ``input='real'`` (the first layer, which sees
  images): no. A dense float convolution needs float weights, so the planes are unpacked to
  ``alpha * sign * M`` for that call (C_out x C_in x 3 x 3, e.g. 1,728 values in Conv-4).
* ``BinLinear`` (the classifier) and ``BinConv2d`` (ResNet shortcuts, BNN baseline): no. They
  output a real current with no neuron, and their input may be real, so they run ``F.linear`` /
  ``F.conv2d`` on unpacked weights. This also keeps the logits bit-identical to the searched
  model's, which computes them the same way.
* With gradients enabled, or on the ``torch`` backend, every layer unpacks (the reference path).

The loaded model keeps no latent weights: each masked layer's ``weight`` and ``scores`` are
zero-stride placeholders (one float of storage) that only carry the shape, dtype and device.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..nn.layers import BinSpikeConv2d, BinSpikeLinear, _MaskedSignWeight
from .artifacts import ArtifactError, PathLike, atomic_write_bytes, first_line, rebuild_model

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "TicketError", "export_ticket", "load_ticket",
           "read_ticket_metadata", "fp32_state_dict_bytes", "STRUCTURE_FROM_MODEL"]

FORMAT_NAME = "binslt-ticket"
FORMAT_VERSION = 1

PACKED_KEYS = ("w_mask_bits", "w_pos_bits", "alpha")
_LATENT_KEYS = ("weight", "scores", "mask")  # masked layers' fp32 tensors a ticket drops
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives

#: config ``arch`` -> ``fn(config, model, backend, path)``: the network a ticket of that arch
#: loads into, made from the ``model=`` given to :func:`load_ticket` (its structure comes from
#: the user's code). ``binslt.interop.convert`` registers ``'converted'`` (SpikingJelly models).
STRUCTURE_FROM_MODEL: dict[str, Callable[..., nn.Module]] = {}


class TicketError(ArtifactError):
    """A ticket file is unusable: missing, truncated, corrupt, of another format version, or
    inconsistent with its own config. The message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _masked_layers(model: nn.Module) -> dict[str, _MaskedSignWeight]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _MaskedSignWeight)}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _packed_shape(weight_shape: torch.Size) -> tuple[int, int, int, int]:
    """Shape of pack_weight's planes for a [Co, Ci, kh, kw] or [O, F] weight."""
    co, ci = weight_shape[0], weight_shape[1]
    kh, kw = (weight_shape[2], weight_shape[3]) if len(weight_shape) == 4 else (1, 1)
    return co, kh, kw, (ci + 31) // 32


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (but ``sha256``) and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256()
    for k in sorted(metadata):
        if k != "sha256":
            h.update(f"meta\0{k}\0{metadata[k]}\0".encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"tensor\0{k}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _layer_record(m: _MaskedSignWeight) -> dict[str, Any]:
    rec: dict[str, Any] = {"type": type(m).__name__, "weight_shape": list(m.weight.shape),
                           "per_channel_gain": m.per_channel_gain, "prune_rate": m.prune_rate}
    if isinstance(m, (BinSpikeConv2d, BinSpikeLinear)):
        rec["input"] = m.input
        rec["neuron"] = m.neuron.record()  # JSON values: an IF record has no tau (+inf)
        rec["packed_inference"] = m.input == "spike"
    else:
        rec["packed_inference"] = False
    return rec


def fp32_state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's state-dict tensors as an fp32 network stores them: every tensor's
    ``numel * element_size``, counting each masked layer's weight once (its search-time scores,
    a same-sized aid, and any mask or packed buffers are left out). This is what a ticket is
    compared against."""
    skip = set()
    for name in _masked_layers(model):
        p = _prefix(name)
        skip.update(p + k for k in ("scores", "mask", *PACKED_KEYS))
    total = 0
    for k, t in model.state_dict().items():
        if k not in skip:
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_ticket(model: nn.Module, path: PathLike) -> dict[str, Any]:
    """Write ``model`` as a packed ticket file at ``path`` (safetensors) and describe it.

    ``model`` must carry ``build_config`` (networks from :func:`binslt.models.build` do). Masked
    layers not yet in ``'frozen'`` mode are frozen on a copy; ``model`` itself is not changed.
    The file is written atomically (temporary file, then rename).

    Args:
        model (nn.Module): a network of :func:`binslt.models.build` (images [N, C, H, W] ->
            logits [N, num_classes]), in any mode.
        path (str or os.PathLike): the ``.safetensors`` file to write.

    Returns a dict: ``path``, ``ticket_bytes`` (file size), ``fp32_bytes``
    (:func:`fp32_state_dict_bytes` of the model), ``torch_save_bytes`` (``torch.save`` of the
    model's full state dict, scores included, as a search checkpoint holds it), ``ratio``
    (fp32_bytes / ticket_bytes), ``packed_layers`` and ``dense_tensors`` (names).

    Example:
        >>> import os, tempfile, torch
        >>> import binslt
        >>> net = binslt.models.build("conv4", "binwslt", num_classes=10, in_channels=1,
        ...                           input_size=8, timesteps=2).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "conv4.safetensors")
        >>> info = binslt.export_ticket(net, path)
        >>> info["ticket_bytes"] < info["fp32_bytes"]
        True
    """
    from safetensors.torch import save as st_save

    from .. import __version__

    config = getattr(model, "build_config", None)
    if not isinstance(config, dict):
        raise TypeError("export_ticket needs a network built by binslt.models.build (it reads "
                        "model.build_config to rebuild the network at load time); got a "
                        f"{type(model).__name__} without one")
    try:
        config_json = json.dumps(config, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"model.build_config is not JSON-serialisable: {exc}") from None

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch_save_bytes = buf.getbuffer().nbytes
    fp32_bytes = fp32_state_dict_bytes(model)

    frozen = copy.deepcopy(model).cpu()
    layers = _masked_layers(frozen)
    for m in layers.values():
        m.mode = "frozen"
    drop = {_prefix(n) + k for n in layers for k in _LATENT_KEYS}
    tensors = {k: v.detach().cpu().contiguous().clone()
               for k, v in frozen.state_dict().items() if k not in drop}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": config_json,
        "layers": json.dumps({n: _layer_record(m) for n, m in layers.items()}, sort_keys=True),
        "binslt_version": __version__,
    }
    metadata["sha256"] = _digest(metadata, tensors)
    path = Path(path)
    data = st_save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    packed = sorted(layers)
    dense = sorted(k for k in tensors if not any(k == _prefix(n) + pk for n in layers
                                                 for pk in PACKED_KEYS))
    return {"path": str(path), "ticket_bytes": len(data), "fp32_bytes": fp32_bytes,
            "torch_save_bytes": torch_save_bytes, "ratio": fp32_bytes / len(data),
            "packed_layers": packed, "dense_tensors": dense}


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, or TicketError."""
    from safetensors import safe_open

    if not path.exists():
        raise TicketError(f"{str(path)!r}: no such ticket file")
    if not path.is_file():
        raise TicketError(f"{str(path)!r} is not a file (give a .safetensors ticket: a run's "
                          "ticket.safetensors or what `binslt export` wrote)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        raise TicketError(f"{str(path)!r} is a torch.save file (a checkpoint, or an older run's "
                          "ticket.pt), not a packed ticket; convert it with `binslt export`")
    if len(head) < 8:
        raise TicketError(f"{str(path)!r} is truncated or not a ticket ({len(head)} bytes; a "
                          "safetensors file starts with an 8-byte header length)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ...
        raise TicketError(f"{str(path)!r} is corrupt or truncated (not a readable safetensors "
                          f"file: {first_line(exc)})") from None
    return metadata or {}, tensors


def read_ticket_metadata(path: PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The parsed metadata of a ticket file: ``format``, ``format_version`` (int), ``config``
    and ``layers`` (dicts), ``binslt_version``, ``file_bytes``. ``verify`` checks the digest.
    Raises :class:`TicketError`."""
    path = Path(path)
    meta, tensors = _read(path)
    return _check_metadata(path, meta, tensors, verify)


def _check_metadata(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor],
                    verify: bool) -> dict[str, Any]:
    p = repr(str(path))
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise TicketError(f"{p} is not a binslt ticket (metadata format is {fmt!r}, expected "
                          f"{FORMAT_NAME!r})")
    ver = meta.get("format_version")
    try:
        ver_i = int(ver)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TicketError(f"{p}: unreadable ticket format version {ver!r}") from None
    if ver_i != FORMAT_VERSION:
        from .. import __version__

        hint = "a newer binslt wrote it; upgrade binslt" if ver_i > FORMAT_VERSION else \
            "re-export it with this binslt"
        raise TicketError(f"{p}: ticket format version {ver_i} is not supported (binslt "
                          f"{__version__} reads version {FORMAT_VERSION}); {hint}")
    if verify:
        want = meta.get("sha256")
        if not want:
            raise TicketError(f"{p}: the ticket has no sha256 digest in its metadata")
        got = _digest(meta, tensors)
        if got != want:
            raise TicketError(f"{p} is corrupt: its contents do not match the sha256 digest "
                              "recorded at export (bytes changed after it was written)")
    out: dict[str, Any] = {"format": fmt, "format_version": ver_i,
                           "binslt_version": meta.get("binslt_version")}
    for key in ("config", "layers"):
        try:
            val = json.loads(meta.get(key, ""))
        except json.JSONDecodeError as exc:
            raise TicketError(f"{p}: metadata {key!r} is not valid JSON ({exc})") from None
        if not isinstance(val, dict):
            raise TicketError(f"{p}: metadata {key!r} must be a JSON object, got "
                              f"{type(val).__name__}")
        out[key] = val
    for k in ("arch", "variant"):
        if k not in out["config"]:
            raise TicketError(f"{p}: metadata 'config' lacks {k!r}; it cannot rebuild a network")
    out["file_bytes"] = path.stat().st_size
    return out


def _placeholder(like: torch.Tensor) -> nn.Parameter:
    """A zero-stride zero tensor with ``like``'s shape, dtype and device (one element stored)."""
    z = torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)
    return nn.Parameter(z, requires_grad=False)


def _check_tensors(p: str, model: nn.Module, layers: dict[str, _MaskedSignWeight],
                   records: dict[str, Any], tensors: dict[str, torch.Tensor], arch: str) -> None:
    sd = model.state_dict()
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    latent = {_prefix(n) + k for n in layers for k in _LATENT_KEYS}
    for k, t in sd.items():
        if k not in latent:
            expected[k] = (tuple(t.shape), t.dtype)
    for n, m in layers.items():
        shp = _packed_shape(m.weight.shape)
        expected[_prefix(n) + "w_mask_bits"] = (shp, torch.int32)
        expected[_prefix(n) + "w_pos_bits"] = (shp, torch.int32)
        expected[_prefix(n) + "alpha"] = ((shp[0],), torch.float32)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
        raise TicketError(f"{p} does not match its config ({arch}): " + "; ".join(parts))
    for k, (shape, dtype) in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise TicketError(f"{p} does not match its config ({arch}): tensor {k!r} is "
                              f"{t.dtype} {list(t.shape)}, the network needs {dtype} "
                              f"{list(shape)}")
    for n, m in layers.items():
        pre = _prefix(n)
        mask, pos = tensors[pre + "w_mask_bits"], tensors[pre + "w_pos_bits"]
        if bool((pos & ~mask).any()):
            raise TicketError(f"{p}: layer {n!r} has sign bits set where its mask bits are not "
                              "(invalid bit planes)")
        ci = m.weight.shape[1]
        if ci % 32:
            high = torch.tensor(-1 << (ci % 32), dtype=torch.int64).to(torch.int32)
            if bool((mask[..., -1] & high).any()):
                raise TicketError(f"{p}: layer {n!r} has mask bits set beyond its {ci} input "
                                  "channels (invalid bit planes)")
        alpha = tensors[pre + "alpha"]
        if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()):
            raise TicketError(f"{p}: layer {n!r} has a negative or non-finite gain alpha")
        rec = records.get(n)
        if not isinstance(rec, dict) or rec.get("type") != type(m).__name__:
            raise TicketError(f"{p}: metadata 'layers' has no matching record for layer {n!r} "
                              f"({type(m).__name__})")
        if rec.get("weight_shape") != list(m.weight.shape):
            raise TicketError(f"{p} does not match its config ({arch}): layer {n!r} was "
                              f"exported with weight shape {rec.get('weight_shape')}, the "
                              f"network needs {list(m.weight.shape)}")
        if "input" in rec and getattr(m, "input", None) != rec["input"]:
            raise TicketError(f"{p}: layer {n!r} was exported with input={rec['input']!r} but "
                              f"the config builds input={getattr(m, 'input', None)!r}")
    stale = sorted(set(records) - set(layers))
    if stale:
        raise TicketError(f"{p}: metadata 'layers' names layers the config does not build: "
                          f"{stale[:5]}")


def load_ticket(path: PathLike, *, model: Optional[nn.Module] = None,
                device: Union[str, torch.device] = "cpu",
                backend: str | None = None) -> nn.Module:
    """Load a ticket written by :func:`export_ticket`: a ready model in ``'frozen'`` mode, eval.

    The network is rebuilt with ``binslt.models.build(**config)`` and loaded from the file; each
    binslt layer's neuron settings are restored from the file. ``backend`` (e.g. ``'cpu'``,
    ``'torch'``) overrides the config's. Run inference under ``torch.no_grad()`` /
    ``torch.inference_mode()`` to take the packed path (see the module docstring). Outputs are
    identical to those of the model that was exported (in eval mode).

    ``model``: the network's structure from the user's code, as for a PyTorch state dict. A
    ticket of a model converted by ``binslt.convert`` needs it: the unconverted SpikingJelly
    model (``load_ticket(path, model=factory())``), which is converted again with the recorded
    settings (a copy). For other tickets it replaces the rebuild from the config.

    Args:
        path (str or os.PathLike): a ticket file of :func:`export_ticket`.
        device (str or torch.device): where the model's tensors go.
        backend (str or None): the binslt layers' kernel backend (None: the file's).
        model (torch.nn.Module or None): the network's structure from the user's code (above).

    Returns:
        The :class:`binslt.models.BinSLTNet`: images [N, C, H, W] -> logits [N, num_classes].

    Raises:
        TicketError: the file is missing, truncated, corrupt (digest mismatch), of another
            format version, or does not match its own config; the message names the file.

    Example:
        >>> import os, tempfile, torch
        >>> import binslt
        >>> torch.manual_seed(0) and None
        >>> net = binslt.models.build("conv4", "binwslt", num_classes=10, in_channels=1,
        ...                           input_size=8, timesteps=2).eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "conv4.safetensors")
        >>> _ = binslt.export_ticket(net, path)
        >>> ticket = binslt.load_ticket(path)
        >>> x = torch.rand(2, 1, 8, 8)  # images [N, C, H, W]
        >>> with torch.no_grad():
        ...     y = ticket(x)
        ...     same = torch.equal(y, net(x))
        >>> y.shape, same
        (torch.Size([2, 10]), True)
    """
    path = Path(path)
    p = repr(str(path))
    meta, tensors = _read(path)
    info = _check_metadata(path, meta, tensors, verify=True)
    config = dict(info["config"])
    structure = STRUCTURE_FROM_MODEL.get(config.get("arch"))
    if structure is not None:
        model = structure(config, model, backend, path)
    elif model is None:
        model = rebuild_model(config, backend, path=path, error=TicketError)
    layers = _masked_layers(model)
    _check_tensors(p, model, layers, info["layers"], tensors, config.get("arch", "?"))

    # Masked layers switch to 'frozen' as their packed buffers load (_MaskedSignWeight).
    result = model.load_state_dict(tensors, strict=False)
    latent = {_prefix(n) + k for n in layers for k in _LATENT_KEYS}
    left = sorted(set(result.missing_keys) - latent)
    if left or result.unexpected_keys:  # pragma: no cover - _check_tensors covers this
        raise TicketError(f"{p} does not load: missing {left[:5]}, unexpected "
                          f"{result.unexpected_keys[:5]}")
    for n, m in layers.items():
        if m.mode != "frozen":  # pragma: no cover - the packed buffers set it
            raise TicketError(f"{p}: layer {n!r} did not load as a frozen layer")
        m.weight = _placeholder(m.weight)
        m.scores = _placeholder(m.scores)
        rec = info["layers"][n]
        if "neuron" in rec and hasattr(m, "neuron"):
            try:
                m.neuron.load_record(rec["neuron"])
            except (KeyError, AttributeError, TypeError, ValueError) as exc:
                raise TicketError(f"{p}: bad neuron settings for layer {n!r} ({exc})") from None
    model.eval()
    model.ticket_info = info  # type: ignore[attr-defined]
    return model.to(device)
