"""Which backend ``backend='auto'`` takes, and what happens when a kernel backend cannot run here.

* ``BINSLT_BACKEND`` names what ``auto`` resolves to (as ``binslt.use_backend`` does inside a
  block, which takes precedence); ``BINSLT_DISABLE_BACKENDS`` (a comma list, e.g. ``cuda,triton``)
  names backends ``auto`` never takes and an explicit request refuses.
* The verdict of ``binslt check`` (``verdict_path()``), when its key (torch, Triton, device, build)
  matches this process, removes the backends it found failing from ``auto``'s order, with one
  warning.
* A backend ``auto`` chose whose first call fails *recoverably* (``recoverable``: no kernel image
  for this GPU, a Triton compilation error, out of shared memory or registers) is marked failed
  with one warning and the next backend of the order takes the call; after its first successful
  call a backend's errors are raised as usual.

The state is read once (``reset()`` reads the environment and the verdict again).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import warnings
from pathlib import Path

import torch

from .. import __version__
from . import library as _ext

#: auto's order by device type; 'torch' (the reference) runs anywhere.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
KERNEL_BACKENDS = ("cpu", "triton", "cuda")

ENV_BACKEND = "BINSLT_BACKEND"
ENV_DISABLE = "BINSLT_DISABLE_BACKENDS"
ENV_CACHE = "BINSLT_CACHE_DIR"
VERDICT_FILE = "check.json"


class BackendSettingError(ValueError):
    """A bad ``BINSLT_BACKEND`` / ``BINSLT_DISABLE_BACKENDS`` (the command line prints one
    line, exit status 2)."""


class BackendFallbackWarning(RuntimeWarning):
    """A backend auto would take is skipped: it failed its first call, or ``binslt check``."""


# Messages of CUDA / driver errors that say a kernel cannot run on this device (a build for
# other architectures, too many registers or too much shared memory for a launch) while the
# device itself is fine: another backend can take over.
RECOVERABLE_MESSAGES = (
    "no kernel image is available",  # cudaErrorNoKernelImageForDevice
    "invalid device function",  # cudaErrorInvalidDeviceFunction (arch mismatch)
    "too many resources requested for launch",  # cudaErrorLaunchOutOfResources (registers)
    "unsupported toolchain",  # cudaErrorUnsupportedPtxVersion (PTX newer than the driver)
    "out of resource:",  # triton.runtime.errors.OutOfResources wrapped by torch.library
)
# Errors after which the CUDA context (or the process' memory) cannot be trusted: never retried.
FATAL_MESSAGES = ("illegal memory access", "device-side assert", "misaligned address",
                  "illegal instruction", "unspecified launch failure", "out of memory")


def _triton_error_types() -> tuple[type, ...]:
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except Exception:  # pragma: no cover - no triton
        return ()
    return (CompilationError, OutOfResources, PTXASError)


def recoverable(exc: BaseException) -> bool:
    """Whether ``exc`` from a backend's first call means "this backend cannot run here" (another
    backend may take over): Triton's CompilationError, OutOfResources and PTXASError, and a
    RuntimeError whose message is one of RECOVERABLE_MESSAGES. Out of memory
    (torch.OutOfMemoryError) and errors that leave the CUDA context broken (illegal memory
    access, device-side assert, ...) are not; nor is anything else (bad arguments: ValueError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    msg = str(exc).lower()
    if any(m in msg for m in FATAL_MESSAGES):
        return False
    if isinstance(exc, _triton_error_types()):
        return True
    return isinstance(exc, RuntimeError) and any(m in msg for m in RECOVERABLE_MESSAGES)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

_STATE: dict = {}


def _parse_env() -> dict:
    from .contract import BACKENDS

    forced = os.environ.get(ENV_BACKEND, "").strip() or None
    if forced is not None and forced not in BACKENDS:
        raise BackendSettingError(f"{ENV_BACKEND}={forced!r}: must be one of {BACKENDS}")
    raw = os.environ.get(ENV_DISABLE, "")
    disabled = frozenset(b.strip() for b in raw.split(",") if b.strip())
    bad = sorted(disabled - set(BACKENDS) | (disabled & {"auto"}))
    if bad:
        raise BackendSettingError(f"{ENV_DISABLE}={raw!r}: unknown backend(s) {bad}; names are "
                         f"{BACKENDS[1:]}")
    if forced is not None and forced in disabled:
        raise BackendSettingError(f"{ENV_BACKEND}={forced!r} names a backend that "
                                  f"{ENV_DISABLE}={raw!r} disables")
    return {"forced": None if forced == "auto" else forced, "disabled": disabled, "raw": raw}


def settings() -> dict:
    """{'forced': BINSLT_BACKEND or None, 'disabled': frozenset, 'raw': the disable list}."""
    env = _STATE.get("env")
    if env is None:
        env = _STATE["env"] = _parse_env()
    return env


def check_enabled(backend: str) -> None:
    """Raise RuntimeError if ``BINSLT_DISABLE_BACKENDS`` names ``backend``."""
    env = settings()
    if backend in env["disabled"]:
        raise RuntimeError(f"backend {backend!r} is disabled by {ENV_DISABLE}={env['raw']!r}; "
                           f"remove it from that list to use it")


# ---------------------------------------------------------------------------------------------
# Backends found failing in this process
# ---------------------------------------------------------------------------------------------

FAILED: dict[str, str] = {}  # backend -> why (its first call failed recoverably)
PROVEN: set[str] = {"torch"}  # backends whose first call (forward) succeeded in this process
PROVEN_BWD: set[str] = {"torch"}  # ... and whose first backward succeeded


def mark_failed(backend: str, exc: BaseException, device: torch.device) -> None:
    """Record that ``backend`` cannot run here, with one warning."""
    if backend in FAILED:
        return
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    FAILED[backend] = f"{type(exc).__name__}: {first}"
    warnings.warn(f"binslt: backend {backend!r} failed on its first call on {device} "
                  f"({FAILED[backend]}); backend 'auto' falls back to the next backend from now "
                  f"on (set {ENV_DISABLE}={backend} to skip it from the start; `binslt check` "
                  f"tests every backend here)", BackendFallbackWarning, stacklevel=4)


def reset() -> None:
    """Forget the environment, the verdict and the backends found failing (read them again)."""
    _STATE.clear()
    FAILED.clear()
    PROVEN.clear()
    PROVEN.add("torch")
    PROVEN_BWD.clear()
    PROVEN_BWD.add("torch")


# ---------------------------------------------------------------------------------------------
# binslt check's verdict
# ---------------------------------------------------------------------------------------------


def verdict_path() -> Path:
    """``$BINSLT_CACHE_DIR/check.json``, else ``${XDG_CACHE_HOME:-~/.cache}/binslt/check.json``."""
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root).expanduser() / VERDICT_FILE
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "binslt" / VERDICT_FILE


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def build_id() -> dict:
    """binslt's version and a hash of the compiled extensions' and Triton kernels' files
    (name, size, mtime): a rebuild or an edit of a kernel changes it."""
    files = []
    for mod in _ext.load()["_modules"].values():
        if mod is not None and getattr(mod, "__file__", None):
            files.append(Path(mod.__file__))
    spec = importlib.util.find_spec("binslt.kernels")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            files.extend(sorted(Path(loc).glob("*.py")))
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return {"binslt": __version__, "files": h.hexdigest()[:16]}


def triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def verdict_key(device: torch.device) -> dict:
    """What a verdict holds for: torch, Triton, the device (GPU name or CPU model), the build."""
    return {"torch": torch.__version__, "triton": triton_version(), "device": device.type,
            "device_name": device_name(device), "build": build_id()}


def read_verdicts(path: Path | None = None) -> list[dict]:
    """The verdicts in the file (an empty list if there is none; an unreadable file warns)."""
    path = verdict_path() if path is None else path
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        verdicts = data["verdicts"]
        if not isinstance(verdicts, list):
            raise TypeError("'verdicts' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"binslt: ignoring the unreadable check verdict {path} ({exc}); run "
                      "`binslt check` to write it again", BackendFallbackWarning, stacklevel=2)
        return []
    return [v for v in verdicts if isinstance(v, dict)]


def write_verdict(verdict: dict, path: Path | None = None) -> Path:
    """Store ``verdict`` in the file, replacing an earlier one for the same device (atomic)."""
    path = verdict_path() if path is None else path
    key = verdict["key"]
    same = (key["device"], key["device_name"])
    kept = [v for v in read_verdicts(path)
            if (v.get("key", {}).get("device"), v.get("key", {}).get("device_name")) != same]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"verdicts": kept + [verdict]}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def verdict_skips(device: torch.device) -> dict[str, str]:
    """{backend: why} that the matching verdict of ``binslt check`` found failing on ``device``
    (read once per device; one warning per backend skipped)."""
    cache = _STATE.setdefault("skips", {})
    skips = cache.get(device)
    if skips is not None:
        return skips
    skips = {}
    verdicts = read_verdicts()
    if verdicts:
        key = verdict_key(device)
        for v in verdicts:
            if v.get("key") != key:
                continue
            for be, res in (v.get("backends") or {}).items():
                if isinstance(res, dict) and res.get("ok") is False:
                    ops = ", ".join(res.get("failed", [])) or "?"
                    skips[be] = f"`binslt check` found it failing here (ops: {ops})"
                    warnings.warn(
                        f"binslt: backend 'auto' skips {be!r} on {key['device_name']}: the "
                        f"verdict in {verdict_path()} says {ops} failed `binslt check` "
                        "(run `binslt check` again after a rebuild)", BackendFallbackWarning,
                        stacklevel=4)
    cache[device] = skips
    return skips
