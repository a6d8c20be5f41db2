"""The cases ``binslt check`` runs every backend's ops on (odd shapes, every epilogue and
neuron form), each checked against the pure-torch reference, and the cross-backend check: the
bit-exact backends' spikes on input planted a few ulps from the threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import reference as ref
from .check_rules import (
    TIE_BAND,
    tie_mask,
)
from .schemas import DEFAULT_SURROGATE_ALPHA, SURROGATES

# ---------------------------------------------------------------------------------------------
# The cases: odd shapes, every epilogue and neuron form
# ---------------------------------------------------------------------------------------------

INF = math.inf


@dataclass
class ConvCase:
    name: str
    geom: tuple  # (T, N, Ci, Co, H, W, k)
    stride: int
    padding: int
    neuron: tuple  # (tau, decay_input, v_threshold, v_reset)
    bn_train: bool
    residual: bool
    surrogate: int  # 0 atan, 1 sigmoid, 2 rect, 3 piecewise_quadratic (SURROGATES)
    detach: bool
    pool: int = 1  # bconv_lif_infer's pool / packed input / packed output
    packed_in: bool = False
    packed_out: bool = False


CONV_CASES = [
    ConvCase("lif-c33-s1p1-eval", (2, 1, 33, 5, 5, 5, 3), 1, 1, (2.0, True, 1.0, 0.0),
             False, False, 0, False),
    ConvCase("lif-c40-7x6-s2p1-bn-res", (2, 2, 40, 7, 7, 6, 3), 2, 1, (100.0, False, 1.0, None),
             True, True, 1, True, pool=2, packed_out=True),
    ConvCase("if-c70-k1-s2-res-pool-packed", (3, 1, 70, 17, 5, 7, 1), 2, 0, (INF, False, 1.0, 0.0),
             False, True, 0, True, pool=2, packed_in=True, packed_out=True),
    ConvCase("lif-c3-co33-s1p0-bn-pool", (2, 1, 3, 33, 6, 5, 3), 1, 0, (1.5, True, 0.5, -0.2),
             True, False, 0, False, pool=2, packed_in=True),
    ConvCase("lif-c35-s1p1-bn-rect", (2, 1, 35, 6, 5, 5, 3), 1, 1, (2.0, False, 1.0, 0.0),
             True, False, 2, False),
]


@dataclass
class BnCase:
    name: str
    shape: tuple  # [T, N, C, *]
    neuron: tuple
    bn_train: bool
    residual: bool
    surrogate: int
    detach: bool


BN_CASES = [
    BnCase("lif-5d-bn", (2, 3, 5, 3, 3), (2.0, True, 1.0, 0.0), True, False, 0, False),
    BnCase("lif-linear-eval-res", (3, 2, 6), (100.0, False, 1.0, None), False, True, 1, True),
    BnCase("if-4d-bn-res", (2, 2, 3, 7), (INF, False, 1.0, 0.0), True, True, 1, False),
    BnCase("lif-4d-bn-rect", (3, 2, 4, 6), (2.0, True, 1.0, 0.0), True, False, 2, False),
    BnCase("lif-linear-eval-res-pq", (3, 2, 6), (1.5, False, 1.0, None), False, True, 3, False),
]


def _surrogate_alpha(surrogate: int) -> float:
    """SpikingJelly's default alpha of a surrogate id."""
    return DEFAULT_SURROGATE_ALPHA[next(k for k, v in SURROGATES.items() if v == surrogate)]


def _h(z64, scale, shift, res, bn_train, eps, neuron):
    """Float64 membrane potential H of the reference, for the tie band."""
    tau, decay_input, v_th, v_reset = neuron
    x, _, _ = ref.epilogue(z64, scale.double().cpu(), shift.double().cpu(),
                           None if res is None else res.double().cpu(), bn_train, eps)
    _, h = ref.lif_multistep(x, tau=tau, decay_input=decay_input, v_threshold=v_th,
                             v_reset=v_reset, return_h=True)
    return h


