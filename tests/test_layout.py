"""The package layout: each subpackage of binslt is one layer (docs/design.md section 0), no
module imports a layer above its own, the flat layout's module paths keep importing with a
DeprecationWarning, and the public API imports without one."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from binslt._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]

#: The layers, bottom up (docs/design.md section 0). A module imports its own subpackage and
#: subpackages of lower rank only, lazy (function-level) imports included; subpackages of equal
#: rank (training, analysis) do not import each other. ``kernels`` (the Triton kernels, installed
#: as binslt.kernels) and the compiled extensions ``_C``/``_C_cuda`` sit below the ops.
RANK = {
    "kernels": -1, "_C": -1, "_C_cuda": -1,
    "ops": 0,  # schemas, contract, reference, backend choice, autograd, layer calls, check
    "nn": 1,  # the nn.Modules and the paper's networks
    "io": 2,  # files: run directories, checkpoints, rebuilding a model; packed tickets
    "interop": 3,  # SpikingJelly in/out, NIR, torch.export (NIR and export read tickets and runs)
    "training": 4, "analysis": 4,  # the search/training loop, datasets, seed statistics; energy
    "cli": 5,  # argparse, exit codes, printing
}

#: Known lazy imports of a layer above, each inside one function (module, imported subpackage):
#: * io/artifacts.py -> interop.convert: ``build_network`` (behind ``rebuild_model`` and the
#:   training loop's ``build_model``) builds a network from a user's SpikingJelly factory
#:   (``build_user_model``);
#: * interop/nir.py -> training.data: ``eval_nir_file`` (``binslt eval FILE.nir``) loads the dataset
#:   it reports an accuracy on.
KNOWN_EXCEPTIONS = {
    ("io/artifacts.py", "interop"),
    ("interop/nir.py", "training"),
}

#: binslt.<name> a module may import that is not a subpackage (the package root's version).
ROOT_NAMES = {"__version__"}


def _binslt_imports(path: Path) -> list[tuple[list[str], bool]]:
    """(dotted binslt module path as parts, whether the import is inside a function) for every
    import of ``path`` naming a binslt module below the package root."""
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(ROOT).with_suffix("").parts[:-1]
    out = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = list(pkg[: len(pkg) - child.level + 1])
                    mod = base + (child.module.split(".") if child.module else [])
                else:
                    mod = (child.module or "").split(".")
                names = [mod + [a.name] for a in child.names] if not child.module else [mod]
            elif isinstance(child, ast.Import):
                names = [a.name.split(".") for a in child.names]
            out.extend((p, inner) for p in names if p[:1] == ["binslt"] and len(p) > 1)
            visit(child, inner)

    visit(tree, False)
    return out


def _library_files():
    for path in sorted((ROOT / "binslt").rglob("*.py")):
        rel = path.relative_to(ROOT / "binslt")
        if rel.parts[0] == "kernels":
            continue  # a link to kernels/ in a development tree: checked below as its own layer
        yield rel, path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield Path("kernels") / path.name, path


def test_each_subpackage_has_a_rank():
    subpackages = {p.parent.name for p in (ROOT / "binslt").glob("*/__init__.py")} - {"kernels"}
    assert subpackages == set(RANK) - {"kernels", "_C", "_C_cuda"}
    flat = sorted(p.name for p in (ROOT / "binslt").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "_moved.py"], flat


def test_no_module_imports_one_above_it():
    used = set()
    for rel, path in _library_files():
        me = rel.parts[0]
        if me not in RANK:
            continue  # binslt/__init__.py, __main__.py, _moved.py: the package's entry points
        for parts, lazy in _binslt_imports(path):
            other = parts[1]
            where = f"{rel} imports {'.'.join(parts)}"
            if other in ROOT_NAMES:
                continue
            assert other in RANK, f"{where}: not a subpackage (an old flat path?)"
            if other == me:
                continue
            if (str(rel), other) in KNOWN_EXCEPTIONS:
                assert lazy, f"{where}: a known exception, but only inside a function"
                used.add((str(rel), other))
                continue
            assert RANK[other] < RANK[me], f"{where}: a layer not below {me}"
    assert used == KNOWN_EXCEPTIONS, f"exceptions no longer needed: {KNOWN_EXCEPTIONS - used}"


def test_ops_never_call_back_into_the_modules():
    for rel, path in _library_files():
        if rel.parts[0] == "ops":
            for parts, _ in _binslt_imports(path):
                assert parts[1] not in ("nn", "interop", "io", "training", "analysis", "cli"), (
                    f"{rel} imports {'.'.join(parts)}")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_old_paths_warn_and_are_the_new_modules():
    r = _run(f"""
        import importlib, json, sys, types, warnings
        import binslt
        out = {{}}
        for old, new in {MOVED!r}.items():
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                mod = importlib.import_module(old)
            dep = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
            out[old] = dict(same=mod is importlib.import_module(new) and sys.modules[old] is mod,
                            warned=len(dep) == 1 and new in dep[0])
        import binslt.convert  # the old module path; binslt.convert stays the function
        out["convert is the function"] = isinstance(binslt.convert, types.FunctionType)
        import binslt.layers as L, binslt.nn.layers as N
        out["one module object"] = L is N and binslt.layers is N
        print(json.dumps(out))
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in got.items() if v is not True and v != dict(same=True, warned=True)}
    assert not bad and len(got) == len(MOVED) + 2, bad


