"""``binslt::`` ops: schemas, fake kernels, backend selection and autograd.

Layering: raw kernels (``csrc/``, ``kernels/``) -> this package (typed wrappers, fake kernels,
autograd) -> modules (``binslt.nn``), which call only this package, once per layer call
(``spiking_layer``). What the ops accept is decided in one place, ``binslt.ops.contract``.

The rooms of this package:

* ``schemas``: the ``binslt::`` op schemas; ``contract``: what every backend accepts;
  ``reference``: the pure-torch oracle (backend ``torch``);
* ``library``: which compiled extensions are built and usable; ``registry``: the schema
  definitions, reference fallbacks, fake kernels, the lazily loaded Triton launchers
  (``triton``) and ``get_op``; ``cpu_algos``: the CPU algorithm configuration; ``plan``: the
  plan (algorithms) each CPU conv call takes, and its log;
* ``backend``: ``use_backend``, ``resolve_backend`` and the first-call fall-back (its state in
  ``fallback``) and what each backend's kernels can do (``CAPABILITIES``); ``autograd``: the
  autograd Functions; ``layer``: the layer-call entry points (the named paths, ``choose_path``,
  and the values a call reads: ``NeuronParams``, ``Weights``, ``Epilogue``, ``Geometry``);
  ``weights``: the search step's weight side;
* ``check``: every backend's ops against the reference on this machine (``binslt check``).
"""

from __future__ import annotations

from . import library as _ext  # noqa: F401  (part of the ops API: ops._ext)
from . import plan, reference, registry  # noqa: F401  (registry defines the binslt:: schemas)
from .autograd import (  # noqa: F401
    _KEEP,
    BNLIF,
    ConvLIF,
    SpikePool,
    _is_binary,
    _spike_pool,
    is_vmapped,
    keep_counts,
    max_abs_gain,
    spike_bits,
    values_unreadable,
)
from .backend import (  # noqa: F401
    CAPABILITIES,
    Capabilities,
    backends,
    capabilities,
    reset_backend_state,
    resolve_backend,
    use_backend,
)
from .contract import BACKENDS, counts_dtype  # noqa: F401
from .cpu_algos import (  # noqa: F401
    cpu_algorithms,
    cpu_cache_info,
    empty_cpu_cache,
    set_cpu_cache_limit,
)
from .layer import (  # noqa: F401
    INPUTS,
    PACK_VALIDATES,
    Epilogue,
    Geometry,
    NeuronParams,
    Path,
    Shortcut,
    Weights,
    bconv_affine_infer,
    bit_plane_current,
    bn_lif,
    check_finite,
    check_spikes,
    choose_path,
    conv_lif,
    infer_conv_lif,
    pack_spikes,
    run_auto,
    run_path,
    spike_sum_bits,
    spiking_layer,
    unpack_spikes,
    weight_need,
)
from .registry import get_op, load_triton  # noqa: F401
from .weights import masked_sign_weight, onednn_conv_available, pack_weight, topk_mask  # noqa: F401
