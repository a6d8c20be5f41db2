"""The training loop behind ``binslt search`` / ``train`` / ``finetune``.

One function, :func:`run`, trains one configuration (:class:`RunConfig`) into an output directory:

- ``DIR/checkpoint.pt``: written atomically (temporary file + ``os.replace``) after every epoch
  with the model, optimizer, scheduler and RNG states, the epoch count and the metric history.
  A killed run loses at most the epoch in progress; ``resume=True`` continues it exactly.
- ``DIR/metrics.csv``: one row per epoch (loss, accuracy, learning rate, epoch time).
- ``DIR/results.json``: the config, final and best test accuracy, wall time and versions.
- ``DIR/ticket.pt``: the final model (see :func:`save_ticket`, the one place to change the format).

Exact resumption: the shuffling order of epoch ``e`` comes from ``DistributedSampler`` seeded
with ``(seed, e)``, and every epoch starts by re-seeding the torch / numpy / python RNGs from
``(seed, e, rank)``, so an epoch computes the same thing whether or not the process was restarted
before it. (The RNG states are also saved in the checkpoint and restored.)

More than one process: launched by ``torchrun``, :func:`run` joins the process group (gloo on the
CPU, nccl on CUDA), wraps the model in ``DistributedDataParallel`` and shards the data with
``DistributedSampler``. ``batch_size`` is the *global* batch (each of K ranks takes
``batch_size // K``). Loss sums and correct counts are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
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

METHODS = ("binwslt", "snn", "bnn", "ann")
SPIKING = ("binwslt", "snn")
MASKED = ("binwslt", "bnn")
ARCHS = ("conv4", "vgg9", "vgg11", "resnet19")
OPTIMIZERS = ("sgd", "adam")
SURROGATES = ("atan", "sigmoid")
CHECKPOINT_FORMAT = "binslt-checkpoint-v1"
TICKET_FORMAT = "binslt-ticket-torch-v1"


class RunError(Exception):
    """A user-facing problem with a run (bad option, unusable checkpoint, occupied directory)."""


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
    decay: float | None = 0.99  #: lambda = 1 - 1/tau; None when tau is given instead
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
    mode: str = "search"  #: model mode while training: search | finetune | train (dense models)

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
        need(self.arch in ARCHS, f"--arch must be one of {ARCHS}, got {self.arch!r}")
        need(self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.surrogate in SURROGATES,
             f"--surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        need(0.0 <= self.prune_rate < 1.0,
             f"--prune-rate is the fraction of weights removed and must be in [0, 1), got "
             f"{self.prune_rate}")
        need(self.timesteps >= 1, f"--timesteps must be >= 1, got {self.timesteps}")
        need((self.decay is None) != (self.tau is None), "give exactly one of --decay and --tau")
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

    def neuron_options(self) -> dict[str, Any]:
        """The ``**neuron_options`` for :func:`binslt.models.build` (spiking models only)."""
        if self.method not in SPIKING:
            return {}
        opts: dict[str, Any] = dict(
            decay_input=self.decay_input, v_threshold=self.v_threshold, v_reset=self.v_reset,
            detach_reset=self.detach_reset, surrogate=self.surrogate,
            surrogate_alpha=self.surrogate_alpha)
        if self.decay is not None:
            opts["decay"] = self.decay
        else:
            opts["tau"] = self.tau
        return opts


# ---------------------------------------------------------------------------------------------
# Small utilities
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_torch_file(path: Path, what: str) -> dict:
    """torch.load (weights only) with a one-line :class:`RunError` for a missing/corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{what} {str(path)!r} not found")
    # torch.load does not check the zip's CRC-32s: flipped tensor bytes would load silently.
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception:  # not a zip at all (truncated, legacy format): torch.load reports it
        bad = None
    if bad is not None:
        raise RunError(f"{what} {str(path)!r} is corrupt (CRC mismatch in {bad!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{what} {str(path)!r} is corrupt or not a binslt file ({msg})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{what} {str(path)!r} is not a binslt file (no dict inside)")
    return obj


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
# Distributed set-up
# ---------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, here)


def resolve_device(spec: str, info: DistInfo | None = None) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"--device {spec} asked for, but no CUDA device is visible; use "
                           "--device cpu")
        if spec == "cuda" and info is not None and info.active:
            return torch.device("cuda", info.local_rank)
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise RunError(f"bad --device {spec!r}: {exc}") from None


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------
# Models, tickets
# ---------------------------------------------------------------------------------------------


