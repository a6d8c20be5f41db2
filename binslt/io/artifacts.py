"""Runs on disk: atomic writes, run directories, checkpoints, rebuilding and evaluating models.

The one place that reads and writes what ``binslt search`` / ``train`` / ``finetune`` leave in
a run directory, and the layer between the network code (``ops``, ``layers``, ``models``) and
the modules that use runs (``tickets``, ``energy``, ``train``, then the CLI on top). Nothing
here imports those modules.

A run directory ``DIR`` holds

- ``DIR/checkpoint.pt``: ``torch.save`` of a dict (format :data:`CHECKPOINT_FORMAT`) with the
  full model state (latent weights and scores included), optimizer, scheduler and RNG states,
  the epoch count, the metric history, the run config and the model's build config. Written
  after every epoch; ``--resume`` and ``finetune`` read it. It holds tensors, numbers, strings
  and containers only, so it loads with ``torch.load(weights_only=True)``, which runs no code.
- ``DIR/metrics.csv``: one row per epoch.
- ``DIR/results.json``: the config, final and best accuracy, wall time and versions.
- ``DIR/ticket.safetensors``: the final network in the packed ticket format of
  :mod:`binslt.tickets` (the file ``binslt export`` writes; ``binslt eval`` reads it). Dense
  baselines (ann, snn) have no masked layers: their ticket holds the state dict's tensors as
  they are, in the same format.

Errors: every problem with a file raises :class:`ArtifactError` (a ``ValueError``) whose one-line
message names the file; :class:`binslt.io.tickets.TicketError` is a subclass.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import models

__all__ = ["ArtifactError", "CHECKPOINT_FORMAT", "LEGACY_TICKET_FORMAT", "RunDir",
           "atomic_torch_save", "atomic_write_bytes", "atomic_write_csv", "atomic_write_json",
           "build_network", "evaluate", "evaluate_counts", "first_line", "load_model",
           "load_source", "load_state", "load_torch_file", "rebuild_model", "resolve_device",
           "resolve_source"]

CHECKPOINT_FORMAT = "binslt-checkpoint-v1"
#: ``ticket.pt`` of run directories written before the safetensors ticket (read, never written)
LEGACY_TICKET_FORMAT = "binslt-ticket-torch-v1"

PathLike = Union[str, os.PathLike[str]]


class ArtifactError(ValueError):
    """A run directory, checkpoint, ticket or device binslt cannot use: missing, corrupt, of
    another format, inconsistent with its own build config. The message is one line and names
    the file."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Atomic writes: readers see the old file or the new one, never a torn one
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj: Any, path: PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_csv(rows: Iterable[dict[str, Any]], path: PathLike,
                     fields: Iterable[str]) -> None:
    """A CSV with a header of ``fields``; keys of ``rows`` outside ``fields`` are left out."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------


class RunDir:
    """The files of one run directory (see the module docstring)."""

    CHECKPOINT = "checkpoint.pt"
    RESULTS = "results.json"
    METRICS = "metrics.csv"
    TICKET = "ticket.safetensors"
    LEGACY_TICKET = "ticket.pt"

    def __init__(self, path: PathLike):
        self.path = Path(path)

    checkpoint = property(lambda self: self.path / self.CHECKPOINT)
    results = property(lambda self: self.path / self.RESULTS)
    metrics = property(lambda self: self.path / self.METRICS)
    ticket = property(lambda self: self.path / self.TICKET)
    legacy_ticket = property(lambda self: self.path / self.LEGACY_TICKET)

    def written_files(self) -> list[Path]:
        """The files a run writes (a fresh start removes them)."""
        return [self.checkpoint, self.results, self.metrics, self.ticket, self.legacy_ticket]

    def read_results(self) -> dict[str, Any] | None:
        """``results.json`` (None when absent); :class:`ArtifactError` when unreadable."""
        if not self.results.is_file():
            return None
        try:
            obj = json.loads(self.results.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{self.results} is unreadable ({first_line(exc)})") from None
        if not isinstance(obj, dict):
            raise ArtifactError(f"{self.results} is not a binslt results file (no JSON object)")
        return obj

    def saved_config(self) -> dict[str, Any] | None:
        """The run config: the checkpoint's, else results.json's; None for an empty directory."""
        if self.checkpoint.is_file():
            return load_torch_file(self.checkpoint, "checkpoint").get("config")
        res = self.read_results()
        return None if res is None else res.get("config")


def load_torch_file(path: PathLike, what: str) -> dict:
    """``torch.load(weights_only=True)`` of a binslt file, or a one-line :class:`ArtifactError`
    for a missing, corrupt or foreign one. ``what`` names the file's role in the message."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {str(path)!r} not found")
    # torch.load does not check the zip's CRC-32s: flipped tensor bytes would load silently.
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception:  # not a zip at all (truncated, legacy format): torch.load reports it
        bad = None
    if bad is not None:
        raise ArtifactError(f"{what} {str(path)!r} is corrupt (CRC mismatch in {bad!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{what} {str(path)!r} is corrupt or not a binslt file "
                            f"({_load_failure(exc)})") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} {str(path)!r} is not a binslt file (no dict inside)")
    return obj


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: its weights-only
    unpickler's own reason, without torch's advice to load it with ``weights_only=False``
    (binslt never does: a file it reads cannot run code)."""
    text = str(exc)
    if "WeightsUnpickler error:" not in text:
        return first_line(exc)
    reason = next((ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines()
                   if ln.strip()), "")
    if reason.startswith("Unsupported global:"):
        name = reason.split("GLOBAL", 1)[-1].split(" was not")[0].strip()
        return (f"it pickles a Python object, {name}, where binslt files hold tensors and plain "
                "values only; binslt does not unpickle objects")
    if reason.startswith("Unsupported operand") or not reason:
        return "not a torch.save file of tensors"
    return reason.split(". Please use")[0]


def resolve_source(src: PathLike) -> Path:
    """The torch file a source names: the file itself, or a run directory's checkpoint (an older
    run directory's ``ticket.pt`` when it has no checkpoint)."""
    p = Path(src).expanduser()
    if p.is_dir():
        run = RunDir(p)
        for f in (run.checkpoint, run.legacy_ticket):
            if f.is_file():
                return f
        raise ArtifactError(f"{str(p)!r} holds no {RunDir.CHECKPOINT}; give the output "
                            "directory of a `binslt search` or the file itself")
    if not p.is_file():
        raise ArtifactError(f"{str(p)!r}: no such file or directory")
    return p


