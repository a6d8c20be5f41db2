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

import os
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
from torch.utils.data import DataLoader, DistributedSampler

from .. import ops
from ..io.artifacts import (
    CHECKPOINT_FORMAT,
    ArtifactError,
    RunDir,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    build_network,
    evaluate,
    load_source,
    load_state,
    load_torch_file,
    rebuild_model,
    resolve_device,
)
from ..io.tickets import export_ticket
from ..nn import models
from ..nn.layers import name_layers
from . import data as data_mod
from .config import (  # noqa: F401  (re-exported: the names this module has always offered)
    ARCHS,
    MASKED,
    METHODS,
    NEURONS,
    OPTIMIZERS,
    SPIKING,
    SURROGATES,
    DivergedError,
    RunConfig,
    RunError,
)
from .early_time import (  # noqa: F401
    choose_early_time,
    early_time_divergences,
    select_early_time,
)
from .errors import ModelError, _failing_layer, _user_frame, model_error  # noqa: F401
from .runtime import (  # noqa: F401
    RUN_MMAP_THRESHOLD,
    DistInfo,
    _epoch_seed,
    _rng_state,
    _seed_all,
    _set_rng_state,
    gc_paused,
    malloc_configured_by_env,
    set_mmap_threshold,
    setup_distributed,
    versions,
)

__all__ = ["ARCHS", "DivergedError", "METHODS", "ModelError", "RunConfig", "RunError",
           "RunHooks", "build_model",
           "build_or_restore", "choose_early_time", "early_time_divergences", "evaluate",
           "finish", "load_data", "make_optimizer", "prepare_output", "restore_checkpoint", "run",
           "save_checkpoint", "save_ticket", "select_early_time", "train_one_epoch", "versions"]



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
    """The network of ``cfg`` for a dataset's image shape, built by
    :func:`binslt.io.artifacts.build_network` (with ``--model``: the user's SpikingJelly model,
    converted); bad combinations become a :class:`RunError`."""
    if cfg.model is not None:
        shape = cfg.input_shape or f"{in_channels},{input_size},{input_size}"
        try:
            model = build_network(dict(factory=cfg.model, num_classes=num_classes,
                                       input_shape=shape, timesteps=cfg.timesteps,
                                       prune_rate=cfg.prune_rate, backend=cfg.backend))
        except (ValueError, TypeError) as exc:
            raise RunError(str(exc)) from None
        got = tuple(model.build_config["input_shape"])
        if got != (in_channels, input_size, input_size):
            raise RunError(f"--input-shape {','.join(map(str, got))} does not match the "
                           f"dataset's images ({in_channels},{input_size},{input_size})")
        return model
    try:
        return build_network(dict(arch=cfg.arch, variant=cfg.method, num_classes=num_classes,
                                  in_channels=in_channels, input_size=input_size,
                                  timesteps=cfg.timesteps, prune_rate=cfg.prune_rate,
                                  backend=cfg.backend, bn_affine=cfg.bn_affine,
                                  **cfg.neuron_options()))
    except (ValueError, TypeError) as exc:
        raise RunError(f"cannot build {cfg.arch}/{cfg.method}: {exc}") from None


def save_ticket(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``out_dir/ticket.safetensors``, the packed ticket of :func:`binslt.tickets.
    export_ticket` (dense models: their tensors as they are), and return its path."""
    path = RunDir(out_dir).ticket
    export_ticket(model, path)
    return path



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
    elif not overwrite and resume and not run_dir.checkpoint.exists() \
            and not run_dir.results.exists():
        log(f"{out}: no checkpoint to resume; starting the run")
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
    with gc_paused():  # the first optimizer imports torch._dynamo
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

    On glibc the run fixes the C allocator's mmap threshold at 32 MiB and its trim threshold at
    64 MiB (:func:`binslt.training.runtime.set_mmap_threshold`): the steps then reuse the memory
    the step before freed instead of faulting it in again. Thresholds set in the environment
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) are left alone.
    """
    cfg.validate()
    if not malloc_configured_by_env():
        set_mmap_threshold(RUN_MMAP_THRESHOLD)
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


def _setup_model(cfg: RunConfig, run_dir: RunDir, info: DistInfo, bundle, device: torch.device,
                 *, fresh: bool, log: Callable[[str], None]
                 ) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any] | None]:
    """``(model, source, early)``: the network (fresh, or the ticket a finetune starts from) on
    ``device``, what it was restored from, and the early-time choice (None without
    ``--early-time``). ``fresh``: the run starts now (not resumed), so the choices are logged."""
    model, source = build_or_restore(cfg, bundle)
    name_layers(model)  # errors name the layer (BinSpikeConv2d net.features.3: ...)
    report = getattr(model, "conversion_report", None)
    if report is not None and info.main:  # --model: what the conversion did, with the run
        atomic_write_bytes(run_dir.path / "report.txt", (str(report) + "\n").encode())
        atomic_write_json(report.to_dict(), run_dir.path / "report.json")
        if fresh:
            log(str(report))
    model.to(device)
    early = None
    if cfg.early_time:  # on the fresh network (a resumed run rebuilds the same one first)
        early = choose_early_time(cfg, model, bundle, device)
        if fresh:
            log(f"early-time: T'={early['T_prime']} of T={cfg.timesteps} (normalised KL "
                + ", ".join(f"T'={t}: {v:.3f}" for t, v in early["normalised"].items())
                + f"; threshold {cfg.early_time_threshold:g}); the last {early['tune_epochs']} "
                "epoch(s) and every evaluation at T")
    return model, source, early


def _train(cfg: RunConfig, run_dir: RunDir, info: DistInfo, *, resume: bool, overwrite: bool,
           progress: bool, hooks: RunHooks, log: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(cfg.device, info.local_rank if info.active else None)
    done, ckpt = prepare_output(cfg, run_dir, info, resume=resume, overwrite=overwrite, log=log)
    if done is not None:
        return done
    bundle = load_data(cfg, info)
    per_rank_bs = cfg.batch_size // info.world

    model, source, early = _setup_model(cfg, run_dir, info, bundle, device, fresh=ckpt is None,
                                        log=log)
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
