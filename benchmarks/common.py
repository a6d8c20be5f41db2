"""Shared helpers for the binslt benchmark scripts.

Timing (median of repeats after a warm-up), memory accounting (bytes saved for backward, peak
RSS, CUDA peak allocation), the machine/version record written into every CSV, the
SpikingJelly import that must see ``SJ_LIF_CUDA_IMPLEMENTATION`` before it happens, and the
figure set-up the bar plots share.

Nothing here is binslt-specific except the version record; the scripts import it as
``from common import ...`` (they put their own folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# SpikingJelly
# ---------------------------------------------------------------------------------------------


def import_spikingjelly(cuda_impl: str = "triton"):
    """Import SpikingJelly's activation_based package with the LIF CUDA implementation chosen.

    SpikingJelly 2.0 reads ``SJ_LIF_CUDA_IMPLEMENTATION`` once, when ``spikingjelly._ops.lif``
    is imported (``_CudaSelection.__init__``), and picks cuda -> triton -> torch under 'auto'.
    So the variable must be set before the first import; if spikingjelly was already imported
    with another setting, say so rather than silently timing a different kernel.
    """
    already = "spikingjelly._ops.lif" in sys.modules
    os.environ.setdefault("SJ_LIF_CUDA_IMPLEMENTATION", cuda_impl)
    try:
        from spikingjelly.activation_based import functional, layer, neuron, surrogate
    except ImportError as exc:
        raise SystemExit(
            f"error: the SpikingJelly baseline is not importable ({exc}). Install it with "
            "`pip install 'spikingjelly>=2.0'` (the [bench] extra), or put a SpikingJelly 2.0 "
            "source tree on PYTHONPATH (gpu_check.sh: BINSLT_SJ_PATH=DIR); conv_lif.py --no-sj "
            "times binslt alone.") from exc

    if already:
        from spikingjelly._ops import lif as _sj_lif

        requested = _sj_lif._selection._requested
        if requested != os.environ["SJ_LIF_CUDA_IMPLEMENTATION"]:
            print(f"warning: spikingjelly was imported before the benchmark set "
                  f"SJ_LIF_CUDA_IMPLEMENTATION; its LIF uses {requested!r}", file=sys.stderr)
    return functional, layer, neuron, surrogate


def sj_lif_implementation(device: torch.device) -> str:
    """Which LIF implementation SpikingJelly uses for tensors on ``device``."""
    if device.type != "cuda":
        return "torch-cpu"
    from spikingjelly._ops import lif as _sj_lif

    idx = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return _sj_lif._selection._select(idx).name
    except Exception as exc:
        raise SystemExit(
            f"error: SpikingJelly's LIF cannot run on {device} with SJ_LIF_CUDA_IMPLEMENTATION="
            f"{os.environ.get('SJ_LIF_CUDA_IMPLEMENTATION')!r}: {exc}. Try --sj-lif auto.") from exc


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2,
            repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    CPU: a perf_counter loop. CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between calls) with ``return_mode='median'``; ``repeats`` calls at least.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.type == "cuda":
        from triton.testing import do_bench

        for _ in range(max(warmup, 1)):
            fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        # do_bench takes its budgets in ms; give it about `repeats` calls (at least 5 ms).
        rep_ms = max(5.0, est * repeats)
        return float(do_bench(fn, warmup=max(1.0, est * warmup), rep=rep_ms,
                              return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_many_ms(fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int = 2,
                 repeats: int = 10) -> dict[str, float]:
    """Median milliseconds of each ``fns[name]()``, measured so that load hits them alike.

    CPU: after ``warmup`` untimed calls of each, ``repeats`` rounds that call every function
    once in turn (interleaved: a burst of background load lands on all of them, not on one).
    CUDA: :func:`time_ms` on each in turn (the device is not shared).
    """
    if device.type == "cuda":
        return {k: time_ms(f, device, warmup=warmup, repeats=repeats) for k, f in fns.items()}
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


class SavedTensorBytes:
    """Context manager: total bytes of the distinct storages autograd saves for backward.

    Every tensor an autograd node (built-in or ``ctx.save_for_backward``) saves passes through
    the pack hook. Tensors that share a storage (views, the same parameter saved twice) count
    once. Tensors stashed on ``ctx`` as plain attributes bypass the hook and are not counted.
    """

    def __init__(self) -> None:
        self.storages: dict[tuple[str, int], int] = {}
        self._cm = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            self.storages[key] = max(self.storages.get(key, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            self.storages[(str(t.device), id(t))] = t.numel() * t.element_size()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorBytes:
        self._cm = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc's mmap threshold fixed at ``nbytes`` (trim threshold at twice it): see
    ``binslt.training.runtime.set_mmap_threshold``. The benchmarks set 32 MiB at start, as a
    training run does, so that every candidate times under the same allocator regime."""
    from binslt.training.runtime import set_mmap_threshold as fix

    return fix(nbytes)


