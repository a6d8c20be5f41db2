"""The process a run trains in: the versions it records, the RNG states a checkpoint saves and
the per-epoch seeds, and its place in a ``torchrun`` job (:class:`DistInfo`, every collective
the loop uses)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset

__all__ = ["DistInfo", "gc_paused", "malloc_configured_by_env", "malloc_trim",
           "set_mmap_threshold", "setup_distributed", "versions"]


# ---------------------------------------------------------------------------------------------
# The C allocator
# ---------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3
#: The mmap threshold a training run fixes (:func:`set_mmap_threshold`): where glibc's dynamic
#: threshold tops out on 64-bit machines.
RUN_MMAP_THRESHOLD = 32 << 20


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (turning off its dynamic growth) and its trim
    threshold at twice that. True if they were set (False off glibc: nothing changes).

    Under glibc's defaults a training step pays for its large tensors twice: blocks above the
    mmap threshold are mapped and unmapped per call, and frees at the top of a heap (the main
    one, and the worker threads' arenas) beyond the 128 KiB trim threshold go back to the OS;
    both are faulted in page by page, and zeroed, by the next step. With the thresholds at 32
    and 64 MiB the freed blocks are reused instead (a Conv-4 search step at N=64 on a 2-core
    EPYC: 4,000 page faults fewer per step). A training run (:func:`binslt.training.run`) sets
    ``RUN_MMAP_THRESHOLD`` unless the environment configures glibc's malloc itself
    (:func:`malloc_configured_by_env`); the benchmarks set it for every candidate alike.

    With a small threshold (64 KiB) every large tensor is its own mapping, returned to the OS
    when freed, so the resident set follows what is really allocated: the benchmarks measure
    CPU memory so.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes))
                and libc.mallopt(_M_TRIM_THRESHOLD, 2 * int(nbytes)))


def malloc_configured_by_env() -> bool:
    """True when the environment sets glibc's malloc thresholds (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): a run then leaves
    them as the user chose."""
    env = os.environ
    return ("MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))


def malloc_trim() -> None:
    """Hand glibc's free heap memory back to the OS (nothing off glibc)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off inside the block (back on after, if it was on).

    For the large imports a run makes on its way in (scikit-learn for the digits; torch._dynamo,
    which the first ``torch.optim`` optimizer imports): each allocates hundreds of thousands of
    objects, and the collector would rescan the growing heap many times over (about 0.3 s of
    the default search's start-up on a 2-core EPYC). Nothing in those imports leaves cyclic garbage
    worth collecting before the block ends.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# Versions and RNG states
# ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import binslt

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    return {"binslt": binslt.__version__, "torch": torch.__version__, "triton": tv,
            "cuda": str(torch.version.cuda), "python": platform.python_version(),
            "numpy": np.__version__}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                    int(np_state[2]), int(np_state[3]), float(np_state[4])],
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**31 - 1)


def _seed_all(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# ---------------------------------------------------------------------------------------------
# More than one process: every collective the loop uses
# ---------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` job (one process: rank 0 of 1, and every method
    is a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False
    backend: str | None = None  #: the process group's backend (nccl / gloo), None without one

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes, in place."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to train: ``model`` in ``DistributedDataParallel`` when there are ranks."""
        if not self.active:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_buffers(self, model: nn.Module) -> None:
        """Each rank's last forward updated its own BN running statistics; evaluate (and save)
        rank 0's everywhere, as DDP's ``broadcast_buffers`` does at the next forward."""
        if self.active:
            for buf in model.buffers():
                dist.broadcast(buf, 0)

    def gather_rng(self) -> dict[str, Any]:
        """Every rank's RNG state, keyed by rank, so that each resumes its own stream."""
        rng = {str(self.rank): _rng_state()}
        if self.active:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, rng)
            rng = {k: v for g in gathered for k, v in g.items()}
        return rng

    def test_shard(self, dataset):
        """This rank's share of the test set (every world-th example)."""
        if not self.active:
            return dataset
        return Subset(dataset, list(range(self.rank, len(dataset), self.world)))

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun (it sets TORCHELASTIC_RUN_ID; one process
    under torchrun joins too, so that ``--nproc_per_node=1`` runs the nccl/gloo path) or whenever
    WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ and not dist.is_initialized():
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, here, dist.get_backend())
