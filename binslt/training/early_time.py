"""Early-time tickets (Kim et al., ECCV 2022; ``--early-time``): the KL divergence between the
network's output at T and at each T' < T on one batch at initialisation, and the smallest T'
whose normalised divergence is under the threshold."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig

__all__ = ["choose_early_time", "early_time_divergences", "select_early_time"]


# ---------------------------------------------------------------------------------------------
# Early-time tickets
# ---------------------------------------------------------------------------------------------


def early_time_divergences(model: nn.Module, x: torch.Tensor, timesteps: int) -> dict[int, float]:
    """``{T': KL(p_T || p_T')}`` for T' = 1 .. T-1: the mean over the batch ``x`` of the KL
    divergence between the softmax of the output averaged over T and of the output averaged
    over T' (the network run at T'), in nats, computed in float64.

    The model runs in training mode (batch statistics in BN, as the search at T' sees them) on
    a copy, so that ``model`` and its BN running statistics stay as they are."""
    import copy

    probe = copy.deepcopy(model)
    probe.train()
    outs = {}
    with torch.no_grad():
        for t in range(1, timesteps + 1):
            probe.timesteps = t
            outs[t] = F.log_softmax(probe(x).double(), dim=1)
    ref = outs[timesteps]
    return {t: float((ref.exp() * (ref - outs[t])).sum(1).mean()) for t in range(1, timesteps)}


def select_early_time(divergences: dict[int, float], timesteps: int, threshold: float,
                      ) -> tuple[int, dict[int, float]]:
    """``(T', normalised)``: each divergence divided by the largest one, and the smallest T'
    whose normalised divergence is under ``threshold``; T itself when none is (a divergence
    of 0 everywhere normalises to 0)."""
    top = max(divergences.values(), default=0.0)
    norm = {t: (d / top if top > 0 else 0.0) for t, d in sorted(divergences.items())}
    under = [t for t, v in norm.items() if v < threshold]
    return (min(under) if under else timesteps), norm


def choose_early_time(cfg: RunConfig, model: nn.Module, bundle, device: torch.device,
                      ) -> dict[str, Any]:
    """Kim et al.'s early-time rule on one training batch at initialisation: the batch is the
    first ``batch_size`` examples of a permutation drawn from a generator seeded with
    ``cfg.seed`` (the global RNGs are not touched, so the run that follows is the same)."""
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(bundle.train), generator=g)[: min(cfg.batch_size, len(bundle.train))]
    x = torch.stack([bundle.train[int(i)][0] for i in idx]).to(device)
    div = early_time_divergences(model, x, cfg.timesteps)
    t_prime, norm = select_early_time(div, cfg.timesteps, cfg.early_time_threshold)
    return {"T": cfg.timesteps, "T_prime": t_prime, "threshold": cfg.early_time_threshold,
            "batch": len(idx), "kl": {str(t): v for t, v in div.items()},
            "normalised": {str(t): v for t, v in norm.items()},
            "search_epochs": cfg.epochs - cfg.tune_epochs(), "tune_epochs": cfg.tune_epochs()}
