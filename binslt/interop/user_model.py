"""A user's SpikingJelly model as the network of a binslt run (``binslt search --model``):
the factory file, the converted model's run wrapper, and its rebuild from a saved config."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .convert_modules import ConversionReport, ExampleRunError


class FactoryError(ValueError):
    """A ``--model FILE.py:FACTORY`` that does not give a usable model; the message is one line
    naming the file."""


def load_factory(spec: str):
    """``(path, name, callable)`` for ``'path/to/file.py:factory'``. The file is imported as a
    module (its code runs: it is the user's own model definition, named on the command line)."""
    import importlib.util
    from pathlib import Path

    if not isinstance(spec, str) or ":" not in spec:
        raise FactoryError(f"--model must be FILE.py:FACTORY (a Python file and the function in "
                           f"it that returns the SpikingJelly model), got {spec!r}")
    file, name = spec.rsplit(":", 1)
    path = Path(file).expanduser()
    if not name.isidentifier():
        raise FactoryError(f"--model {spec!r}: {name!r} is not a Python name")
    if not path.is_file():
        raise FactoryError(f"--model: no such file {str(path)!r}")
    mod_name = f"_binslt_user_model_{abs(hash(str(path.resolve())))}"
    try:
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise ImportError("not an importable Python file")
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 -- any failure of the user's file, in one line
        msg = str(exc).strip().splitlines()
        raise FactoryError(f"--model: {str(path)!r} fails to import ({type(exc).__name__}: "
                           f"{msg[0] if msg else ''})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise FactoryError(f"--model: {str(path)!r} has no function {name!r}")
    return path, name, fn


class SpikingJellyRun(nn.Module):
    """A converted SpikingJelly model as a run's network: images ``[N, C, H, W]`` are repeated
    over T (direct encoding), the model runs on ``[T, N, C, H, W]`` from a reset state, and
    ``[T, N, K]`` outputs are averaged over T (``[N, K]`` outputs are taken as they are)."""

    def __init__(self, net: nn.Module, timesteps: int, build_config: dict,
                 report: ConversionReport):
        super().__init__()
        self.net = net
        self.timesteps = int(timesteps)
        self.build_config = build_config
        self.conversion_report = report
        c, h, w = build_config["input_shape"]
        self.in_channels, self.input_hw = c, (h, w)

    def extra_repr(self) -> str:
        return (f"factory={self.build_config['factory']}, input={self.in_channels}x"
                f"{self.input_hw[0]}x{self.input_hw[1]}, timesteps={self.timesteps}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        want = (self.in_channels, *self.input_hw)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images [N, {want[0]}, {want[1]}, {want[2]}] (the model "
                             f"was converted for --input-shape {','.join(map(str, want))}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        if x.dim() == 4:
            x = x.unsqueeze(0).repeat(self.timesteps, 1, 1, 1, 1)
        functional.reset_net(self.net)
        y = self.net(x)
        return y.mean(0) if y.dim() == 3 else y


def _parse_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, str):
        parts = shape.split(",")
    else:
        parts = list(shape)
    try:
        c, h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise FactoryError(f"--input-shape must be C,H,W (three positive ints), got "
                           f"{shape!r}") from None
    if min(c, h, w) < 1:
        raise FactoryError(f"--input-shape must be C,H,W (three positive ints), got {shape!r}")
    return c, h, w


def build_user_model(factory: str, *, num_classes: int, input_shape, timesteps: int,
                     prune_rate: float, backend: str = "auto", keep_dense=(),
                     **_ignored) -> SpikingJellyRun:
    """The network of a ``--model`` run: ``factory`` (``'FILE.py:NAME'``) is called (with
    ``num_classes=`` when it takes it), the SpikingJelly model is set to step mode 'm' and
    converted with one example run of ``[T, 2, C, H, W]`` random images. Its ``build_config``
    records the factory and the settings (JSON), from which this function rebuilds it."""
    from spikingjelly.activation_based import functional

    from .convert import convert

    path, name, fn = load_factory(factory)
    c, h, w = _parse_shape(input_shape)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        net = fn(num_classes=num_classes) if "num_classes" in params else fn()
    except Exception as exc:  # noqa: BLE001 -- the user's factory, in one line
        msg = str(exc).strip().splitlines()
        raise FactoryError(f"--model: {name}() in {str(path)!r} fails ({type(exc).__name__}: "
                           f"{msg[0] if msg else ''})") from None
    if not isinstance(net, nn.Module):
        raise FactoryError(f"--model: {name}() in {str(path)!r} returned a "
                           f"{type(net).__name__}, not a SpikingJelly model (an nn.Module)")
    functional.set_step_mode(net, "m")
    g = torch.Generator().manual_seed(0)
    example = torch.rand(timesteps, 2, c, h, w, generator=g)
    try:
        conv, report = convert(net, prune_rate=prune_rate, example_input=example,
                               keep_dense=keep_dense, backend=backend)
    except ExampleRunError as exc:
        why = str(exc).removeprefix("convert: ").split("; ")[0]
        raise FactoryError(f"--model: the model of {str(path)!r} does not run on "
                           f"[T={timesteps}, N=2, {c}, {h}, {w}] inputs ({why}); check "
                           "--input-shape") from None
    except (ValueError, TypeError) as exc:
        raise FactoryError(f"--model: {str(path)!r}: {exc}") from None
    if report.method != "recorded run":
        raise FactoryError(f"--model: the model of {str(path)!r} does not run on "
                           f"[T={timesteps}, N=2, {c}, {h}, {w}] inputs ({report.method}); check "
                           "--input-shape")
    config = dict(arch="custom", variant="binwslt", factory=f"{path.resolve()}:{name}",
                  num_classes=int(num_classes),
                  input_shape=[c, h, w], in_channels=c, input_size=h, timesteps=int(timesteps),
                  prune_rate=float(prune_rate), backend=backend, keep_dense=list(keep_dense))
    model = SpikingJellyRun(conv, timesteps, config, report)
    with torch.no_grad():
        y = model.eval()(example[0])
    model.train()
    if tuple(y.shape) != (2, num_classes):
        raise FactoryError(f"--model: the model of {str(path)!r} gives outputs of shape "
                           f"{tuple(y.shape)} for 2 images; a run needs [T, N, {num_classes}] or "
                           f"[N, {num_classes}] logits ({num_classes} classes)")
    return model
