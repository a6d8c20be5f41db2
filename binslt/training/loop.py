"""The training loop behind ``binslt search`` / ``train`` / ``finetune``.

:func:`run` trains one configuration (:class:`RunConfig`) into a run directory (the files are
described in :mod:`binslt.artifacts`): ``checkpoint.pt`` after every epoch, ``metrics.csv``,
and at the end ``results.json`` and the packed ``ticket.safetensors``. A killed run loses at
most the epoch in progress; ``resume=True`` continues it exactly.

The loop is a sequence of named steps, each a function of its own: :func:`prepare_output`
(refuse, skip or clear the directory), :func:`load_data`, :func:`build_or_restore` (a fresh
network, or the ticket a finetune starts from), :func:`make_optimizer` (optimizer and cosine
schedule), :func:`restore_checkpoint`, :func:`train_one_epoch`, :func:`evaluate`,
:func:`save_checkpoint` and :func:`finish` (results and ticket).

Exact resumption: the shuffling order of epoch ``e`` comes from ``DistributedSampler`` seeded
with ``(seed, e)``, and every epoch starts by re-seeding the torch / numpy / python RNGs from
``(seed, e, rank)``, so an epoch computes the same thing whether or not the process was restarted
before it. (The RNG states are also saved in the checkpoint and restored.)

More than one process: launched by ``torchrun``, :func:`run` joins the process group (gloo on the
CPU, nccl on CUDA), wraps the model in ``DistributedDataParallel`` and shards the data with
``DistributedSampler``; :class:`DistInfo` holds every collective the loop uses. ``batch_size``
is the *global* batch (each of K ranks takes ``batch_size // K``). Loss sums and correct counts
are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .. import ops
from ..io.artifacts import (
    CHECKPOINT_FORMAT,
    ArtifactError,
    RunDir,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    evaluate,
    load_source,
    load_state,
    load_torch_file,
    rebuild_model,
    resolve_device,
)
from ..io.tickets import export_ticket
from ..nn import models
from ..nn.layers import NonFiniteError, name_layers
from ..ops import schemas
from . import data as data_mod

__all__ = ["ARCHS", "DivergedError", "METHODS", "ModelError", "RunConfig", "RunError",
           "RunHooks", "build_model",
           "build_or_restore", "choose_early_time", "early_time_divergences", "evaluate",
           "finish", "load_data", "make_optimizer", "prepare_output", "restore_checkpoint", "run",
           "save_checkpoint", "save_ticket", "select_early_time", "train_one_epoch", "versions"]

METHODS = ("binwslt", "snn", "bnn", "ann")
SPIKING = ("binwslt", "snn")
MASKED = ("binwslt", "bnn")
ARCHS = ("conv4", "vgg9", "vgg11", "resnet19")
OPTIMIZERS = ("sgd", "adam")
SURROGATES = tuple(schemas.SURROGATES)  # atan | sigmoid | rect | piecewise_quadratic
NEURONS = models.NEURONS  # lif | if


class RunError(Exception):
    """A user-facing problem with a run (bad option, unusable checkpoint, occupied directory)."""


class DivergedError(RunError):
    """The training loss turned NaN or inf: the run stops before that step's optimizer update,
    and the checkpoint of the last finished epoch stays as it was."""

    def __init__(self, msg: str, epoch: int, step: int):
        super().__init__(msg)
        self.epoch, self.step = epoch, step


@dataclass
class RunConfig:
    """Everything that determines a run. Defaults are the paper's (and the CLI's)."""

    method: str = "binwslt"  #: binwslt (the search) | snn | bnn (BNN-BinAct) | ann
    arch: str = "conv4"
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: int = 32  #: imagefolder only
    train_subset: int = 0  #: 0 = the whole training split; else its first N examples
    test_subset: int = 0
    prune_rate: float = 0.5  #: fraction of weights REMOVED (biprop calls the kept fraction so)
    timesteps: int = 4
    neuron: str = "lif"  #: lif | if (SpikingJelly's IFNode, H = V + X: no decay or tau)
    decay: float | None = 0.99  #: lambda = 1 - 1/tau; None when tau is given instead (or IF)
    tau: float | None = None
    decay_input: bool = False
    v_threshold: float = 1.0
    v_reset: float | None = 0.0  #: None = soft reset
    detach_reset: bool = True
    surrogate: str = "atan"
    surrogate_alpha: float = 2.0
    bn_affine: bool = False
    epochs: int = 30
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  #: on every trained tensor, scores included (as biprop)
    batch_size: int = 64  #: global batch size (split across ranks)
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    workers: int = 0
    init_from: str | None = None  #: finetune: the searched ticket / checkpoint it starts from
    #: a user's SpikingJelly model, 'FILE.py:FACTORY' (arch 'custom'), converted by binslt.convert
    model: str | None = None
    input_shape: str | None = None  #: --model: 'C,H,W' of the images (default: the dataset's)
    mode: str = "search"  #: model mode while training: search | finetune | train (dense models)
    #: Early-time tickets (Kim et al., ECCV 2022; :func:`choose_early_time`): search the scores
    #: at a smaller T' chosen at initialisation, evaluate (and tune the last epochs) at T.
    early_time: bool = False
    early_time_threshold: float = 0.6  #: pick the smallest T' with KL / max KL under this
    early_time_tune_epochs: int | None = None  #: final epochs at the full T; None = epochs // 10

    # Fields that may differ between an interrupted run and its resumption.
    RESUMABLE_CHANGES = ("device", "workers", "data_dir", "download")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RunError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        """Raise :class:`RunError` with an actionable message for any out-of-range option."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RunError(msg)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        if self.model is None:
            need(self.arch in ARCHS, f"--arch must be one of {ARCHS}, got {self.arch!r}")
            need(self.input_shape is None, "--input-shape goes with --model")
        else:
            need(self.arch == "custom", "--model and --arch exclude each other (the network is "
                 "the model FILE.py:FACTORY returns)")
            need(self.method == "binwslt", f"--model is searched with binwslt, not {self.method}")
        need(self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.surrogate in SURROGATES,
             f"--surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        need(0.0 <= self.prune_rate < 1.0,
             f"--prune-rate is the fraction of weights removed and must be in [0, 1), got "
             f"{self.prune_rate}")
        need(self.timesteps >= 1, f"--timesteps must be >= 1, got {self.timesteps}")
        need(self.neuron in NEURONS,
             f"--neuron must be one of {NEURONS}, got {self.neuron!r}")
        if self.neuron == "if":
            need(self.decay is None and self.tau is None and not self.decay_input,
                 "--neuron if has no leak (H = V + X): drop --decay, --tau and --decay-input")
        else:
            need((self.decay is None) != (self.tau is None),
                 "give exactly one of --decay and --tau")
        if self.decay is not None:
            need(0.0 <= self.decay < 1.0, f"--decay (lambda) must be in [0, 1), got {self.decay}")
        if self.tau is not None:
            need(self.tau >= 1.0, f"--tau must be >= 1, got {self.tau}")
        need(self.v_threshold > 0, f"--v-threshold must be > 0, got {self.v_threshold}")
        need(self.surrogate_alpha > 0, f"--surrogate-alpha must be > 0, got {self.surrogate_alpha}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}")
        need(self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.train_subset >= 0 and self.test_subset >= 0, "subset sizes must be >= 0")
        need(self.image_size >= 4, f"--image-size must be >= 4, got {self.image_size}")
        need(self.mode in ("search", "finetune", "train"), f"bad mode {self.mode!r}")
        need(self.mode != "finetune" or self.init_from is not None,
             "finetune needs the ticket it starts from (--from DIR or FILE)")
        need(self.mode != "finetune" or self.method in MASKED,
             f"only masked models (binwslt, bnn) can be fine-tuned, got {self.method!r}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.early_time:
            need(self.method == "binwslt" and self.mode == "search",
                 f"--early-time applies to the BinW-SLT score search, not to {self.method} in "
                 f"mode {self.mode!r}")
            need(self.timesteps >= 2, f"--early-time needs T >= 2 (it searches at a T' < T), "
                 f"got T={self.timesteps}")
            need(0.0 < self.early_time_threshold <= 1.0, "--early-time-threshold is a fraction "
                 f"of the largest divergence, in (0, 1], got {self.early_time_threshold}")
            need(self.early_time_tune_epochs is None
                 or 0 <= self.early_time_tune_epochs < self.epochs,
                 f"--early-time-tune-epochs must be in [0, epochs={self.epochs}), got "
                 f"{self.early_time_tune_epochs}")

    def tune_epochs(self) -> int:
        """Early-time search: how many final epochs run at the full T."""
        if self.early_time_tune_epochs is not None:
            return self.early_time_tune_epochs
        return self.epochs // 10

    def neuron_options(self) -> dict[str, Any]:
        """The ``**neuron_options`` for :func:`binslt.models.build` (spiking models only)."""
        if self.method not in SPIKING:
            return {}
        opts: dict[str, Any] = dict(
            decay_input=self.decay_input, v_threshold=self.v_threshold, v_reset=self.v_reset,
            detach_reset=self.detach_reset, surrogate=self.surrogate,
            surrogate_alpha=self.surrogate_alpha, neuron=self.neuron)
        if self.neuron == "if":
            return opts  # no leak settings (validate refuses them)
        if self.decay is not None:
            opts["decay"] = self.decay
        else:
            opts["tau"] = self.tau
        return opts



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


# ---------------------------------------------------------------------------------------------
# Test hooks and the progress bar
# ---------------------------------------------------------------------------------------------


@dataclass
class RunHooks:
    """Test hooks. ``crash_after``: (epoch, batches) -> the process dies (``os._exit(17)``)
    right after the optimizer step of that batch (epochs and batches counted from 1), with
    the epochs before it checkpointed. ``on_epoch`` sees every metrics row."""

    crash_after: tuple[int, int] | None = None
    on_epoch: Callable[[dict], None] | None = None
    extra: dict = field(default_factory=dict)

    def after_step(self, epoch: int, batch: int) -> None:
        """Called after every optimizer step (``epoch`` and ``batch`` from 1)."""
        if self.crash_after is not None and self.crash_after == (epoch, batch):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(17)


class _ProgressBar:
    """tqdm over one epoch's batches with the running loss and accuracy (on stderr)."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                         file=sys.stderr)

    def update(self, totals: torch.Tensor) -> None:
        """One batch more; ``totals`` = (summed loss, correct, examples) so far."""
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{totals[0].item() / totals[2].item():.4f}",
                              acc=f"{100 * totals[1].item() / totals[2].item():.2f}%")

    def close(self) -> None:
        self._bar.close()


# ---------------------------------------------------------------------------------------------
# Models and tickets
# ---------------------------------------------------------------------------------------------


def build_model(cfg: RunConfig, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """``binslt.models.build`` for ``cfg`` (with ``--model``: the user's SpikingJelly model,
    converted); bad combinations become a :class:`RunError`."""
    if cfg.model is not None:
        from ..interop.convert import build_user_model

        shape = cfg.input_shape or f"{in_channels},{input_size},{input_size}"
        try:
            model = build_user_model(cfg.model, num_classes=num_classes, input_shape=shape,
                                     timesteps=cfg.timesteps, prune_rate=cfg.prune_rate,
                                     backend=cfg.backend)
        except (ValueError, TypeError) as exc:
            raise RunError(str(exc)) from None
        got = tuple(model.build_config["input_shape"])
        if got != (in_channels, input_size, input_size):
            raise RunError(f"--input-shape {','.join(map(str, got))} does not match the "
                           f"dataset's images ({in_channels},{input_size},{input_size})")
        return model
    try:
        return models.build(cfg.arch, cfg.method, num_classes=num_classes,
                            in_channels=in_channels, input_size=input_size,
                            timesteps=cfg.timesteps, prune_rate=cfg.prune_rate,
                            backend=cfg.backend, bn_affine=cfg.bn_affine,
                            **cfg.neuron_options())
    except (ValueError, TypeError) as exc:
        raise RunError(f"cannot build {cfg.arch}/{cfg.method}: {exc}") from None


def save_ticket(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``out_dir/ticket.safetensors``, the packed ticket of :func:`binslt.tickets.
    export_ticket` (dense models: their tensors as they are), and return its path."""
    path = RunDir(out_dir).ticket
    export_ticket(model, path)
    return path


# ---------------------------------------------------------------------------------------------
# Early-time tickets
# ---------------------------------------------------------------------------------------------


def early_time_divergences(model: nn.Module, x: torch.Tensor, timesteps: int) -> dict[int, float]:
    """``{T': KL(p_T || p_T')}`` for T' = 1 .. T-1: the mean over the batch ``x`` of the KL
    divergence between the softmax of the output averaged over T and of the output averaged
    over T' (the network run at T'), in nats, computed in float64.

    The model runs in training mode (batch statistics in BN, as the search at T' sees them) on
    a copy, so that ``model`` and its BN running statistics stay as they are."""
    import copy

    probe = copy.deepcopy(model)
    probe.train()
    outs = {}
    with torch.no_grad():
        for t in range(1, timesteps + 1):
            probe.timesteps = t
            outs[t] = F.log_softmax(probe(x).double(), dim=1)
    ref = outs[timesteps]
    return {t: float((ref.exp() * (ref - outs[t])).sum(1).mean()) for t in range(1, timesteps)}


def select_early_time(divergences: dict[int, float], timesteps: int, threshold: float,
                      ) -> tuple[int, dict[int, float]]:
    """``(T', normalised)``: each divergence divided by the largest one, and the smallest T'
    whose normalised divergence is under ``threshold``; T itself when none is (a divergence
    of 0 everywhere normalises to 0)."""
    top = max(divergences.values(), default=0.0)
    norm = {t: (d / top if top > 0 else 0.0) for t, d in sorted(divergences.items())}
    under = [t for t, v in norm.items() if v < threshold]
    return (min(under) if under else timesteps), norm


def choose_early_time(cfg: RunConfig, model: nn.Module, bundle, device: torch.device,
                      ) -> dict[str, Any]:
    """Kim et al.'s early-time rule on one training batch at initialisation: the batch is the
    first ``batch_size`` examples of a permutation drawn from a generator seeded with
    ``cfg.seed`` (the global RNGs are not touched, so the run that follows is the same)."""
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(bundle.train), generator=g)[: min(cfg.batch_size, len(bundle.train))]
    x = torch.stack([bundle.train[int(i)][0] for i in idx]).to(device)
    div = early_time_divergences(model, x, cfg.timesteps)
    t_prime, norm = select_early_time(div, cfg.timesteps, cfg.early_time_threshold)
    return {"T": cfg.timesteps, "T_prime": t_prime, "threshold": cfg.early_time_threshold,
            "batch": len(idx), "kl": {str(t): v for t, v in div.items()},
            "normalised": {str(t): v for t, v in norm.items()},
            "search_epochs": cfg.epochs - cfg.tune_epochs(), "tune_epochs": cfg.tune_epochs()}


