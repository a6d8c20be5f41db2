"""Backend choice: ``use_backend``, ``resolve_backend`` (auto's order, ``BINSLT_BACKEND``,
``BINSLT_DISABLE_BACKENDS``; binslt.ops.fallback holds the state), the first-call fall-back of
an auto-chosen backend (``_run_auto``, ``_backward_op``), ``backends()`` and what each backend's
kernels can do (``CAPABILITIES``, ``capabilities``)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import contract as C
from . import fallback as _fb
from . import library as _ext
from .registry import get_op, load_triton


def backends() -> dict[str, dict]:
    """{'torch'|'cpu'|'triton'|'cuda': {'built': bool, 'usable': bool, 'reason': str}}, after
    trying the Triton launchers (so that 'usable' is what a layer would find: a backend
    ``BINSLT_DISABLE_BACKENDS`` names, or whose first call failed here, is not).

    Args: none. The backends run the same ``binslt::`` ops on tensors of any shape the ops
    take (e.g. spikes [T, N, C, H, W]); ``'torch'``, the pure-PyTorch reference, is always
    usable.

    Example:
        >>> import binslt
        >>> status = binslt.backends()
        >>> sorted(status)
        ['cpu', 'cuda', 'torch', 'triton']
        >>> status["torch"]["usable"], sorted(status["torch"])
        (True, ['built', 'reason', 'usable'])
    """
    if _ext.load()["triton"]["built"]:
        load_triton()
    out = _ext.backends()
    env = _fb.settings()
    for be, st in out.items():
        if be in env["disabled"]:
            st.update(usable=False, reason=f"disabled by {_fb.ENV_DISABLE}; {st['reason']}")
        elif be in _fb.FAILED:
            st.update(usable=False, reason=f"failed its first call here ({_fb.FAILED[be]})")
    return out


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------

_override = threading.local()
_override.backend = None  # set here, so that a trace in the main thread reads a value


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, layers whose ``backend`` is 'auto' use ``backend`` instead (this
    thread; layers built with a named backend keep theirs).

    Args:
        backend (str): one of ``'auto'``, ``'torch'``, ``'cpu'``, ``'triton'``, ``'cuda'``.

    Raises:
        ValueError: an unknown backend name.

    Example:
        >>> import torch
        >>> import binslt
        >>> layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1)  # backend='auto'
        >>> x = (torch.rand(2, 1, 2, 6, 6) > 0.5).float()  # spikes [T, N, C, H, W]
        >>> with binslt.use_backend("torch"):
        ...     y = layer(x)
        >>> y.shape  # [T, N, C_out, H, W]
        torch.Size([2, 1, 4, 6, 6])
    """
    C.check_backend(backend)
    prev = getattr(_override, "backend", None)
    _override.backend = backend
    try:
        yield
    finally:
        _override.backend = prev


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map 'auto' (or a use_backend override, or ``BINSLT_BACKEND``) to a concrete backend usable
    for ``device``. auto's order (binslt._fallback) skips the backends ``BINSLT_DISABLE_BACKENDS``
    names, those found failing (their first call, or ``binslt check``'s verdict) and the
    unusable ones; a disabled backend asked for by name raises.

    A torch.compile trace takes the answer as a constant of its graph, made by this same code
    run eagerly (reading the verdict) and not traced: the graph holds no guard on binslt's
    caches and settings, which the first eager call fills (an evaluation between compiled
    training steps would otherwise compile the graph again). A ``use_backend`` block is read
    in the trace, so a graph compiled inside one is guarded on it."""
    C.check_backend(backend)
    if backend == "auto":
        backend = getattr(_override, "backend", None) or "auto"
    if torch.compiler.is_compiling():
        return _resolve_for_trace(backend, device)
    return _resolve(backend, device)


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto":
        backend = _fb.settings()["forced"] or "auto"
    if backend == "auto":
        return _auto_choice(device)
    _fb.check_enabled(backend)
    st = _ext.load()  # read only (backends() copies it; this runs on every layer call)
    if backend == "torch":
        return backend
    if not st[backend]["built"]:
        raise RuntimeError(f"backend {backend!r} is not available: {st[backend]['reason']}")
    if backend == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' needs CPU tensors, got a tensor on {device}; use "
                           "backend='auto', 'cuda' or 'triton' for GPU tensors")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got a tensor on {device}")
    if backend == "triton":
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interp:
            raise RuntimeError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                               "(set before triton is imported) to run on the CPU")
        err = load_triton()
        if err:
            raise RuntimeError(f"backend 'triton' failed to load: {err}")
    return backend


_AUTO: dict[torch.device, str] = {}  # auto's choice per device (cleared when one fails)


def _auto_choice(device: torch.device) -> str:
    be = _AUTO.get(device)  # one dict lookup per layer call once chosen
    if be is None:
        be = _AUTO[device] = _choose_auto(device)
    return be


_resolve_for_trace = torch.compiler.assume_constant_result(_resolve)


def _choose_auto(device: torch.device, verdict: bool = True) -> str:
    st = _ext.load()
    env = _fb.settings()
    order = _fb.AUTO_ORDER.get(device.type, ("torch",))
    skipped = {}
    for be in order:
        if be in env["disabled"]:
            skipped[be] = f"disabled by {_fb.ENV_DISABLE}"
        elif be in _fb.FAILED:
            skipped[be] = f"failed its first call ({_fb.FAILED[be]})"
        elif be != "torch" and not st[be]["usable"]:
            skipped[be] = st[be]["reason"]
        elif be != "torch" and verdict and be in _fb.verdict_skips(device):
            skipped[be] = _fb.verdict_skips(device)[be]
        elif be == "triton" and load_triton():  # a failed import marks it unusable
            skipped[be] = st[be]["reason"]
        else:
            return be
    why = "; ".join(f"{b}: {r}" for b, r in skipped.items())
    raise RuntimeError(f"backend 'auto' has no backend left for {device} ({why})")


def _is_auto(backend: str) -> bool:
    """Whether ``backend`` resolves by auto's order (no use_backend block, no BINSLT_BACKEND)."""
    return (backend == "auto" and getattr(_override, "backend", None) is None
            and _fb.settings()["forced"] is None)


_FIRST = threading.local()  # .auto: inside an auto-chosen backend's first call


def _run_auto(backend: str, device: torch.device, run):
    """``run(be)`` on the backend ``backend`` resolves to. A backend auto chose whose first call
    fails recoverably (binslt.ops.fallback.recoverable) is marked failed, with one warning, and the
    call runs again on the next backend of auto's order; after a backend's first successful
    call (and for explicit backends) errors are raised as usual. The per-call cost once proven:
    one set lookup."""
    be = resolve_backend(backend, device)
    if torch.compiler.is_compiling() or be in _fb.PROVEN or not _is_auto(backend):
        return run(be)
    while True:
        _FIRST.auto = True
        try:
            out = run(be)
        except Exception as exc:
            if not _fb.recoverable(exc):
                raise
            _fb.mark_failed(be, exc, device)
            _AUTO.clear()
            be = resolve_backend(backend, device)
            continue
        finally:
            _FIRST.auto = False
        _fb.PROVEN.add(be)
        return out


def _backward_op(name: str, ctx, *args):
    """The backward op ``name`` of ``ctx.backend``. Where auto chose the backend and its first
    backward fails recoverably, the backend is marked failed and the same schema runs on the
    next backend of auto's order (every backend implements every schema)."""
    be = ctx.backend
    if torch.compiler.is_compiling() or not ctx.auto or be in _fb.PROVEN_BWD:
        return get_op(name, be)(*args)
    device = args[0].device
    while True:
        try:
            out = get_op(name, be)(*args)
        except Exception as exc:
            if not _fb.recoverable(exc) or be == "torch":
                raise
            _fb.mark_failed(be, exc, device)
            _AUTO.clear()
            be = _choose_auto(device)
            continue
        _fb.PROVEN_BWD.add(be)
        return out


def reset_backend_state() -> None:
    """Read ``BINSLT_BACKEND``, ``BINSLT_DISABLE_BACKENDS`` and ``binslt check``'s verdict again
    and forget the backends found failing in this process."""
    _fb.reset()
    _AUTO.clear()


# ---------------------------------------------------------------------------------------------
# What each backend can do: the one table the layer call reads
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels do beyond the shared schemas, as the layer call
    (``binslt.ops.layer``) reads it.

    * ``autograd_reference``: every layer call runs the pure-torch autograd reference (no
      packed no-grad path, no kernels);
    * ``pack_validates``: ``pack_spikes`` rejects non-binary input as it packs (for free), so
      the layer call skips its own full-tensor check;
    * ``fused_pool2``: the fused autograd op pools 2x2 itself (``ConvLIF(pool=2)``), its backward
      kernel routing the pooled gradient;
    * ``pool2_op``: the training 2x2 pool runs as ``binslt::spike_pool2``, a kernel of its own
      (the pooled spikes and the packed unpooled ones in one pass), not as torch's maxima and
      the backend's ``pack_spikes``;
    * ``packed_residual``: the no-grad inference kernel reads a residual of packed spike words;
    * ``batch_as_row``: a linear layer on spikes runs with the batch laid out as the pixels of a
      1 x N image (the kernels' rows run over the batch instead of being 1 wide);
    * ``search_planes``: the fused op takes W_eff's bit planes and gain from the search pass
      that wrote them (``binslt::sign_gain_pack``) instead of packing W_eff again;
    * ``fused_real_infer``: a real-input conv's no-grad eval epilogue + LIF (+ pool, + pack) is
      one ``binslt::bn_lif_infer`` pass;
    * ``channels_last_current``: the fused real-input conv (``fused_real_infer``) of images of
      at most ``layer.CHANNELS_LAST_MAX_CHANNELS`` channels runs channels-last, and
      ``binslt::bn_lif_infer`` reads that current per pixel (with AVX-512; else one contiguous
      copy);
    * ``fused_shortcut``: a no-grad spike conv whose residual is a ``Shortcut`` (a ResNet
      block's shortcut conv) runs ``binslt::bconv_lif_infer_shortcut``, which computes the
      shortcut beside its own conv (on the CPU with AMX-INT8, a chunk of images at a time)
      instead of taking its float map;
    * ``bit_planes``: integer spike-sum input without autograd runs as bit planes through the
      spike kernels by default (``Path.SPIKE_SUM_BITS``) instead of the real-input route.
      The CPU keeps the real-input route by default: on a 2-core AMD EPYC (AVX2), a no-grad
      BinSpikeConv2d 3x3 call, T=4, N=16, eval BN, the bit planes win only for few planes and
      many channels (one thread, CPU time: C=128 16x16, values 0..2, 30 % nonzero: 47 vs 72 ms;
      C=256 8x8: 24 vs 74 ms) and lose elsewhere (C=128, values 0..4: 75 vs 66 ms; C=64 32x32:
      127 vs 73 ms; two threads, wall time: 1.0-2.1x slower at every one of these shapes).
    * ``int8_counts``: the fused op's backward kernel reads the saved integer counts as int8, so
      ``ConvLIF`` saves them so where every one fits;
    * ``residual_bits``: ``ConvLIF`` saves a residual of spikes packed (one bit a value, the
      backend's ``pack_spikes``), and its ``bconv_lif_bwd`` reads the words as the residual (the
      reference's unpacks them);
    * ``strided_current``: the ``bn_lif`` kernels read a current expanded over T (time stride 0)
      as it is, when it is float32 with a contiguous step (``BNLIF`` neither copies it T-fold in
      the forward nor in the backward).
    """

    autograd_reference: bool = False
    pack_validates: bool = False
    fused_pool2: bool = False
    pool2_op: bool = False
    packed_residual: bool = False
    batch_as_row: bool = False
    search_planes: bool = False
    fused_real_infer: bool = False
    channels_last_current: bool = False
    fused_shortcut: bool = False
    bit_planes: bool = False
    int8_counts: bool = False
    residual_bits: bool = False
    strided_current: bool = False


CAPABILITIES: dict[str, Capabilities] = {
    "torch": Capabilities(autograd_reference=True),
    "cpu": Capabilities(pack_validates=True, fused_pool2=True, pool2_op=True,
                        packed_residual=True, batch_as_row=True, search_planes=True,
                        fused_real_infer=True, channels_last_current=True,
                        fused_shortcut=True, int8_counts=True,
                        residual_bits=True, strided_current=True),
    "triton": Capabilities(),
    "cuda": Capabilities(),
}


def capabilities(backend: str) -> Capabilities:
    """The ``Capabilities`` of a concrete backend ('torch', 'cpu', 'triton' or 'cuda')."""
    try:
        return CAPABILITIES[backend]
    except KeyError:
        raise ValueError(f"capabilities: a concrete backend is one of {tuple(CAPABILITIES)}, "
                         f"got {backend!r}") from None
