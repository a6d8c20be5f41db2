"""The base of binslt's ``torch.autograd.Function`` classes."""

from __future__ import annotations

import inspect

import torch


class Function(torch.autograd.Function):
    """``torch.autograd.Function`` whose ``forward`` signature is read once, at class creation.

    In the ``setup_context`` form (which ``torch.func`` transforms need) ``apply`` binds every
    call's arguments to ``forward``'s signature, and ``inspect.signature`` rebuilds that
    signature on each call (~30 us; 0.35-0.45 ms of a Conv-4 search step's 13 calls on a 2-core
    AMD EPYC). A ``__signature__`` on the function is what ``inspect.signature`` returns as is
    (PEP 362).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fwd = cls.__dict__.get("forward")
        fn = fwd.__func__ if isinstance(fwd, staticmethod) else fwd
        if fn is not None and "__signature__" not in fn.__dict__:
            fn.__signature__ = inspect.signature(fn)
