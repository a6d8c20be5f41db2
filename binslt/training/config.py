"""What determines a run of ``binslt search`` / ``train`` / ``finetune``: :class:`RunConfig`, the
choices it validates against, and the run's error types."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..nn.layers import NEURONS as _LAYER_NEURONS
from ..ops import schemas as _schemas
from .errors import DivergedError, RunError

__all__ = ["ARCHS", "DivergedError", "METHODS", "RunConfig", "RunError"]

METHODS = ("binwslt", "snn", "bnn", "ann")
SPIKING = ("binwslt", "snn")
MASKED = ("binwslt", "bnn")
ARCHS = ("conv4", "vgg9", "vgg11", "resnet19")
OPTIMIZERS = ("sgd", "adam")
SURROGATES = tuple(_schemas.SURROGATES)  # atan | sigmoid | rect | piecewise_quadratic
NEURONS = _LAYER_NEURONS  # lif | if


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
    neuron: str = "lif"  #: lif | if (SpikingJelly's IFNode, H = V + X: no decay or tau)
    decay: float | None = 0.99  #: lambda = 1 - 1/tau; None when tau is given instead (or IF)
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
    #: a user's SpikingJelly model, 'FILE.py:FACTORY' (arch 'custom'), converted by binslt.convert
    model: str | None = None
    input_shape: str | None = None  #: --model: 'C,H,W' of the images (default: the dataset's)
    mode: str = "search"  #: model mode while training: search | finetune | train (dense models)
    #: Early-time tickets (Kim et al., ECCV 2022; :func:`choose_early_time`): search the scores
    #: at a smaller T' chosen at initialisation, evaluate (and tune the last epochs) at T.
    early_time: bool = False
    early_time_threshold: float = 0.6  #: pick the smallest T' with KL / max KL under this
    early_time_tune_epochs: int | None = None  #: final epochs at the full T; None = epochs // 10

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
        if self.model is None:
            need(self.arch in ARCHS, f"--arch must be one of {ARCHS}, got {self.arch!r}")
            need(self.input_shape is None, "--input-shape goes with --model")
        else:
            need(self.arch == "custom", "--model and --arch exclude each other (the network is "
                 "the model FILE.py:FACTORY returns)")
            need(self.method == "binwslt", f"--model is searched with binwslt, not {self.method}")
        need(self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.surrogate in SURROGATES,
             f"--surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        need(0.0 <= self.prune_rate < 1.0,
             f"--prune-rate is the fraction of weights removed and must be in [0, 1), got "
             f"{self.prune_rate}")
        need(self.timesteps >= 1, f"--timesteps must be >= 1, got {self.timesteps}")
        need(self.neuron in NEURONS,
             f"--neuron must be one of {NEURONS}, got {self.neuron!r}")
        if self.neuron == "if":
            need(self.decay is None and self.tau is None and not self.decay_input,
                 "--neuron if has no leak (H = V + X): drop --decay, --tau and --decay-input")
        else:
            need((self.decay is None) != (self.tau is None),
                 "give exactly one of --decay and --tau")
        if self.decay is not None:
            need(0.0 <= self.decay < 1.0, f"--decay (lambda) must be in [0, 1), got {self.decay}")
        if self.tau is not None:
            need(self.tau >= 1.0, f"--tau must be >= 1, got {self.tau}")
        need(0 < self.v_threshold < math.inf,
             f"--v-threshold must be finite and > 0, got {self.v_threshold}")
        need(self.v_reset is None or math.isfinite(self.v_reset),
             f"--v-reset must be a finite number or 'none' (soft reset), got {self.v_reset}")
        need(0 < self.surrogate_alpha < math.inf,
             f"--surrogate-alpha must be finite and > 0, got {self.surrogate_alpha}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(0 < self.lr < math.inf, f"--lr must be finite and > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(0 <= self.weight_decay < math.inf,
             f"--weight-decay must be finite and >= 0, got {self.weight_decay}")
        need(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}")
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
        if self.early_time:
            need(self.method == "binwslt" and self.mode == "search",
                 f"--early-time applies to the BinW-SLT score search, not to {self.method} in "
                 f"mode {self.mode!r}")
            need(self.timesteps >= 2, f"--early-time needs T >= 2 (it searches at a T' < T), "
                 f"got T={self.timesteps}")
            need(0.0 < self.early_time_threshold <= 1.0, "--early-time-threshold is a fraction "
                 f"of the largest divergence, in (0, 1], got {self.early_time_threshold}")
            need(self.early_time_tune_epochs is None
                 or 0 <= self.early_time_tune_epochs < self.epochs,
                 f"--early-time-tune-epochs must be in [0, epochs={self.epochs}), got "
                 f"{self.early_time_tune_epochs}")

    def tune_epochs(self) -> int:
        """Early-time search: how many final epochs run at the full T."""
        if self.early_time_tune_epochs is not None:
            return self.early_time_tune_epochs
        return self.epochs // 10

    def neuron_options(self) -> dict[str, Any]:
        """The ``**neuron_options`` for :func:`binslt.models.build` (spiking models only)."""
        if self.method not in SPIKING:
            return {}
        opts: dict[str, Any] = dict(
            decay_input=self.decay_input, v_threshold=self.v_threshold, v_reset=self.v_reset,
            detach_reset=self.detach_reset, surrogate=self.surrogate,
            surrogate_alpha=self.surrogate_alpha, neuron=self.neuron)
        if self.neuron == "if":
            return opts  # no leak settings (validate refuses them)
        if self.decay is not None:
            opts["decay"] = self.decay
        else:
            opts["tau"] = self.tau
        return opts