def test_a_warning_names_the_importing_line():
    r = _run("import binslt.layers\n", "-W", "always::DeprecationWarning")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "<string>:1: DeprecationWarning: binslt.layers moved to binslt.nn.layers" in r.stderr


#: Every public name of ``binslt.ops`` (and the private ones other modules and tests reach).
OPS_API = """BACKENDS BNLIF ConvLIF PACK_VALIDATES SpikePool backends bconv_affine_infer bn_lif
check_finite check_spikes conv_lif counts_dtype cpu_algorithms get_op infer_conv_lif keep_counts
load_triton masked_sign_weight max_abs_gain onednn_conv_available pack_spikes pack_weight
reset_backend_state resolve_backend spiking_layer topk_mask unpack_spikes use_backend _KEEP _ext
_is_binary _spike_pool CAPABILITIES Capabilities capabilities INPUTS Epilogue Geometry
NeuronParams Path Weights bit_plane_current choose_path run_auto run_path spike_sum_bits
weight_need""".split()


def test_public_api_without_warnings():
    r = _run(f"""
        import types, warnings
        warnings.simplefilter("error")
        import torch
        import binslt
        from binslt import BinSpikeConv2d, convert, models, ops, reference
        assert isinstance(binslt.convert, types.FunctionType) and convert is binslt.convert
        for name in {OPS_API!r}:
            getattr(binslt.ops, name)
        binslt.models.build("conv4", "binwslt", num_classes=3, in_channels=1, input_size=8,
                            timesteps=2)
        assert models is binslt.models
        assert callable(binslt.reference.pack_spikes_reference)
        assert callable(binslt.export_ticket) and callable(binslt.load_ticket)
        assert callable(binslt.to_nir) and callable(binslt.from_nir)
        m = BinSpikeConv2d(2, 2, 3, padding=1, backend="torch")
        m(torch.zeros(2, 1, 2, 4, 4))
        assert isinstance(binslt.convert, types.FunctionType)
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("how", ["module", "script"])
def test_command_line_without_warnings(how):
    if how == "module":
        cmd = [sys.executable, "-W", "error::DeprecationWarning", "-m", "binslt", "info"]
    else:  # the console script's entry point
        cmd = [sys.executable, "-W", "error::DeprecationWarning", "-c",
               "import sys; from binslt.cli import main; sys.argv[0] = 'binslt'; "
               "sys.exit(main())", "info"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "backends:" in r.stdout and "Deprecation" not in r.stderr


# ---------------------------------------------------------------------------------------------
# Sizes: a module is one responsibility, a function one step
# ---------------------------------------------------------------------------------------------

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _package_modules():
    pkg = Path(__file__).resolve().parent.parent / "binslt"
    return sorted(p for p in pkg.rglob("*.py") if "kernels" not in p.relative_to(pkg).parts)


def test_no_module_over_600_lines_and_no_function_over_80():
    """Every module of the binslt package (the Triton kernels, ``kernels/``, excepted) is at most
    600 lines, and every function or method in it at most 80 (its docstring included)."""
    mods = _package_modules()
    assert len(mods) > 40  # the package, not an empty glob
    long_mods, long_fns = [], []
    for p in mods:
        text = p.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_mods.append(f"{p.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_fns.append(f"{p.name}:{node.lineno} {node.name}: {n} lines")
    assert not long_mods and not long_fns, long_mods + long_fns