def malloc_trim() -> None:
    from binslt.training.runtime import malloc_trim as trim

    trim()


class PeakMemory:
    """Peak memory of a block, beyond what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry.
    CPU (Linux): the resident-set high-water mark (VmHWM) after resetting it through
    ``/proc/self/clear_refs``, minus VmRSS at entry. Memory that the C allocator kept from an
    earlier, larger block is already resident and is not counted again, so this is a lower
    bound on the block's own footprint. To make it tight, the block runs with glibc's mmap
    threshold at 64 KiB after ``malloc_trim`` (large tensors map and unmap their own pages), and
    the threshold goes back to 32 MiB afterwards. Where the reset is not allowed, falls back to
    ``ru_maxrss`` (the process-wide peak) and sets ``kind`` accordingly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""
        self.nbytes = 0
        self.absolute = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated"
            return self
        set_mmap_threshold(64 << 10)
        malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "rss_hwm"
        except OSError:
            self.kind = "ru_maxrss"
        self._base = (_proc_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.absolute = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "rss_hwm":
            self.absolute = (_proc_status_kb("VmHWM") or 0) * 1024
        else:
            import resource

            self.absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device.type != "cuda":
            set_mmap_threshold(32 << 20)
        self.nbytes = max(0, self.absolute - self._base)


# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (the one binslt check's verdicts are keyed by)."""
    from binslt.ops.fallback import cpu_model as model

    return model()


#: The ISA features that pick binslt's CPU paths (the kernel path, the int8 and bf16 forms).
CPU_ID_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "avx512_vnni",
                "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_identity(cpuinfo: str | None = None) -> str:
    """Which CPU beyond its model name (the first processor of ``/proc/cpuinfo``, or of the text
    given): family, model and stepping, and the ISA features of :data:`CPU_ID_FLAGS` it has,
    e.g. ``family 25 model 17 stepping 1; avx2 avx512f ... avx512_bf16``. Machines of one model
    name ("AMD EPYC") differ in generation and ISA, and their ratios are not comparable. ``?``
    where the file cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "?"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not fields:
        return "?"
    flags = set(fields.get("flags", "").split())
    have = [f for f in CPU_ID_FLAGS if f in flags]
    ident = " ".join(f"{name} {fields[key]}" for name, key in
                     (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
                     if key in fields)
    return f"{ident or '?'}; {' '.join(have) or 'none of ' + ', '.join(CPU_ID_FLAGS)}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """'cpu-amd-epyc', 'nvidia-h200', ...: the file-name tag of a results CSV."""
    name = slug(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return (sha + ("+dirty" if dirty.strip() else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_cache_limit() -> str:
    """The CPU kernels' block-cache limit (``binslt.ops.cpu_cache_info``), or why there is none."""
    try:
        from binslt import ops

        return f"{ops.cpu_cache_info()['limit'] >> 20} MiB"
    except (ImportError, RuntimeError, ValueError) as exc:
        return f"n/a ({type(exc).__name__})"


