"""The errors of a run: :class:`RunError` (a bad option, an unusable checkpoint, an occupied
directory), :class:`DivergedError` (the loss turned NaN or inf) and :class:`ModelError` (the
model failed inside the run), with :func:`model_error`, which names the layer an exception came
through in one line."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..nn.layers import NonFiniteError

__all__ = ["DivergedError", "ModelError", "RunError", "model_error"]


class RunError(Exception):
    """A user-facing problem with a run (bad option, unusable checkpoint, occupied directory)."""


class DivergedError(RunError):
    """The training loss turned NaN or inf: the run stops before that step's optimizer update,
    and the checkpoint of the last finished epoch stays as it was."""

    def __init__(self, msg: str, epoch: int, step: int):
        super().__init__(msg)
        self.epoch, self.step = epoch, step


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
