"""A user's SpikingJelly model as the network of a binslt run (``binslt search --model``):
the factory file, the converted model's run wrapper, and its rebuild from a saved config."""

from __future__ import annotations

import inspect
from typing import Optional

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


def user_model(factory: str, num_classes: Optional[int] = None) -> tuple:
    """``(path, name, model)``: ``factory`` (``'FILE.py:NAME'``) called (with ``num_classes=``
    when given and the function takes it), the SpikingJelly model it returns in step mode
    'm'."""
    from spikingjelly.activation_based import functional

    path, name, fn = load_factory(factory)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        net = (fn(num_classes=num_classes) if num_classes is not None and "num_classes" in params
               else fn())
    except Exception as exc:  # noqa: BLE001 -- the user's factory, in one line
        msg = str(exc).strip().splitlines()
        raise FactoryError(f"--model: {name}() in {str(path)!r} fails ({type(exc).__name__}: "
                           f"{msg[0] if msg else ''})") from None
    if not isinstance(net, nn.Module):
        raise FactoryError(f"--model: {name}() in {str(path)!r} returned a "
                           f"{type(net).__name__}, not a SpikingJelly model (an nn.Module)")
    functional.set_step_mode(net, "m")
    return path, name, net


def build_user_model(factory: str, *, num_classes: int, input_shape, timesteps: int,
                     prune_rate: float, backend: str = "auto", keep_dense=(),
                     **_ignored) -> SpikingJellyRun:
    """The network of a ``--model`` run: ``factory`` (``'FILE.py:NAME'``) is called (with
    ``num_classes=`` when it takes it), the SpikingJelly model is set to step mode 'm' and
    converted with one example run of ``[T, 2, C, H, W]`` random images. Its ``build_config``
    records the factory and the settings (JSON), from which this function rebuilds it."""
    from .convert import convert

    path, name, net = user_model(factory, num_classes)
    c, h, w = _parse_shape(input_shape)
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


def load_user_ticket(path, factory: Optional[str], *, device="cpu",
                     backend: Optional[str] = None) -> SpikingJellyRun:
    """A ticket of a user's SpikingJelly model as a network of images ``[N, C, H, W]`` (the
    command line's ``--model FILE.py:FACTORY``): the structure comes from the factory.

    * a ``binslt search --model`` run's ticket (arch ``'custom'``) records its factory, used
      when ``factory`` is None; a given one replaces it (the file moved, say);
    * a ticket of ``binslt.convert`` in Python (arch ``'converted'``) needs ``factory``: the
      function returning the unconverted model, which ``load_ticket`` converts again with the
      recorded settings. Its recorded example ``[T, N, C, H, W]`` gives T and the image shape.

    Raises FactoryError (the factory) or TicketError (the file, or a model it does not
    match)."""
    from ..io.tickets import TicketError, load_ticket, read_ticket_metadata
    from .convert_modules import ConversionReport
    from .convert_tickets import ARCH

    config = read_ticket_metadata(path, verify=False)["config"]
    arch = config.get("arch")
    p = repr(str(path))
    if arch == "custom":
        kw = dict(config, factory=factory or config.get("factory"))
        if backend is not None:
            kw["backend"] = backend
        return load_ticket(path, model=build_user_model(**kw), device=device, backend=backend)
    if arch != ARCH:
        raise TicketError(f"--model: {p} holds a binslt {arch!r} network, whose structure comes "
                          "from its config; --model is for tickets of SpikingJelly models")
    if factory is None:
        raise TicketError(f"{p} holds a converted SpikingJelly model ({config.get('model')}); "
                          "give --model FILE.py:FACTORY, the function that returns the "
                          "unconverted model")
    tensors = (config.get("example_input") or {}).get("tensors") or []
    if len(tensors) != 1 or len(tensors[0]["shape"]) != 5:
        raise TicketError(f"{p}: the model was converted for inputs {tensors}; the command line "
                          "evaluates models of one input [T, N, C, H, W]")
    T, _n, c, h, w = tensors[0]["shape"]
    file, name, net = user_model(factory)
    net = load_ticket(path, model=net, device=device, backend=backend)
    run_config = dict(config, factory=f"{file.resolve()}:{name}", input_shape=[c, h, w],
                      in_channels=c,
                      input_size=h, timesteps=T)
    return SpikingJellyRun(net, T, run_config, ConversionReport()).eval()