def _untied(make, h_of, v_th, seed):
    """``make(g, noise)`` -> data, retried with new shift noise until H has no near-tie."""
    g = torch.Generator().manual_seed(seed)
    for attempt in range(64):
        d = make(g, attempt)
        if not bool(((h_of(d) - v_th).abs() < TIE_BAND).any()):
            return d
    raise RuntimeError("binslt check: could not build tie-free check data")  # pragma: no cover


def _conv_data(case: ConvCase, seed: int):
    t, n, ci, co, hh, ww, k = case.geom
    ho = (hh + 2 * case.padding - k) // case.stride + 1
    wo = (ww + 2 * case.padding - k) // case.stride + 1
    g0 = torch.Generator().manual_seed(seed)
    x = (torch.rand(t, n, ci, hh, ww, generator=g0) < 0.35).float()
    w_sign = torch.sign(torch.randn(co, ci, k, k, generator=g0))
    w_sign = w_sign * (torch.rand(co, ci, k, k, generator=g0) < 0.6)
    alpha = (0.8 + 0.4 * torch.rand(co, generator=g0)) / (ci * k * k * 0.21) ** 0.5
    scale = 0.7 + 0.6 * torch.rand(co, generator=g0)
    res = 0.3 * torch.randn(t, n, co, ho, wo, generator=g0) if case.residual else None
    gs = torch.randn(t, n, co, ho, wo, generator=g0)
    w_eff = alpha.view(-1, 1, 1, 1) * w_sign
    xp = ref.pack_spikes_reference(x.flatten(0, 1))
    wm, wp = ref.pack_weight_reference(w_eff)
    counts = ref.bconv_count_reference(xp, wm, wp, case.stride, case.padding)
    z64 = counts.double().view(t, n, co, ho, wo) * alpha.double().view(1, 1, -1, 1, 1)
    tau, _, v_th, _ = case.neuron
    # IF integrates without leak: a lower drive keeps it from firing at every step
    base = 0.3 if tau == INF else 1.0

    def make(g, attempt):
        shift = base + 0.3 * torch.randn(co, generator=g)
        return dict(x=x, w_eff=w_eff, xp=xp, wm=wm, wp=wp, alpha=alpha, scale=scale,
                    shift=shift, res=res, gs=gs, z64=z64)

    def h_of(d):
        return torch.cat([_h(z64, scale, d["shift"], res, case.bn_train, 1e-5, case.neuron),
                          _h(z64, scale, d["shift"], res, False, 1e-5, case.neuron)])

    return _untied(make, h_of, v_th, seed)


def _to(d: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and v.dtype != torch.float64 else v)
            for k, v in d.items()}


def _pooled_ok(ok: torch.Tensor, pool: int) -> torch.Tensor:
    """A pooled spike is compared where all the spikes of its window are."""
    if pool == 1:
        return ok
    t, n = ok.shape[:2]
    p = -F.max_pool2d(-ok.flatten(0, 1).float(), pool)
    return p.view(t, n, *p.shape[1:]).bool()