def machine_info(device: torch.device) -> dict[str, str]:
    """What the CSV header records: machine, threads, library versions, commit, GPU flags."""
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_id": cpu_identity(),
        "cpu_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "triton_autotune": os.environ.get("BINSLT_TRITON_AUTOTUNE", "all"),
        "spikingjelly": _version("spikingjelly"),
        "binslt": _version("binslt"),
        "git_commit": git_commit(),
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?",
    }
    if device.type == "cpu":
        info["binslt_cpu_cache"] = _cpu_cache_limit()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu_sms": str(props.multi_processor_count),
            "gpu_mem_gib": f"{props.total_memory / 2**30:.1f}",
            "cuda_runtime": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()),
            "cudnn_allow_tf32": str(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": str(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_benchmark": str(torch.backends.cudnn.benchmark),
        })
    return info


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str],
              meta: dict[str, str]) -> None:
    """CSV with ``# key: value`` comment lines (the machine record) before the header.

    Written to a temporary name and renamed, so a reader (or an archive taken while a benchmark
    is stopped) never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})
    os.replace(tmp, path)


class CsvAppender:
    """A results CSV written as it is measured: the machine record and the column names first,
    then :meth:`add` appends and flushes each row, so a run stopped early keeps every row it
    measured (its header then says ``complete: no``). :meth:`finish` rewrites the file whole
    (:func:`write_csv`) with the final rows and record and ``complete: yes``.
    """

    def __init__(self, path: Path, columns: Sequence[str], meta: dict[str, str]):
        self.path = Path(path)
        self.columns = list(columns)
        write_csv(self.path, [], self.columns, {**meta, "complete": "no (rows appended as measured)"})
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore")

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self._w.writerow({k: _fmt(r.get(k, "")) for k in self.columns})
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self, rows: Sequence[dict[str, Any]], meta: dict[str, str]) -> None:
        self._f.close()
        write_csv(self.path, rows, self.columns, {**meta, "complete": "yes"})


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(meta, rows) of a CSV written by :func:`write_csv`."""
    meta: dict[str, str] = {}
    lines = []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                k, _, v = line[1:].partition(":")
                meta[k.strip()] = v.strip()
            else:
                lines.append(line)
    return meta, list(csv.DictReader(lines))


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    rows = [{c: str(_fmt(r.get(c, ""))) for c in columns} for r in rows]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(r[c].rjust(widths[c]) for c in columns))


# ---------------------------------------------------------------------------------------------
# The command-line options and set-up the timing scripts share
# ---------------------------------------------------------------------------------------------


def add_run_options(p: argparse.ArgumentParser, *, backends_help: str) -> None:
    """The options every timing script takes: ``--device``, ``--backends``, ``--threads``,
    ``--sj-lif``, ``--seed``, ``--out`` (alias ``--results-dir``) and ``--tag``."""
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backends", default=None, help=backends_help)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--sj-lif", default=os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION", "triton"),
                   choices=("triton", "cuda", "torch", "auto"),
                   help="SpikingJelly's LIF implementation on CUDA (SJ_LIF_CUDA_IMPLEMENTATION, "
                        "default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "--results-dir", dest="out", default=str(RESULTS),
                   help="results folder (default %(default)s)")
    p.add_argument("--tag", default="", help="suffix for the CSV/PNG names")


def kernel_backends(device_type: str, status: dict[str, dict],
                    gpu_order: Sequence[str] = ("triton", "cuda")) -> list[str]:
    """The usable binslt kernel backends of ``device_type`` (``cpu`` on the CPU; the GPU ones in
    ``gpu_order``). ``status`` is ``binslt.backends()``."""
    names = ["cpu"] if device_type == "cpu" else list(gpu_order)
    return [b for b in names if status[b]["usable"]]


def torch_and_kernels(device_type: str, status: dict[str, dict]) -> list[str]:
    """``torch`` (the reference) and the device's usable kernel backends."""
    return ["torch"] + kernel_backends(device_type, status)


def requested_backends(spec: str, status: dict[str, dict],
                       device_type: str | None = None) -> list[str]:
    """The backends a ``--backends a,b`` option names; ValueError (the message to print) when one
    is unknown, does not run on ``device_type`` tensors (when given; Triton is timed on CUDA
    only: its CPU interpreter is for tests) or is not usable here. ``status`` is
    ``binslt.backends()``."""
    backends = [b.strip() for b in spec.split(",") if b.strip()]
    for b in backends:
        if b not in status:
            raise ValueError(f"unknown backend {b!r}; binslt has {sorted(status)}")
        if device_type is not None and b == "triton" and device_type != "cuda":
            raise ValueError("the triton backend is timed on CUDA only (its CPU interpreter is "
                             "for tests); use --device cuda")
        if device_type is not None and b in ("cpu", "cuda") and b != device_type:
            raise ValueError(f"backend {b!r} does not run on {device_type} tensors")
        if not status[b]["usable"]:
            raise ValueError(f"backend {b!r} is not usable here: {status[b]['reason']}")
    return backends


