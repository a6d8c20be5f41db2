"""torch.export of frozen binslt tickets.

A frozen ticket (``binslt.io.tickets.load_ticket``, or any ``BinSLTNet`` after
``binslt.models.set_mode(model, 'frozen')``) exports with ``torch.export.export`` as it is: under
``torch.no_grad()`` its spiking layers call the ``binslt::`` ops (``bconv_lif_infer`` on packed
weight bits, ``bn_lif`` for the first layer), whose fake kernels give the shapes. The program
holds those ops by name; running it needs their schemas and kernels, i.e. ``import binslt``, or
outside this package's Python :func:`load_ops_standalone` (see ``docs/nir.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["export_program", "load_ops_standalone", "load_program", "op_library_paths",
           "save_program"]

PathLike = Union[str, os.PathLike[str]]
_LIBS: list = []


def _as_model(model_or_path) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    from ..io.tickets import load_ticket

    return load_ticket(model_or_path)


def export_program(model_or_path, example_input: torch.Tensor, *,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a frozen ticket model (or a packed ticket file).

    The model must be in frozen mode (packed weights: the program then carries 2-bit planes,
    not float weights) and is exported in eval mode under ``torch.no_grad()``, the path the
    packed kernels take. ``dynamic_batch`` makes the batch dimension symbolic (size >= 1)."""
    from ..nn.layers import _MaskedSignWeight

    model = _as_model(model_or_path)
    not_frozen = [n for n, m in model.named_modules()
                  if isinstance(m, _MaskedSignWeight) and m.mode != "frozen"]
    if not_frozen:
        raise ValueError(f"export_program exports frozen tickets; layers {not_frozen[:3]} are not "
                         "frozen (binslt.models.set_mode(model, 'frozen') or load_ticket)")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be a batch of images [N, C, H, W]")
    was_training = model.training
    model.eval()
    try:
        dyn = None
        if dynamic_batch:
            dyn = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
        with torch.no_grad():
            return torch.export.export(model, (example_input,), dynamic_shapes=dyn)
    finally:
        model.train(was_training)


def save_program(program: torch.export.ExportedProgram, path: PathLike) -> Path:
    """``torch.export.save`` to ``path`` (a ``.pt2`` archive)."""
    path = Path(path)
    torch.export.save(program, str(path))
    return path


def load_program(path: PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load`` with the ``binslt::`` ops registered (imports binslt)."""
    from .. import ops  # noqa: F401  (registers the schemas and kernels)

    return torch.export.load(str(path))


def op_library_paths(folder: Optional[PathLike] = None) -> dict[str, Optional[str]]:
    """The compiled kernel libraries of this install (or of ``folder``) built for this Python:
    ``{'cpu': path or None, 'cuda': path or None}``. Only the file names that this interpreter
    imports (``importlib.machinery.EXTENSION_SUFFIXES``, e.g.
    ``_C.cpython-312-x86_64-linux-gnu.so``) count, so a build for another Python in the same
    folder is never picked."""
    from importlib.machinery import EXTENSION_SUFFIXES

    here = Path(folder) if folder is not None else Path(__file__).resolve().parents[1]  # binslt/
    out: dict[str, Optional[str]] = {}
    for key, stem in (("cpu", "_C"), ("cuda", "_C_cuda")):
        hits = [here / (stem + suffix) for suffix in EXTENSION_SUFFIXES]
        out[key] = next((str(p) for p in hits if p.is_file()), None)
    return out


def load_ops_standalone(cpu_library: PathLike, schemas_file: Optional[PathLike] = None,
                        cuda_library: Optional[PathLike] = None) -> None:
    """Register the ``binslt::`` ops without importing binslt (e.g. in another environment
    that only has torch): declare the schemas from ``binslt/ops/schemas.py`` (a standalone
    file; default: this install's) and load the kernel libraries with
    ``torch.ops.load_library``. The libraries only implement the ops (``TORCH_LIBRARY_IMPL``);
    the schemas are declared in Python, so both steps are needed. This function is itself
    standalone: it may be copied out of binslt."""
    import runpy

    schemas_file = schemas_file or Path(__file__).resolve().parents[1] / "ops" / "schemas.py"
    declared = runpy.run_path(str(schemas_file))
    schemas = [*declared["SCHEMAS"].values(), *declared.get("WEIGHT_SCHEMAS", {}).values(),
               *declared.get("AUX_SCHEMAS", {}).values()]
    lib = torch.library.Library("binslt", "FRAGMENT")
    for schema in schemas:
        try:
            lib.define(schema)
        except RuntimeError as exc:  # already declared (binslt imported in this process)
            if "already" not in str(exc) and "multiple times" not in str(exc):
                raise
    _LIBS.append(lib)  # a Library object must stay alive for its definitions to stay
    torch.ops.load_library(str(cpu_library))
    if cuda_library is not None:
        torch.ops.load_library(str(cuda_library))