# ---------------------------------------------------------------------------------------------
# The steps of a run
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What changes from epoch to epoch (and what a checkpoint restores)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    best: float = -1.0
    wall: float = 0.0


METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "epoch_time_s", "eval_time_s")


def _compare_configs(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs = []
    for k, v in now.items():
        if k in RunConfig.RESUMABLE_CHANGES:
            continue
        if k in saved and saved[k] != v:
            diffs.append(f"{k}: checkpoint {saved[k]!r} vs now {v!r}")
    return diffs


def prepare_output(cfg: RunConfig, run_dir: RunDir, info: DistInfo, *, resume: bool,
                   overwrite: bool, log: Callable[[str], None],
                   ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(results of an identical finished run, checkpoint to resume)``, at most one not None.

    A finished run of the same configuration is not repeated (idempotent commands). Otherwise
    an occupied directory is an error unless ``resume`` (continue its checkpoint) or
    ``overwrite`` (start again: the old files are removed)."""
    out = run_dir.path
    ckpt = None
    if not overwrite:
        try:
            done = run_dir.read_results()
        except ArtifactError as exc:
            raise RunError(f"{exc}; pass --overwrite to start the run again") from None
        if done is not None and not _compare_configs(done.get("config", {}), cfg.to_dict()):
            log(f"{out}: this run finished earlier (test accuracy {done.get('test_acc', 0):.2f}%);"
                " nothing to do (--overwrite runs it again)")
            return done, None
    if not overwrite and resume and run_dir.checkpoint.is_file():
        ckpt = load_torch_file(run_dir.checkpoint, "checkpoint")
        if ckpt.get("format") != CHECKPOINT_FORMAT or "epoch" not in ckpt:
            raise RunError(f"{run_dir.checkpoint} is not a binslt checkpoint")
        diffs = _compare_configs(ckpt.get("config", {}), cfg.to_dict())
        if diffs:
            raise RunError("--resume with a different configuration (" + "; ".join(diffs) +
                           f"); use another --out or the options the run in {out} was started with")
    elif not overwrite and (run_dir.checkpoint.exists() or run_dir.results.exists()):
        what = "a different run" if run_dir.results.exists() else "an unfinished run"
        raise RunError(f"{out} already holds {what}; pass --resume to continue it, --overwrite to "
                       "start again, or choose another --out")
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            for f in run_dir.written_files():
                f.unlink(missing_ok=True)
    info.barrier()
    return None, ckpt


def load_data(cfg: RunConfig, info: DistInfo):
    """The dataset bundle of ``cfg`` (its subsets taken); rank 0 downloads first."""
    if cfg.download and info.active and not info.main:
        dist.barrier()
    bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size)
    if cfg.download and info.active and info.main:
        dist.barrier()
    if cfg.train_subset or cfg.test_subset:
        bundle = bundle.subset(cfg.train_subset or None, cfg.test_subset or None)
    if cfg.batch_size < info.world:
        raise RunError(f"--batch-size {cfg.batch_size} is the global batch; it must be >= the "
                       f"number of processes ({info.world})")
    return bundle


def build_or_restore(cfg: RunConfig, bundle) -> tuple[nn.Module, dict[str, Any] | None]:
    """``(model, source)``: a fresh network seeded with ``cfg.seed``, or for a finetune the
    searched network of ``cfg.init_from`` in ``'finetune'`` mode (``source`` describes it)."""
    _seed_all(cfg.seed)
    if cfg.mode != "finetune":
        return build_model(cfg, bundle.num_classes, bundle.in_channels, bundle.input_size), None
    source = load_source(cfg.init_from)
    model = rebuild_model(source["build_config"], cfg.backend, path=source["path"])
    load_state(model, source["state_dict"], source["path"])
    models.set_mode(model, "finetune")
    bc = model.build_config
    if (bc.get("num_classes"), bc.get("in_channels"), bc.get("input_size")) != (
            bundle.num_classes, bundle.in_channels, bundle.input_size):
        raise RunError(f"the ticket in {source['path']} was built for "
                       f"{bc.get('num_classes')} classes, {bc.get('in_channels')} channels, "
                       f"{bc.get('input_size')} px, but {bundle.name} has "
                       f"{bundle.num_classes}/{bundle.in_channels}/{bundle.input_size}")
    return model, source


def make_optimizer(cfg: RunConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over the trainable tensors and its cosine schedule over ``cfg.epochs``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RunError(f"{cfg.arch}/{cfg.method} in mode {cfg.mode!r} has nothing to train")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)


def restore_checkpoint(state: TrainState, ckpt: dict[str, Any], path: Path, rank: int,
                       device: torch.device) -> None:
    """Load a checkpoint into ``state``: model, optimizer, schedule, history, this rank's RNG."""
    try:
        state.model.load_state_dict(ckpt["model"])
        state.opt.load_state_dict(ckpt["optimizer"])
        state.sched.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise RunError(f"{path} does not match this model: "
                       f"{str(exc).splitlines()[0]}") from None
    state.model.to(device)
    state.history = list(ckpt.get("history", []))
    state.start_epoch = int(ckpt["epoch"])
    state.best = float(ckpt.get("best_test_acc", -1.0))
    state.wall = float(ckpt.get("wall_time_s", 0.0))
    rng = ckpt.get("rng", {})
    if str(rank) in rng:
        _set_rng_state(rng[str(rank)])


def _loader(dataset, batch: int, sampler, workers: int, generator, drop_last: bool,
            pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      generator=generator, drop_last=drop_last, pin_memory=pin,
                      persistent_workers=False)


def train_one_epoch(net: nn.Module, loader, opt: torch.optim.Optimizer, device: torch.device,
                    *, all_reduce: Callable[[torch.Tensor], Any] | None = None,
                    bar: _ProgressBar | None = None,
                    after_step: Callable[[int], None] | None = None,
                    epoch: int | None = None) -> tuple[float, float]:
    """One pass of cross-entropy training over ``loader``: ``(mean loss, accuracy %)`` of the
    training batches (summed over processes by ``all_reduce``). ``after_step(batch)`` runs after
    each optimizer step (batches counted from 1).

    A loss that is NaN or inf (on any process) raises ``DivergedError`` naming ``epoch`` and the
    step, before that step's backward and update: the parameters stay those of the step
    before."""
    net.train()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    for b, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        _check_loss(loss, epoch, b + 1, all_reduce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            tot[0] += loss.detach().double() * y.numel()
            tot[1] += (logits.argmax(1) == y).sum()
            tot[2] += y.numel()
        if bar is not None:
            bar.update(tot)
        if after_step is not None:
            after_step(b + 1)
    if bar is not None:
        bar.close()
    if all_reduce is not None:
        all_reduce(tot)
    n = max(tot[2].item(), 1)
    return tot[0].item() / n, 100.0 * tot[1].item() / n


class ModelError(RunError):
    """The model failed inside a run: a layer refused its input, held NaN/inf, or (a ``--model``
    model) its own code raised. One line naming the layer; the original is ``__cause__``."""


def _failing_layer(exc: BaseException) -> tuple[str | None, nn.Module | None]:
    """``(qualified name, module)`` of the innermost module whose call ``exc`` came through (from
    its traceback: the outermost module met is the root the name is relative to)."""
    selves: list[nn.Module] = []
    tb = exc.__traceback__
    while tb is not None:
        m = tb.tb_frame.f_locals.get("self")
        if isinstance(m, nn.Module) and not any(m is s for s in selves):
            selves.append(m)
        tb = tb.tb_next
    if not selves:
        return None, None
    names = {id(m): n for n, m in selves[0].named_modules()}
    inner = selves[-1]
    return names.get(id(inner)), inner


def _user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside torch and binslt (the user's
    model code), if any."""
    import traceback

    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(skip)]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def model_error(exc: Exception, user_model: bool) -> ModelError | None:
    """The one-line ModelError for an exception raised inside the model's call, or None when it
    is not the model's (no module on its traceback) or, for a built-in model, not a layer
    refusing its input (a ValueError/TypeError: anything else is a bug to see in full)."""
    if isinstance(exc, RunError):
        return None
    name, mod = _failing_layer(exc)
    if mod is None or not (user_model or isinstance(exc, (ValueError, TypeError))):
        return None
    lines = str(exc).strip().splitlines()
    msg = " ".join(lines[0].split()) if lines else type(exc).__name__
    if isinstance(exc, NonFiniteError):
        return ModelError(msg)  # names its layer and the fix already
    cls = type(mod).__name__
    if isinstance(exc, (ValueError, TypeError)) and msg.startswith(cls):
        # a binslt layer's own message (with its fix): the class, now with the layer's name
        if name and not msg.startswith(f"{cls} {name}"):
            msg = f"{cls} {name}{msg[len(cls):]}"
        return ModelError(msg)
    where = f"layer {name or '(root)'} ({cls})"
    at = _user_frame(exc)
    return ModelError(f"{where} raised {type(exc).__name__}: {msg}"
                      + (f" (at {at}); fix the model's code" if at else "")
                      + "; --debug shows the traceback")


def _check_loss(loss: torch.Tensor, epoch: int | None, step: int,
                all_reduce: Callable[[torch.Tensor], Any] | None) -> None:
    """Raise DivergedError when ``loss`` is not finite here or on another process (one flag
    summed over the processes, so that every rank stops at the same step)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if all_reduce is not None:
        all_reduce(bad)
    if bool(bad.item()):
        where = f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
        value = loss.item()
        raise DivergedError(
            f"{where}: the training loss is {value if value == value else 'nan'}; the run "
            "stops before this step's update (lower --lr, or check the data for NaN/inf)",
            -1 if epoch is None else epoch, step)


def save_checkpoint(run_dir: RunDir, cfg: RunConfig, state: TrainState, info: DistInfo) -> None:
    """Write the checkpoint after ``state.history[-1]``'s epoch, and metrics.csv (rank 0; every
    rank contributes its RNG state)."""
    rng = info.gather_rng()
    if info.main:
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
            "build_config": dict(state.model.build_config), "epoch": len(state.history),
            "model": state.model.state_dict(), "optimizer": state.opt.state_dict(),
            "scheduler": state.sched.state_dict(), "rng": rng, "history": state.history,
            "best_test_acc": state.best, "wall_time_s": state.wall, "world_size": info.world,
        }, run_dir.checkpoint)
        atomic_write_csv(state.history, run_dir.metrics, METRIC_FIELDS)
    info.barrier()


def _count_params(model: nn.Module) -> Any:
    try:
        n = models.count_parameters(model)
    except Exception as exc:  # a counting problem must not lose a finished run
        return f"unavailable ({exc})"
    if isinstance(n, torch.Tensor):
        n = n.item()
    return n


def finish(run_dir: RunDir, cfg: RunConfig, state: TrainState, bundle, info: DistInfo,
           device: torch.device, backend: str, source: dict[str, Any] | None,
           early: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results dict; rank 0 writes the ticket and results.json (last: a directory with
    results.json is a finished run). ``early``: the early-time choice
    (:func:`choose_early_time`), recorded with the training time of its two phases."""
    history = state.history
    results = {
        "config": cfg.to_dict(),
        "method": cfg.method, "arch": cfg.arch, "dataset": bundle.name,
        "dataset_description": bundle.description,
        "test_acc": history[-1]["test_acc"], "best_test_acc": state.best,
        "final_train_acc": history[-1]["train_acc"], "epochs": cfg.epochs,
        "wall_time_s": state.wall,
        "mean_epoch_time_s": float(np.mean([h["epoch_time_s"] for h in history])),
        "params": _count_params(state.model), "device": str(device),
        "backend": backend, "world_size": info.world, "dist_backend": info.backend,
        "torch_threads":
            torch.get_num_threads(), "versions": versions(),
        "source": source["path"] if source else None,
        "files": {"metrics": RunDir.METRICS, "checkpoint": RunDir.CHECKPOINT,
                  "ticket": RunDir.TICKET},
    }
    if early is not None:
        k = early["search_epochs"]
        results["early_time"] = {
            **early,
            "search_train_time_s": float(sum(h["epoch_time_s"] for h in history[:k])),
            "tune_train_time_s": float(sum(h["epoch_time_s"] for h in history[k:]))}
    if info.main:
        save_ticket(state.model, run_dir.path)
        atomic_write_json(results, run_dir.results)
    info.barrier()
    return results


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, hooks: RunHooks | None = None, log: Callable[[str], None] = print,
        ) -> dict[str, Any]:
    """Train ``cfg`` into ``out``; return the results dict (also written to out/results.json).

    ``resume``: continue from ``out/checkpoint.pt`` if present (a finished run returns its
    results). Without it, an ``out`` that already holds a run is an error unless ``overwrite``.
    """
    cfg.validate()
    info = setup_distributed("cuda" if cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        return _train(cfg, RunDir(out), info, resume=resume, overwrite=overwrite,
                      progress=progress and info.main, hooks=hooks or RunHooks(),
                      log=log if info.main else _silent)
    except Exception as exc:
        err = model_error(exc, cfg.model is not None)
        if err is None:
            raise
        raise err from exc
    finally:
        info.close()


def _train(cfg: RunConfig, run_dir: RunDir, info: DistInfo, *, resume: bool, overwrite: bool,
           progress: bool, hooks: RunHooks, log: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(cfg.device, info.local_rank if info.active else None)
    done, ckpt = prepare_output(cfg, run_dir, info, resume=resume, overwrite=overwrite, log=log)
    if done is not None:
        return done
    bundle = load_data(cfg, info)
    per_rank_bs = cfg.batch_size // info.world

    model, source = build_or_restore(cfg, bundle)
    name_layers(model)  # errors name the layer (BinSpikeConv2d net.features.3: ...)
    report = getattr(model, "conversion_report", None)
    if report is not None and info.main:  # --model: what the conversion did, with the run
        atomic_write_bytes(run_dir.path / "report.txt", (str(report) + "\n").encode())
        atomic_write_json(report.to_dict(), run_dir.path / "report.json")
        if ckpt is None:
            log(str(report))
    model.to(device)
    early = None
    if cfg.early_time:  # on the fresh network (a resumed run rebuilds the same one first)
        early = choose_early_time(cfg, model, bundle, device)
        if ckpt is None:
            log(f"early-time: T'={early['T_prime']} of T={cfg.timesteps} (normalised KL "
                + ", ".join(f"T'={t}: {v:.3f}" for t, v in early["normalised"].items())
                + f"; threshold {cfg.early_time_threshold:g}); the last {early['tune_epochs']} "
                "epoch(s) and every evaluation at T")
    backend = ops.resolve_backend(cfg.backend, device)
    state = TrainState(model, *make_optimizer(cfg, model))
    if ckpt is not None:
        restore_checkpoint(state, ckpt, run_dir.checkpoint, info.rank, device)
        log(f"resuming {run_dir.path} after epoch {state.start_epoch}/{cfg.epochs}")
    net = info.wrap(model, device)

    sampler = DistributedSampler(bundle.train, num_replicas=info.world, rank=info.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    n_rank = len(sampler)
    drop_last = n_rank > per_rank_bs and n_rank % per_rank_bs == 1  # a batch of 1 breaks BN
    pin = device.type == "cuda"
    test_loader = _loader(info.test_shard(bundle.test), max(per_rank_bs, 256), None,
                          cfg.workers, None, False, pin)
    if state.start_epoch == 0:
        log(f"{cfg.mode} {cfg.arch}/{cfg.method} on {bundle.description}; device {device}, "
            f"backend {backend}, {info.world} process(es); {cfg.epochs} epochs -> {run_dir.path}")

    for epoch in range(state.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        _seed_all(_epoch_seed(cfg.seed, epoch, info.rank))
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, info.rank))
        loader = _loader(bundle.train, per_rank_bs, sampler, cfg.workers, gen, drop_last, pin)
        lr = state.opt.param_groups[0]["lr"]
        bar = _ProgressBar(len(loader), f"epoch {epoch + 1}/{cfg.epochs}") if progress else None
        if early is not None:  # search at T', the last tune epochs at T
            model.timesteps = (early["T_prime"] if epoch < early["search_epochs"]
                               else cfg.timesteps)
        try:
            train_loss, train_acc = train_one_epoch(
                net, loader, state.opt, device, all_reduce=info.all_reduce, bar=bar,
                after_step=lambda b, e=epoch + 1: hooks.after_step(e, b), epoch=epoch + 1)
        except DivergedError as exc:
            if bar is not None:
                bar.close()
            # No checkpoint is written for this epoch: the file keeps the last finished one.
            kept = (f"{run_dir.checkpoint} keeps epoch {len(state.history)}"
                    if state.history and run_dir.checkpoint.is_file()
                    else "no epoch finished, so there is no checkpoint")
            raise DivergedError(f"{exc}; {kept}", exc.epoch, exc.step) from None
        state.sched.step()
        t_train = time.perf_counter() - t0
        model.timesteps = cfg.timesteps  # evaluation, checkpoints and the ticket: the full T
        info.sync_buffers(model)
        test_loss, test_acc = evaluate(model, test_loader, device, info.all_reduce)
        t_epoch = time.perf_counter() - t0
        state.wall += t_epoch
        state.best = max(state.best, test_acc)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": test_loss, "test_acc": test_acc, "epoch_time_s": t_train,
               "eval_time_s": t_epoch - t_train}
        state.history.append(row)
        if hooks.on_epoch is not None:
            hooks.on_epoch(row)
        log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {train_loss:.4f}  train {train_acc:6.2f}%  "
            f"test {test_acc:6.2f}% (best {state.best:6.2f}%)  {t_train:.1f}s")
        save_checkpoint(run_dir, cfg, state, info)

    return finish(run_dir, cfg, state, bundle, info, device, backend, source, early)


def _silent(_msg: str) -> None:
    pass
