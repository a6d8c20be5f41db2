"""The public face: ``binslt --version``, ``__all__``, type hints, reprs, docstrings (run as
doctests), TorchScript's refusal, output dtypes and the mode switches' ``requires_grad``."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import binslt
from binslt import cli


def test_version_option_prints_one_line_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    import triton

    assert out == (f"binslt {binslt.__version__}  torch {torch.__version__}  "
                   f"triton {triton.__version__}\n")


# --- __all__ ---------------------------------------------------------------------------------

#: Subpackages: reached by their path (binslt.nn.layers, ...), not star-exported; "kernels" is
#: the Triton kernels' package (binslt.kernels), bound once anything imports it.
SUBPACKAGES = {"analysis", "cli", "interop", "io", "kernels", "nn", "training"}


def test_all_names_resolve_and_cover_the_public_attributes():
    assert len(set(binslt.__all__)) == len(binslt.__all__)
    for name in binslt.__all__:
        assert getattr(binslt, name) is not None, name
    for name in ("models", "export_ticket", "load_ticket", "to_nir", "from_nir"):
        assert name in binslt.__all__
    assert binslt.models.build is not None
    # The old module paths (binslt.tickets, binslt.train, ...) are bound as attributes once some
    # code imports them through their DeprecationWarning: not public names.
    from binslt._moved import MOVED

    old = {path.split(".", 1)[1] for path in MOVED}
    public = {n for n in dir(binslt) if not n.startswith("_")} - SUBPACKAGES - old
    assert public <= set(binslt.__all__), sorted(public - set(binslt.__all__))


def test_star_import_binds_all_without_warnings():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from torch import nn\n"
            "from binslt import *\n"
            "import binslt\n"
            "assert nn.Module is __import__('torch').nn.Module\n"
            "missing = [n for n in binslt.__all__ if n not in globals()]\n"
            "assert not missing, missing\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok" and r.stderr == ""


# --- type hints ------------------------------------------------------------------------------

def _annotated_callables():
    """Every public function, class ``__init__`` and ``forward`` in ``binslt.__all__``, and the
    public functions and classes of the modules it lists (ops, reference, models)."""
    def of(name, obj):
        if inspect.isclass(obj):
            for attr in ("__init__", "forward"):
                f = obj.__dict__.get(attr)
                if inspect.isfunction(f):
                    yield f"{name}.{attr}", f
        elif inspect.isfunction(obj):
            yield name, obj

    for name in binslt.__all__:
        obj = getattr(binslt, name)
        if inspect.ismodule(obj):
            for k in getattr(obj, "__all__", None) or dir(obj):
                v = getattr(obj, k, None)
                if not k.startswith("_") and getattr(v, "__module__", "").startswith("binslt"):
                    yield from of(f"{name}.{k}", v)
        else:
            yield from of(name, obj)


def test_type_hints_resolve_on_every_public_callable():
    found = dict(_annotated_callables())
    for name in ("export_ticket", "load_ticket", "BinSpikeConv2d.__init__", "models.build",
                 "to_nir"):
        assert name in found
    bad = {}
    for name, f in found.items():
        try:
            typing.get_type_hints(f)
        except Exception as exc:  # noqa: BLE001 - the test lists every failure at once
            bad[name] = f"{type(exc).__name__}: {exc}"
    assert not bad, bad
    assert typing.get_type_hints(binslt.export_ticket)["path"] == typing.Union[
        str, os.PathLike[str]]


def test_py_typed_ships_with_the_package():
    root = Path(binslt.__file__).parent
    assert (root / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((root.parent / "pyproject.toml").read_text())
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["binslt"]


# --- repr ------------------------------------------------------------------------------------

def test_repr_shows_each_layers_settings():
    from binslt import nn as bnn

    assert repr(binslt.BinLinear(4, 3)) == "BinLinear(4, 3, prune_rate=0.5, mode=search)"
    r = repr(binslt.BinConv2d(2, 4, 3, stride=2, padding=1, prune_rate=0.25,
                              per_channel_gain=True))
    assert r == ("BinConv2d(2, 4, kernel_size=3, stride=2, padding=1, prune_rate=0.25, "
                 "mode=search, per_channel_gain=True)")
    r = repr(binslt.BinSpikeConv2d(2, 4, 3, padding=1, pool=2, backend="torch", tau=4.0))
    assert r.startswith("BinSpikeConv2d(2, 4, kernel_size=3, stride=1, padding=1, pool=2, "
                        "prune_rate=0.5, mode=search, input=spike, backend=torch, tau=4, "
                        "decay_input=True, v_threshold=1, v_reset=0.0")
    r = repr(binslt.BinSpikeLinear(4, 3, neuron="if", input="real"))
    assert r.startswith("BinSpikeLinear(4, 3, prune_rate=0.5, mode=search, input=real, "
                        "backend=auto, neuron=IF")
    assert repr(binslt.LIF(v_threshold=0.5, backend="torch")).endswith(
        "v_threshold=0.5, v_reset=0.0, detach_reset=False, surrogate=atan(2), "
        "backend=torch)")
    assert repr(binslt.SpikeMaxPool2d(3, 1, 1)) == "SpikeMaxPool2d(kernel_size=3, stride=1, " \
        "padding=1)"
    layer = binslt.BinLinear(4, 3)
    layer.mode = "finetune"
    assert "mode=finetune" in repr(layer)
    # every layer class of binslt.nn.layers with settings has its own extra_repr
    for cls in (binslt.BinSpikeConv2d, binslt.BinSpikeLinear, binslt.BinConv2d,
                binslt.BinLinear, binslt.LIF, binslt.SpikeMaxPool2d):
        assert "extra_repr" in cls.__dict__, cls
    assert bnn.layers.SignActivation.__init__ is torch.nn.Module.__init__  # has no settings


# --- docstrings ------------------------------------------------------------------------------

DOCUMENTED = ("BinSpikeConv2d", "BinSpikeLinear", "BinConv2d", "BinLinear", "LIF",
              "SpikeMaxPool2d")


def test_layer_docstrings_run_as_doctests():
    """The examples of every module binslt.nn.layers gathers (its parts: base, neuron, weight,
    spiking, conv, linear, binary, pool) run."""
    import doctest
    import sys

    from binslt.nn import layers

    parts = sorted({sys.modules[getattr(layers, n).__module__] for n in dir(layers)
                    if getattr(getattr(layers, n), "__module__", "").startswith("binslt.nn.")},
                   key=lambda m: m.__name__)
    assert {m.__name__.rsplit(".", 1)[-1] for m in parts} >= {"conv", "linear", "binary", "pool",
                                                             "neuron", "spiking", "weight"}
    attempted, with_examples = 0, set()
    finder = doctest.DocTestFinder()
    for mod in parts:
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, raise_on_error=False)
        assert res.failed == 0, mod.__name__
        attempted += res.attempted
        with_examples |= {t.name.rsplit(".", 1)[-1] for t in finder.find(mod) if t.examples}
    assert attempted >= 20
    assert set(DOCUMENTED) <= with_examples


@pytest.mark.parametrize("name", DOCUMENTED)
def test_class_docstring_lists_every_init_argument_and_shapes(name):
    cls = getattr(binslt, name)
    doc = cls.__doc__
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert params
    missing = [p for p in params if f"{p} (" not in doc]
    assert not missing, f"{name}: {missing}"
    assert "Shape:" in doc and "[T, N, " in doc and ">>> " in doc
    # __init__ and forward have their own docstrings, not torch.nn.Module's
    for attr in ("__init__", "forward"):
        own = cls.__dict__[attr].__doc__
        assert own and own != getattr(torch.nn.Module, attr).__doc__, (name, attr)
    if issubclass(cls, binslt.nn.layers._MaskedSignWeight):
        assert "mode" in doc and "requires_grad" in doc


# --- mode switches keep the user's requires_grad choices ---------------------------------------

def _grads(m):
    return m.weight.requires_grad, m.scores.requires_grad


@pytest.mark.parametrize("freeze", ["model", "layer", "scores"])
def test_a_frozen_layer_stays_frozen_across_mode_switches(freeze):
    from binslt.nn import models

    net = torch.nn.Sequential(binslt.BinSpikeLinear(8, 4), binslt.BinLinear(4, 2))
    first, last = net[0], net[1]
    assert _grads(first) == (False, True)  # search trains the scores
    {"model": net, "layer": first, "scores": first.scores}[freeze].requires_grad_(False)
    models.set_mode(net, "finetune")
    assert _grads(first) == (False, False)  # not silently trainable again
    assert _grads(last) == ((False, False) if freeze == "model" else (True, False))
    models.set_mode(net, "frozen")
    assert _grads(first) == (False, False)


def test_unfreezing_lets_the_modes_drive_the_flags_again():
    layer = binslt.BinSpikeConv2d(2, 4, 3)
    layer.requires_grad_(False)
    layer.mode = "finetune"
    assert _grads(layer) == (False, False)
    layer.weight.requires_grad_(True)  # the user's word: train w again
    layer.mode = "search"
    assert _grads(layer) == (False, True)
    layer.mode = "finetune"
    assert _grads(layer) == (True, False)


def test_loading_a_finetune_checkpoint_keeps_a_users_freeze():
    src = binslt.BinSpikeLinear(8, 4)
    src.mode = "finetune"
    dst = binslt.BinSpikeLinear(8, 4).requires_grad_(False)
    dst.load_state_dict(src.state_dict())
    assert dst.mode == "finetune" and _grads(dst) == (False, False)
    fresh = binslt.BinSpikeLinear(8, 4)
    fresh.load_state_dict(src.state_dict())
    assert fresh.mode == "finetune" and _grads(fresh) == (True, False)


# --- TorchScript: refused first, pointing to torch.export --------------------------------------

def _tiny_net():
    from binslt.nn import models

    torch.manual_seed(0)
    return models.build("conv4", "binwslt", num_classes=10, in_channels=1, input_size=8)


def _jit_cases():
    layer = binslt.BinSpikeConv2d(2, 4, 3, padding=1)
    x = (torch.rand(2, 1, 2, 6, 6) > 0.5).float()
    wrapped = torch.nn.Sequential(torch.nn.Identity(), binslt.LIF())
    return {
        "script BinSpikeConv2d": lambda: torch.jit.script(layer),
        "trace BinSpikeConv2d": lambda: torch.jit.trace(layer, x),
        "script BinLinear": lambda: torch.jit.script(binslt.BinLinear(4, 3)),
        "trace BinLinear": lambda: torch.jit.trace(binslt.BinLinear(4, 3), torch.ones(2, 4)),
        "script LIF in a Sequential": lambda: torch.jit.script(wrapped),
        "trace LIF in a Sequential": lambda: torch.jit.trace(wrapped, torch.ones(3, 2, 4)),
        "script model": lambda: torch.jit.script(_tiny_net()),
        "trace model": lambda: torch.jit.trace(_tiny_net(), torch.rand(2, 1, 8, 8)),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated")
@pytest.mark.parametrize("case", list(_jit_cases()))
def test_torchscript_is_refused_first_with_a_pointer_to_torch_export(case):
    from binslt.nn.layers import TorchScriptNotSupportedError

    with pytest.raises(TorchScriptNotSupportedError) as exc:
        _jit_cases()[case]()
    msg = str(exc.value)
    assert "TorchScript" in msg and "not supported" in msg
    assert "torch.export" in msg and "binslt.interop.export.export_program" in msg
    # the first error: nothing of TorchScript's own is chained to it
    assert exc.value.__cause__ is None and exc.value.__context__ is None


# --- dtypes: a model's output follows its parameters' dtype ------------------------------------

@pytest.mark.parametrize("arch,dtype", [("conv4", torch.float64), ("conv4", torch.bfloat16),
                                        ("resnet19", torch.float64)])  # packed shortcuts
def test_model_output_follows_the_parameter_dtype_under_no_grad(arch, dtype):
    from binslt.nn import models

    torch.manual_seed(0)
    size, steps = 8, 2 if arch == "conv4" else 1
    net = models.build(arch, "binwslt", num_classes=10, in_channels=1, input_size=size,
                       timesteps=steps).to(dtype).eval()
    assert {p.dtype for p in net.parameters()} == {dtype}
    x = torch.rand(2, 1, size, size).to(dtype)
    with torch.no_grad():
        y = net(x)
        spikes = net._chained_features(x.unsqueeze(0).expand(steps, *x.shape))
    assert y.dtype == dtype and y.shape == (2, 10)
    assert spikes.dtype == dtype and bool(((spikes == 0) | (spikes == 1)).all())
    y_grad = net(x)  # the autograd path: the same dtype and the same logits
    assert y_grad.dtype == dtype
    torch.testing.assert_close(y, y_grad.detach(), rtol=0, atol=0 if dtype == torch.float64
                               else 1e-2)


# --- every public callable: arguments, shapes and an example that runs -------------------------

def _public_callables():
    return {n: getattr(binslt, n) for n in binslt.__all__
            if inspect.isclass(getattr(binslt, n)) or inspect.isfunction(getattr(binslt, n))}


@pytest.mark.parametrize("name", sorted(_public_callables()))
def test_public_callable_docstring_has_arguments_shapes_and_an_example(name):
    obj = _public_callables()[name]
    doc = inspect.getdoc(obj) or ""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = [p for p in inspect.signature(target).parameters if p not in ("self", "args",
                                                                             "kwargs")]
    missing = [p for p in params if p not in doc]
    assert not missing, f"{name}: arguments not described: {missing}"
    shape = re.search(r"\[[A-Z], ", doc) or re.search(r"\[T, N", doc) or "Any shape" in doc
    assert shape, f"{name}: no shape"
    assert ">>> " in doc, f"{name}: no example"


@pytest.mark.parametrize("name", sorted(_public_callables()))
def test_public_callable_examples_run_as_doctests(name):
    import doctest

    obj = _public_callables()[name]
    finder = doctest.DocTestFinder(recurse=False)
    tests = [t for t in finder.find(obj, name, globs={}) if t.examples]
    assert tests, name
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, name


# --- a type checker on the public API ---------------------------------------------------------

def test_mypy_passes_on_the_public_api_and_catches_a_bad_call(tmp_path):
    """mypy on binslt/__init__.py and code a user writes against the public names
    (tests/typing/public_api_usage.py), reading binslt's annotations (``follow-imports=silent``:
    the bodies of the modules behind them are not reported); a call with wrong argument types
    is an error, so the check has teeth."""
    pytest.importorskip("mypy")
    root = Path(binslt.__file__).resolve().parents[1]
    bad = tmp_path / "bad_usage.py"
    bad.write_text("import binslt\n"
                   "binslt.load_ticket(3.5)\n"
                   "binslt.models.build('conv4', 'binwslt', timesteps='two')\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent",
                        "--ignore-missing-imports", "--cache-dir", str(tmp_path / "cache"),
                        "--no-error-summary", str(root / "binslt" / "__init__.py"),
                        str(root / "tests" / "typing" / "public_api_usage.py"), str(bad)],
                       cwd=root, capture_output=True, text=True, timeout=600)
    errors = [ln for ln in r.stdout.splitlines() if ": error: " in ln]
    assert all(ln.startswith(str(bad)) for ln in errors), r.stdout
    assert len(errors) == 2 and '"load_ticket"' in errors[0] and '"timesteps"' in errors[1], \
        r.stdout