def setup_run(args: argparse.Namespace,
              default_backends: Callable[[str, dict[str, dict]], list[str]], *,
              cudnn_benchmark: bool | None = True, check_device: bool = False,
              ) -> tuple[torch.device, dict[str, dict], list[str]]:
    """``(device, binslt.backends(), backends)`` for the options of :func:`add_run_options`.

    Sets ``SJ_LIF_CUDA_IMPLEMENTATION`` (SpikingJelly reads it when first imported), picks the
    device (CUDA: the current device, ``torch.backends.cudnn.benchmark`` set to
    ``cudnn_benchmark`` unless None; CPU: one allocator regime for every timing
    (:func:`set_mmap_threshold`, see :class:`PeakMemory`) and ``--threads``), and the backends:
    ``--backends`` (checked by :func:`requested_backends`, against the device with
    ``check_device``) or ``default_backends(device_type, status)``. A ValueError carries the
    one line to print before exiting 2."""
    os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = args.sj_lif
    import binslt

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible")
        device = torch.device("cuda", torch.cuda.current_device())
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
    else:
        device = torch.device("cpu")
        set_mmap_threshold(32 << 20)
        if args.threads:
            torch.set_num_threads(args.threads)
    status = binslt.backends()
    if args.backends:
        backends = requested_backends(args.backends, status,
                                      device.type if check_device else None)
    else:
        backends = default_backends(device.type, status)
    return device, status, backends


def command_line(argv: Sequence[str] | None) -> str:
    """The command a CSV records: the script's name and its arguments."""
    return " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:]))


def sj_baseline(device: torch.device) -> str:
    """Import SpikingJelly (:func:`import_spikingjelly`, with the ``SJ_LIF_CUDA_IMPLEMENTATION``
    that :func:`setup_run` set) and return the name of the LIF implementation it uses on
    ``device`` (:func:`sj_lif_implementation`): exits with a message now, before any timing, if
    that LIF cannot run there."""
    import_spikingjelly(os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION", "triton"))
    return sj_lif_implementation(device)


def run_record(device: torch.device, status: dict[str, dict], backends: Sequence[str],
               argv: Sequence[str] | None, *, benchmark: str, sj_lif_impl: str,
               **fields: str) -> dict[str, str]:
    """The record a timing script writes into its CSV header: :func:`machine_info`, then
    ``benchmark``, ``sj_lif_impl``, ``binslt_backends`` (each backend with the reason it is
    usable, from ``status = binslt.backends()``), the script's own ``fields`` in their order and
    last the ``command`` (:func:`command_line` of ``argv``)."""
    meta = machine_info(device)
    meta.update({
        "benchmark": benchmark,
        "sj_lif_impl": sj_lif_impl,
        "binslt_backends": "; ".join(f"{b}: {status[b]['reason']}" for b in backends),
        **fields,
        "command": command_line(argv),
    })
    return meta


def result_stem(benchmark: str, device: torch.device, tag: str) -> str:
    """``<benchmark>_<device slug>[_<tag>]``: the name of a script's CSV and PNG."""
    return f"{benchmark}_{device_slug(device)}" + (f"_{tag}" if tag else "")


@contextlib.contextmanager
def saved_figure(path: Path, figsize: tuple[float, float], *, xlabels: Sequence[str],
                 ylabel: str, title: str, title_size: int = 8, **xlabel_kw: Any):
    """A matplotlib figure (Agg backend) with one axes, yielded for the caller to draw its bars
    on; on leaving the block the x ticks are labelled ``xlabels`` (one a bar group, at 0, 1,
    ...; ``xlabel_kw`` go to ``set_xticklabels``, default font size 8), the axes get
    ``ylabel`` and ``title``, and the figure is laid out, written to ``path`` (120 dpi) and
    closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.set_xticks(range(len(xlabels)))
        ax.set_xticklabels(xlabels, **{"fontsize": 8, **xlabel_kw})
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=title_size)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