def build_model(cfg: RunConfig, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """``binslt.models.build`` for ``cfg``; bad combinations become a :class:`RunError`."""
    from . import models

    try:
        return models.build(cfg.arch, cfg.method, num_classes=num_classes,
                            in_channels=in_channels, input_size=input_size,
                            timesteps=cfg.timesteps, prune_rate=cfg.prune_rate,
                            backend=cfg.backend, bn_affine=cfg.bn_affine,
                            **cfg.neuron_options())
    except (ValueError, TypeError) as exc:
        raise RunError(f"cannot build {cfg.arch}/{cfg.method}: {exc}") from None


def rebuild_model(build_config: dict[str, Any], backend: str | None = None) -> nn.Module:
    """A fresh model from a saved ``model.build_config``."""
    from . import models

    kw = dict(build_config)
    if backend is not None:
        kw["backend"] = backend
    try:
        return models.build(**kw)
    except (ValueError, TypeError) as exc:
        raise RunError(f"cannot rebuild the saved model ({kw}): {exc}") from None


def save_ticket(model: nn.Module, out_dir: Path, config: dict[str, Any]) -> Path:
    """Write the final ticket of a run and return its path.

    This is the one place that decides the ticket format (today a ``torch.save`` of the model's
    state dict and build config); a packed safetensors export replaces this function's body.
    """
    path = Path(out_dir) / "ticket.pt"
    atomic_torch_save({"format": TICKET_FORMAT, "build_config": dict(model.build_config),
                       "state_dict": model.state_dict(), "config": config}, path)
    return path


def resolve_source(src: str) -> Path:
    """The file a ``--from`` argument names: a file, or a run directory's ticket/checkpoint."""
    p = Path(src).expanduser()
    if p.is_dir():
        for name in ("ticket.pt", "checkpoint.pt"):
            if (p / name).is_file():
                return p / name
        raise RunError(f"{str(p)!r} holds no ticket.pt or checkpoint.pt; give the output "
                       "directory of a finished `binslt search` or the file itself")
    if not p.is_file():
        raise RunError(f"--from {str(p)!r}: no such file or directory")
    return p


def load_source(src: str) -> dict[str, Any]:
    """{'config', 'build_config', 'state_dict'} from a ticket or checkpoint file/directory."""
    path = resolve_source(src)
    obj = load_torch_file(path, "ticket")
    fmt = obj.get("format")
    if fmt == TICKET_FORMAT:
        sd = obj.get("state_dict")
    elif fmt == CHECKPOINT_FORMAT:
        sd = obj.get("model")
    else:
        raise RunError(f"{str(path)!r} is not a binslt ticket or checkpoint (format {fmt!r})")
    if not isinstance(sd, dict) or not isinstance(obj.get("build_config"), dict):
        raise RunError(f"{str(path)!r} is incomplete (no model state or build config)")
    return {"config": obj.get("config") or {}, "build_config": obj["build_config"],
            "state_dict": sd, "path": str(path)}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RunHooks:
    """Test hooks. ``crash_after``: (epoch, batches) -> the process dies (``os._exit``) right
    after the optimizer step of that batch (epochs and batches counted from 1)."""

    crash_after: tuple[int, int] | None = None
    on_epoch: Callable[[dict], None] | None = None
    extra: dict = field(default_factory=dict)


def _loader(dataset, batch: int, sampler, workers: int, generator, drop_last: bool,
            pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      generator=generator, drop_last=drop_last, pin_memory=pin,
                      persistent_workers=False)


def _files(out: Path) -> dict[str, Path]:
    return {"checkpoint": out / "checkpoint.pt", "results": out / "results.json",
            "metrics": out / "metrics.csv", "ticket": out / "ticket.pt"}


METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "epoch_time_s", "eval_time_s")