def _check_conv_case(op_of, lines, case: ConvCase, device, seed: int) -> None:
    d0 = _conv_data(case, seed)
    d = _to(d0, device)
    t, n, ci, co = case.geom[:4]
    tau, decay_input, v_th, v_reset = case.neuron
    eps, s_alpha = 1e-5, _surrogate_alpha(case.surrogate)
    cn = case.name
    # Every op is checked on its own inputs (the reference's where one op feeds another), so a
    # failing op fails its own line only.
    fwd = (d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"], d["shift"], d["res"], t,
           case.stride, case.padding, case.bn_train, eps, tau, decay_input, v_th, v_reset)
    r_spikes, r_counts, r_mean, r_var = ref.bconv_lif_reference(
        *[a.cpu() if isinstance(a, torch.Tensor) else a for a in fwd])
    h = _h(d0["z64"], d0["scale"], d0["shift"], d0["res"], case.bn_train, eps, case.neuron)

    with lines.op("pack_spikes", cn) as L:
        L.exact(cn, "words", op_of("pack_spikes")(d["x"].flatten(0, 1)), d0["xp"])
    with lines.op("unpack_spikes", cn) as L:
        L.exact(cn, "spikes", op_of("unpack_spikes")(d["xp"], ci), d0["x"].flatten(0, 1))
    with lines.op("pack_weight", cn) as L:
        m, p = op_of("pack_weight")(d["w_eff"])
        L.exact(cn, "mask words", m, d0["wm"])
        L.exact(cn, "sign words", p, d0["wp"])

    with lines.op("bconv_lif", cn) as L:
        spikes, counts, mean, var = op_of("bconv_lif")(*fwd)
        L.exact(cn, "counts", counts, r_counts)
        L.spikes(cn, "spikes", spikes, r_spikes, h, v_th)
        L.stats(cn, "mean", mean, r_mean)
        L.stats(cn, "var", var, r_var)

    # the inference form: eval epilogue, pooled / packed in and out as the case says
    with lines.op("bconv_lif_infer", cn) as L:
        xin = d["xp"].view(t, n, *d["xp"].shape[1:]) if case.packed_in else d["x"]
        inf = op_of("bconv_lif_infer")(xin, *fwd[1:7], case.stride, case.padding, tau,
                                       decay_input, v_th, v_reset, case.pool, case.packed_out)
        r_inf = ref.bconv_lif_infer_reference(
            d0["x"], *[a.cpu() if a is not None else a for a in fwd[1:7]], case.stride,
            case.padding, tau, decay_input, v_th, v_reset, case.pool, False)
        if case.packed_out:
            if inf.dtype != torch.int32 or inf.dim() != 5:
                raise TypeError(f"packed output: got {inf.dtype} {tuple(inf.shape)}")
            inf = ref.unpack_spikes_reference(inf.flatten(0, 1).cpu(), co).view(r_inf.shape)
        h_eval = _h(d0["z64"], d0["scale"], d0["shift"], d0["res"], False, eps, case.neuron)
        L.spikes(cn, "spikes", inf, r_inf, ok=_pooled_ok(tie_mask(h_eval, v_th), case.pool))

    # the backward, against float64 (no near-tie in the data), from the reference's forward
    with lines.op("bconv_lif_bwd", cn) as L:
        mean, var = r_mean.to(device), r_var.to(device)
        bwd = (d["gs"], r_counts.to(device), d["xp"], d["wm"], d["wp"], d["alpha"], d["scale"],
               d["shift"], mean, var, d["res"], ci, case.stride, case.padding, case.bn_train,
               eps, tau, decay_input, v_th, v_reset, case.detach, case.surrogate, s_alpha)
        g_x, g_w, g_cur, g_sc, g_sh = op_of("bconv_lif_bwd")(*bwd, True)
        res64 = None if d0["res"] is None else d0["res"].double()
        e_gz, e_cur, e_sc, e_sh = ref.bn_lif_bwd_reference(
            d0["gs"].double(), d0["z64"], d0["scale"].double(), d0["shift"].double(), r_mean,
            r_var, res64, case.bn_train, eps, tau, decay_input, v_th, v_reset, case.detach,
            case.surrogate, s_alpha)
        x64, w64 = d0["x"].double().flatten(0, 1), d0["w_eff"].double()
        gz = e_gz.flatten(0, 1)
        e_gw = torch.nn.grad.conv2d_weight(x64, w64.shape, gz, stride=case.stride,
                                           padding=case.padding)
        e_gx = torch.nn.grad.conv2d_input(x64.shape, w64, gz, stride=case.stride,
                                          padding=case.padding).view_as(d0["x"])
        for what, a, e in (("grad_current", g_cur, e_cur), ("grad_scale", g_sc, e_sc),
                           ("grad_shift", g_sh, e_sh), ("grad_weight", g_w, e_gw),
                           ("grad_x", g_x, e_gx)):
            L.rel(cn, what, a, e)
        # (once: the Triton interpreter takes ~10 ms per program)
        if case is CONV_CASES[0] and op_of("bconv_lif_bwd")(*bwd, False)[0].numel() != 0:
            L.fail(cn, "need_grad_x=False must return an empty grad_x", 1.0)