def load_source(src: PathLike) -> dict[str, Any]:
    """``{'config', 'build_config', 'state_dict', 'path'}`` of a checkpoint (or an older run's
    ``ticket.pt``), given as the file or its run directory. The state is the full one: latent
    weights and scores included."""
    path = resolve_source(src)
    if path.suffix == ".safetensors":
        raise ArtifactError(f"{str(path)!r} is a packed ticket: it keeps no latent weights or "
                            "scores; give the run directory or its checkpoint.pt")
    obj = load_torch_file(path, "checkpoint")
    fmt = obj.get("format")
    if fmt == CHECKPOINT_FORMAT:
        sd = obj.get("model")
    elif fmt == LEGACY_TICKET_FORMAT:
        sd = obj.get("state_dict")
    else:
        raise ArtifactError(f"{str(path)!r} is not a binslt checkpoint (format {fmt!r}, "
                            f"expected {CHECKPOINT_FORMAT!r})")
    if not isinstance(sd, dict) or not isinstance(obj.get("build_config"), dict):
        raise ArtifactError(f"{str(path)!r} is incomplete (no model state or build config)")
    return {"config": obj.get("config") or {}, "build_config": obj["build_config"],
            "state_dict": sd, "path": str(path)}


# ---------------------------------------------------------------------------------------------
# Models from saved build configs
# ---------------------------------------------------------------------------------------------


def build_network(build_config: dict[str, Any]) -> nn.Module:
    """The one place a network is built from a build config: the paper's networks
    (``binslt.models.build(**build_config)``) or, for a config with a ``factory`` (a ``binslt
    search --model`` run), the user's SpikingJelly model converted again
    (``binslt.interop.convert.build_user_model``). A config that does not build raises
    ``ValueError`` or ``TypeError``; the callers turn it into their own error type."""
    if "factory" in build_config:
        from ..interop.convert import build_user_model

        return build_user_model(**build_config)
    return models.build(**build_config)


def rebuild_model(build_config: dict[str, Any], backend: str | None = None, *,
                  path: PathLike | None = None,
                  error: type[ArtifactError] = ArtifactError) -> nn.Module:
    """A fresh network from a saved ``model.build_config`` (``backend`` overrides the saved
    one). A config that does not build raises ``error`` naming ``path``."""
    kw = dict(build_config)
    if backend is not None:
        kw["backend"] = backend
    try:
        return build_network(kw)
    except (ValueError, TypeError) as exc:
        where = repr(str(path)) if path is not None else "the saved model"
        raise error(f"{where}: its config does not build a network ({exc})") from None


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: PathLike) -> None:
    """``model.load_state_dict(state_dict)`` (strict); a mismatch names ``path`` and the first
    offending tensor."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else "")
        raise ArtifactError(f"{str(path)!r}: its weights do not match its build config "
                            f"({detail})") from None


def load_model(src: PathLike, backend: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, source)`` from a checkpoint or run directory (see :func:`load_source`): the
    network rebuilt from its build config with the saved state, on the CPU, in eval mode."""
    source = load_source(src)
    model = rebuild_model(source["build_config"], backend, path=source["path"])
    load_state(model, source["state_dict"], source["path"])
    return model.eval(), source


# ---------------------------------------------------------------------------------------------
# Devices and evaluation
# ---------------------------------------------------------------------------------------------


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N``. Under
    ``torchrun``, plain ``cuda`` means the process's own GPU (``local_rank``)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ArtifactError(f"--device {spec} asked for, but no CUDA device is visible; use "
                                "--device cpu")
        if spec == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise ArtifactError(f"bad --device {spec!r}: {exc}") from None


@torch.no_grad()
def evaluate_counts(model: nn.Module, loader: Iterable, device: torch.device,
                    all_reduce: Callable[[torch.Tensor], Any] | None = None,
                    ) -> tuple[float, int, int]:
    """``(summed cross-entropy, correct, examples)`` of ``model`` (put in eval mode) over
    ``loader``. ``all_reduce`` sums the float64 totals over processes (a sharded test set)."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        tot[0] += F.cross_entropy(logits, y, reduction="sum").double()
        tot[1] += (logits.argmax(1) == y).sum()
        tot[2] += y.numel()
    if all_reduce is not None:
        all_reduce(tot)
    return tot[0].item(), int(tot[1].item()), int(tot[2].item())


def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             all_reduce: Callable[[torch.Tensor], Any] | None = None) -> tuple[float, float]:
    """``(mean loss, accuracy %)`` over the whole (sharded) set; see :func:`evaluate_counts`."""
    loss, correct, n = evaluate_counts(model, loader, device, all_reduce)
    n_safe = max(float(n), 1.0)
    return loss / n_safe, 100.0 * correct / n_safe