def _write_metrics(history: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


def _compare_configs(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs = []
    for k, v in now.items():
        if k in RunConfig.RESUMABLE_CHANGES:
            continue
        if k in saved and saved[k] != v:
            diffs.append(f"{k}: checkpoint {saved[k]!r} vs now {v!r}")
    return diffs


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             info: DistInfo) -> tuple[float, float]:
    """(mean loss, accuracy %) over the whole (sharded) test set."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        tot[0] += F.cross_entropy(logits, y, reduction="sum").double()
        tot[1] += (logits.argmax(1) == y).sum()
        tot[2] += y.numel()
    _all_reduce(tot, info)
    n = max(tot[2].item(), 1.0)
    return tot[0].item() / n, 100.0 * tot[1].item() / n


def run(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, hooks: RunHooks | None = None, log: Callable[[str], None] = print,
        ) -> dict[str, Any]:
    """Train ``cfg`` into ``out``; return the results dict (also written to out/results.json).

    ``resume``: continue from ``out/checkpoint.pt`` if present (a finished run returns its
    results). Without it, an ``out`` that already holds a run is an error unless ``overwrite``.
    """
    from . import models, ops

    hooks = hooks or RunHooks()
    cfg.validate()
    out = Path(out)
    files = _files(out)
    info = setup_distributed("cuda" if cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        return _run(cfg, out, files, info, resume, overwrite, progress, hooks, log, models, ops)
    finally:
        if info.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg, out, files, info, resume, overwrite, progress, hooks, log, models, ops):
    device = resolve_device(cfg.device, info)
    if not info.main:
        log = _silent
        progress = False

    # -- the output directory ------------------------------------------------------------------
    ckpt = None
    if not overwrite and files["results"].is_file():
        # A finished run of the same configuration is not repeated (idempotent commands).
        try:
            done = json.loads(files["results"].read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{files['results']} is unreadable ({exc}); pass --overwrite to "
                           "start the run again") from None
        if not _compare_configs(done.get("config", {}), cfg.to_dict()):
            log(f"{out}: this run finished earlier (test accuracy {done.get('test_acc', 0):.2f}%);"
                " nothing to do (--overwrite runs it again)")
            return done
    if not overwrite and resume and files["checkpoint"].is_file():
        ckpt = load_torch_file(files["checkpoint"], "checkpoint")
        if ckpt.get("format") != CHECKPOINT_FORMAT or "epoch" not in ckpt:
            raise RunError(f"{files['checkpoint']} is not a binslt checkpoint")
        diffs = _compare_configs(ckpt.get("config", {}), cfg.to_dict())
        if diffs:
            raise RunError("--resume with a different configuration (" + "; ".join(diffs) +
                           f"); use another --out or the options the run in {out} was started with")
    elif not overwrite and (files["checkpoint"].exists() or files["results"].exists()):
        what = "a different run" if files["results"].exists() else "an unfinished run"
        raise RunError(f"{out} already holds {what}; pass --resume to continue it, --overwrite to "
                       "start again, or choose another --out")
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            for key in ("checkpoint", "results", "metrics", "ticket"):
                files[key].unlink(missing_ok=True)
    if info.active:
        dist.barrier()

    # -- data ------------------------------------------------------------------------------------
    from . import data as data_mod

    if cfg.download and info.active and not info.main:
        dist.barrier()  # rank 0 downloads first
    bundle = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size)
    if cfg.download and info.active and info.main:
        dist.barrier()
    if cfg.train_subset or cfg.test_subset:
        bundle = bundle.subset(cfg.train_subset or None, cfg.test_subset or None)
    if cfg.batch_size < info.world:
        raise RunError(f"--batch-size {cfg.batch_size} is the global batch; it must be >= the "
                       f"number of processes ({info.world})")
    per_rank_bs = cfg.batch_size // info.world

    # -- model -----------------------------------------------------------------------------------
    _seed_all(cfg.seed)
    source = None
    if cfg.mode == "finetune":
        source = load_source(cfg.init_from)
        model = rebuild_model(source["build_config"], backend=cfg.backend)
        try:
            model.load_state_dict(source["state_dict"])
        except RuntimeError as exc:
            raise RunError(f"{source['path']} does not fit its own build config: "
                           f"{str(exc).splitlines()[0]}") from None
        models.set_mode(model, "finetune")
        bc = model.build_config
        if (bc.get("num_classes"), bc.get("in_channels"), bc.get("input_size")) != (
                bundle.num_classes, bundle.in_channels, bundle.input_size):
            raise RunError(f"the ticket in {source['path']} was built for "
                           f"{bc.get('num_classes')} classes, {bc.get('in_channels')} channels, "
                           f"{bc.get('input_size')} px, but {bundle.name} has "
                           f"{bundle.num_classes}/{bundle.in_channels}/{bundle.input_size}")
    else:
        model = build_model(cfg, bundle.num_classes, bundle.in_channels, bundle.input_size)
    model.to(device)
    backend_used = ops.resolve_backend(cfg.backend, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RunError(f"{cfg.arch}/{cfg.method} in mode {cfg.mode!r} has nothing to train")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)

    history: list[dict] = []
    start_epoch, best, wall = 0, -1.0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RunError(f"{files['checkpoint']} does not match this model: "
                           f"{str(exc).splitlines()[0]}") from None
        model.to(device)
        history = list(ckpt.get("history", []))
        start_epoch, best = int(ckpt["epoch"]), float(ckpt.get("best_test_acc", -1.0))
        wall = float(ckpt.get("wall_time_s", 0.0))
        rng = ckpt.get("rng", {})
        if str(info.rank) in rng:
            _set_rng_state(rng[str(info.rank)])
        log(f"resuming {out} after epoch {start_epoch}/{cfg.epochs}")

    net: nn.Module = model
    if info.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(bundle.train, num_replicas=info.world, rank=info.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    n_rank = len(sampler)
    drop_last = n_rank > per_rank_bs and n_rank % per_rank_bs == 1  # a batch of 1 breaks BN
    test_shard = bundle.test if not info.active else Subset(
        bundle.test, list(range(info.rank, len(bundle.test), info.world)))
    pin = device.type == "cuda"
    test_loader = _loader(test_shard, max(per_rank_bs, 256), None, cfg.workers, None, False, pin)

    if start_epoch == 0:
        log(f"{cfg.mode} {cfg.arch}/{cfg.method} on {bundle.description}; device {device}, "
            f"backend {backend_used}, {info.world} process(es); {cfg.epochs} epochs -> {out}")

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        _seed_all(_epoch_seed(cfg.seed, epoch, info.rank))
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, info.rank))
        loader = _loader(bundle.train, per_rank_bs, sampler, cfg.workers, gen, drop_last, pin)
        net.train()
        tot = torch.zeros(3, dtype=torch.float64, device=device)
        lr = opt.param_groups[0]["lr"]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True, file=sys.stderr)
        for b, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                tot[0] += loss.detach().double() * y.numel()
                tot[1] += (logits.argmax(1) == y).sum()
                tot[2] += y.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{tot[0].item() / tot[2].item():.4f}",
                                acc=f"{100 * tot[1].item() / tot[2].item():.2f}%")
            if hooks.crash_after is not None and hooks.crash_after == (epoch + 1, b + 1):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(17)
        if bar is not None:
            bar.close()
        _all_reduce(tot, info)
        train_loss = tot[0].item() / max(tot[2].item(), 1)
        train_acc = 100.0 * tot[1].item() / max(tot[2].item(), 1)
        sched.step()
        t_train = time.perf_counter() - t0
        if info.active:
            # Each rank's last forward updated its own BN running statistics; evaluate (and
            # save) rank 0's everywhere, as DDP's broadcast_buffers does at the next forward.
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        test_loss, test_acc = evaluate(model, test_loader, device, info)
        t_epoch = time.perf_counter() - t0
        wall += t_epoch
        best = max(best, test_acc)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": test_loss, "test_acc": test_acc, "epoch_time_s": t_train,
               "eval_time_s": t_epoch - t_train}
        history.append(row)
        if hooks.on_epoch is not None:
            hooks.on_epoch(row)
        log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {train_loss:.4f}  train {train_acc:6.2f}%  "
            f"test {test_acc:6.2f}% (best {best:6.2f}%)  {t_train:.1f}s")

        # Every rank contributes its RNG state so that each resumes its own stream.
        rng = {str(info.rank): _rng_state()}
        if info.active:
            gathered: list = [None] * info.world
            dist.all_gather_object(gathered, rng)
            rng = {k: v for g in gathered for k, v in g.items()}
        if info.main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
                "build_config": dict(model.build_config), "epoch": epoch + 1,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng, "history": history,
                "best_test_acc": best, "wall_time_s": wall, "world_size": info.world,
            }, files["checkpoint"])
            _write_metrics(history, files["metrics"])
        if info.active:
            dist.barrier()

    results = {
        "config": cfg.to_dict(),
        "method": cfg.method, "arch": cfg.arch, "dataset": bundle.name,
        "dataset_description": bundle.description,
        "test_acc": history[-1]["test_acc"], "best_test_acc": best,
        "final_train_acc": history[-1]["train_acc"], "epochs": cfg.epochs,
        "wall_time_s": wall,
        "mean_epoch_time_s": float(np.mean([h["epoch_time_s"] for h in history])),
        "params": _count_params(model, models), "device": str(device),
        "backend": backend_used, "world_size": info.world, "torch_threads":
            torch.get_num_threads(), "versions": versions(),
        "source": source["path"] if source else None,
        "files": {"metrics": "metrics.csv", "checkpoint": "checkpoint.pt"},
    }
    if info.main:
        ticket = save_ticket(model, out, cfg.to_dict())
        results["files"]["ticket"] = ticket.name
        atomic_write_json(results, files["results"])
    if info.active:
        dist.barrier()
    return results


def _count_params(model: nn.Module, models) -> Any:
    try:
        n = models.count_parameters(model)
    except Exception as exc:  # a counting problem must not lose a finished run
        return f"unavailable ({exc})"
    if isinstance(n, torch.Tensor):
        n = n.item()
    return n


def _silent(_msg: str) -> None:
    pass