def _bn_data(case: BnCase, seed: int):
    c = case.shape[2]
    g0 = torch.Generator().manual_seed(seed)
    z = 1.2 * torch.randn(case.shape, generator=g0) + 0.5
    if case.neuron[0] == INF:
        z = z * 0.5
    scale = 0.7 + 0.6 * torch.rand(c, generator=g0)
    res = 0.3 * torch.randn(case.shape, generator=g0) if case.residual else None
    gs = torch.randn(case.shape, generator=g0)

    def make(g, attempt):
        # (BN's output is centred: a larger shift keeps the neurons firing)
        shift = (1.5 if case.bn_train else 0.5) + 0.3 * torch.randn(c, generator=g)
        return dict(z=z, scale=scale, shift=shift, res=res, gs=gs)

    def h_of(d):
        return _h(z.double(), scale, d["shift"], res, case.bn_train, 1e-5, case.neuron)

    return _untied(make, h_of, case.neuron[2], seed)


def _check_bn_case(op_of, lines, case: BnCase, device, seed: int) -> None:
    d0 = _bn_data(case, seed)
    d = _to(d0, device)
    tau, decay_input, v_th, v_reset = case.neuron
    eps, s_alpha = 1e-5, _surrogate_alpha(case.surrogate)
    cn = case.name
    r_spikes, r_mean, r_var = ref.bn_lif_reference(d0["z"], d0["scale"], d0["shift"], d0["res"],
                                                   case.bn_train, eps, tau, decay_input, v_th,
                                                   v_reset)
    with lines.op("bn_lif", cn) as L:
        spikes, mean, var = op_of("bn_lif")(d["z"], d["scale"], d["shift"], d["res"],
                                            case.bn_train, eps, tau, decay_input, v_th, v_reset)
        h = _h(d0["z"].double(), d0["scale"], d0["shift"], d0["res"], case.bn_train, eps,
               case.neuron)
        L.spikes(cn, "spikes", spikes, r_spikes, h, v_th)
        L.stats(cn, "mean", mean, r_mean)
        L.stats(cn, "var", var, r_var)

    with lines.op("bn_lif_bwd", cn) as L:
        got = op_of("bn_lif_bwd")(d["gs"], d["z"], d["scale"], d["shift"], r_mean.to(device),
                                  r_var.to(device), d["res"], case.bn_train, eps, tau,
                                  decay_input, v_th, v_reset, case.detach, case.surrogate,
                                  s_alpha)
        exp = ref.bn_lif_bwd_reference(d0["gs"].double(), d0["z"].double(),
                                       d0["scale"].double(), d0["shift"].double(), r_mean, r_var,
                                       None if d0["res"] is None else d0["res"].double(),
                                       case.bn_train, eps, tau, decay_input, v_th, v_reset,
                                       case.detach, case.surrogate, s_alpha)
        for what, a, e in zip(("grad_z", "grad_current", "grad_scale", "grad_shift"), got, exp):
            L.rel(cn, what, a, e)


# ---------------------------------------------------------------------------------------------
# Cross-backend: spikes bit for bit on input planted at the threshold
# ---------------------------------------------------------------------------------------------


def _ulps(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """v moved by k[i] float32 ulps (k may be negative)."""
    out = v.clone()
    for step in range(int(k.abs().max())):
        up = torch.nextafter(out, torch.full_like(out, INF))
        down = torch.nextafter(out, torch.full_like(out, -INF))
        out = torch.where(k > step, up, torch.where(-k > step, down, out))
    return out


def _planted(seed: int = 7):
    """Eval-epilogue inputs whose membrane potential at t = 0 lies within a few float32 ulps of
    the threshold for many neurons: the current of bn_lif, the shift of bconv_lif."""
    g = torch.Generator().manual_seed(seed)
    T, N, C, L = 3, 2, 4, 9
    tau, v_th = 2.0, 1.0
    scale = 0.7 + 0.6 * torch.rand(C, generator=g)
    shift = 0.3 * torch.randn(C, generator=g)
    z = 1.5 * torch.rand(T, N, C, L, generator=g)
    # X = z * scale + shift = tau * v_th at t = 0 (H = X / tau with V = 0), then +-4 ulps
    at = (torch.full((C,), tau * v_th) - shift) / scale
    k = torch.arange(L) - L // 2
    z[0] = _ulps(at.view(1, C, 1).expand(N, C, L).contiguous(), k.view(1, 1, L).expand(N, C, L))
    bn = dict(z=z, scale=scale, shift=shift, tau=tau, v_th=v_th)

    t, n, ci, co, hh, ww, kk = 2, 2, 37, 6, 5, 5, 3
    x = (torch.rand(t, n, ci, hh, ww, generator=g) < 0.4).float()
    w = torch.sign(torch.randn(co, ci, kk, kk, generator=g)) * (
        torch.rand(co, ci, kk, kk, generator=g) < 0.6)
    alpha = (0.8 + 0.4 * torch.rand(co, generator=g)) / (ci * kk * kk * 0.24) ** 0.5
    cscale = 0.7 + 0.6 * torch.rand(co, generator=g)
    xp = ref.pack_spikes_reference(x.flatten(0, 1))
    wm, wp = ref.pack_weight_reference(alpha.view(-1, 1, 1, 1) * w)
    counts = ref.bconv_count_reference(xp, wm, wp, 1, 1).view(t, n, co, hh, ww)
    # per channel, the shift that puts the most common count of step 0 exactly at tau * v_th
    c0 = counts[0].transpose(0, 1).reshape(co, -1).mode(dim=1).values
    cshift = torch.full((co,), tau * v_th) - (c0 * alpha) * cscale
    conv = dict(x=x, xp=xp, wm=wm, wp=wp, alpha=alpha, scale=cscale, shift=cshift, T=t,
                tau=tau, v_th=v_th)
    return bn, conv


def _cross_outputs(op_of, device) -> dict[str, torch.Tensor]:
    bn, cv = _planted()
    dv = lambda t: t.to(device)  # noqa: E731
    out = {}
    for tau, decay_input, name in ((bn["tau"], True, "bn_lif"), (INF, False, "bn_lif[IF]")):
        z = bn["z"]
        if not decay_input:  # IF: H = X at t = 0, so X is planted at v_th itself
            z = z / bn["tau"]
            at = (torch.full_like(bn["shift"], bn["v_th"]) - bn["shift"]) / bn["scale"]
            L = z.shape[3]
            k = torch.arange(L) - L // 2
            z[0] = _ulps(at.view(1, -1, 1).expand_as(z[0]).contiguous(),
                         k.view(1, 1, L).expand_as(z[0]))
        s = op_of("bn_lif")(dv(z), dv(bn["scale"]), dv(bn["shift"]), None, False, 1e-5, tau,
                            decay_input, bn["v_th"], 0.0)[0]
        out[name] = s.cpu()
    args = [dv(cv[k]) for k in ("wm", "wp", "alpha", "scale", "shift")]
    s, counts, _, _ = op_of("bconv_lif")(dv(cv["xp"]), *args, None, cv["T"], 1, 1, False, 1e-5,
                                         cv["tau"], True, cv["v_th"], 0.0)
    out["bconv_lif"] = s.cpu()
    out["bconv_lif[counts]"] = counts.cpu()
    s = op_of("bconv_lif_infer")(dv(cv["x"]), *args, None, 1, 1, cv["tau"], True, cv["v_th"],
                                 0.0, 1, False)
    out["bconv_lif_infer"] = s.cpu()
    return out
