"""Batched entropic optimal transport between token sets: the one OT convention of otc-ray.

Convention (docs/method.md, OT distance), used by every caller (re-matching, losses, benchmarks):
  * tokens are L2-normalized here (callers may pass raw features); cost C[m, l] = 1 - <x_m, y_l>, in [0, 2];
  * marginals: a uniform over the real tokens of x, b uniform over the real tokens of y; masked tokens carry
    zero mass and get zero plan; a problem with no real token on one side has zero mass (plan 0, distance 0);
  * plan T = argmin_{T in Pi(a, b)} <T, C> - eps * H(T)   (the same T as POT's `ot.sinkhorn(a, b, C, reg=eps)`);
  * distance D = <T, C> (the transport cost of the entropic plan, not the regularized value);
  * gradient: envelope style. T is computed without gradient and D is differentiated through C only; this is
    the exact gradient of the regularized value <T, C> - eps H(T) at convergence (Danskin);
  * geomloss (the tests' oracle): SamplesLoss(p=2) uses |x - y|^2 / 2, which equals 1 - cos on unit vectors,
    with eps = blur**2, so it solves the same problem with blur = sqrt(eps) on the normalized tokens.
Masked tokens must hold finite values (they are multiplied by 0, not selected out).

Solver: Sinkhorn in the kernel domain with log-domain absorption (Schmitzer 2016). It reaches
the fixed point of log-domain Sinkhorn without an exp per entry per iteration:
  1. costs S = (1 + PENALTY * [y masked]) - <x^, y^> from one GEMM (batched per pair, or one per chunk of
     pairs); masked tokens have zero inverse norm, and positions that are padding in every set are trimmed;
  2. potentials (alpha, beta) start at the eps -> 0 c-transforms (row minimum, then column minimum) so that
     K = exp((alpha + beta - S) / eps) <= 1 has an exact 1 in every real row and column; exponents are clamped
     at -80 (no denormals and no exp slow path);
  3. u = a / (K v), v = b / (K^T u) as row-vector batched GEMVs on K and a contiguous copy of K^T; masked tokens
     have zero mass, so their scalings, and their plan entries, are exactly 0;
  4. when a scaling exceeds e^20 it is absorbed into (alpha, beta) and K is recomputed; so u K v <= e^-40 on
     a clamped entry, and a problem whose answer lies below the clamp keeps absorbing until it is inside.
Problems are processed in chunks sized to stay in cache on CPU (and in large chunks on GPU). Everything runs in
float32 (float64 inputs stay float64); bfloat16 / float16 inputs are upcast. The candidate and pairwise forms
keep only the plans for backward and recompute the (cheap) token gathers there.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from otc_ray.config import OTConfig

__all__ = [
    "ot_distance",
    "candidate_ot_distance",
    "pairwise_ot_distance",
    "ot_distance_cfg",
    "candidate_ot_distance_cfg",
    "pairwise_ot_distance_cfg",
    "trim_padding",
]

_PENALTY = 1.0e4                # cost added for masked y tokens; exp(-(_PENALTY - 4) / eps) == 0 for eps <= 100
_EXP_FLOOR = -80.0              # kernel exponents are clamped here: exp(-80) is a normal float32, no denormals
_ABSORB = math.exp(20.0)        # scalings above this are absorbed; a clamped entry then carries u K v <= e^-40
_CPU_CHUNK_ENTRIES = 1 << 19    # cost entries per chunk and CPU thread (2 MiB of float32 per array: in cache)
_GPU_CHUNK_ENTRIES = 1 << 26    # on GPU: large chunks (256 MiB per array), few launches


# ----------------------------------------------------------------------------------------- helpers
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_sets(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor], paired: bool) -> None:
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be (P, M, d) and (P, L, d) token sets, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"token dimension differs: x has d={x.shape[-1]}, y has d={y.shape[-1]}")
    if paired and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of problems, got P={x.shape[0]} and P={y.shape[0]}")
    for name, t, m in (("x_mask", x, x_mask), ("y_mask", y, y_mask)):
        if m is not None and tuple(m.shape) != tuple(t.shape[:2]):
            raise ValueError(f"{name} must be {tuple(t.shape[:2])} to match its tokens, got {tuple(m.shape)}")


def _check_eps_iters(eps: float, iters: Optional[int]) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if iters is not None and iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")


def _fp32(t: Tensor):
    """Autocast off: under a bf16/fp16 autocast region the costs and Sinkhorn would otherwise run in half precision."""
    return torch.autocast(t.device.type, enabled=False)


def _bool_mask(mask: Optional[Tensor], n: int, T: int, device: torch.device) -> Tensor:
    return torch.ones((n, T), dtype=torch.bool, device=device) if mask is None else mask.to(device, torch.bool)


def trim_padding(t: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Drop trailing positions that are padding in every set: (n, T, d), (n, T) -> (n, T', d), (n, T').

    T' is one past the last position that is real in some set (1 when none is); no mask, no change.
    """
    if mask is None or t.shape[1] == 0:
        return t, mask
    real = mask.any(0).nonzero()
    keep = int(real.max()) + 1 if real.numel() else 1
    return (t, mask) if keep == t.shape[1] else (t[:, :keep], mask[:, :keep])


class _Sets(NamedTuple):
    """Checked token sets as every OT entry point starts from: x (n, M, d), y (m, L, d) (trimmed unless asked
    not to), bool masks mx (n, M), my (m, L) on x's device, and the compute dtype."""

    x: Tensor
    y: Tensor
    mx: Tensor
    my: Tensor
    dtype: torch.dtype

    def units(self) -> tuple[Tensor, Tensor]:
        """Unit-norm tokens in the compute dtype, masked ones zeroed: (n, M, d), (m, L, d). Call under `_fp32`."""
        return _normalize(self.x, self.mx, self.dtype), _normalize(self.y, self.my, self.dtype)


def _open(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor], eps: float,
          iters: Optional[int], paired: bool, trim: bool = True) -> _Sets:
    """The shared opening of the OT functions: validate shapes, eps and iters (None = no iteration count),
    trim positions that are padding in every set, build bool masks, pick the compute dtype."""
    _check_sets(x, y, x_mask, y_mask, paired)
    _check_eps_iters(eps, iters)
    dtype, dev = _compute_dtype(x, y), x.device
    if trim:
        x, x_mask = trim_padding(x, x_mask)
        y, y_mask = trim_padding(y, y_mask)
    mx = _bool_mask(x_mask, x.shape[0], x.shape[1], dev)
    my = _bool_mask(y_mask, y.shape[0], y.shape[1], dev)
    return _Sets(x, y, mx, my, dtype)


def _inv_norm(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """1 / |t| per token, 0 for masked tokens: t (n, T, d) -> (n, T)."""
    r = torch.linalg.vector_norm(t, dim=-1).clamp_min(1e-12).reciprocal()
    return r if mask is None else r * mask.to(device=t.device, dtype=torch.bool)


def _normalize(t: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """t (n, T, d) -> unit-norm tokens in `dtype`, masked tokens set to zero. (n, T, d)."""
    tf = t.to(dtype)
    return tf * _inv_norm(tf, mask).unsqueeze(-1)


def _row_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """1 on real y tokens, 1 + PENALTY on masked ones: (n, L) bool -> (n, L) (the rows of a transposed cost)."""
    return (~mask).to(dtype).mul_(_PENALTY).add_(1.0)


def _masses(mask: Tensor, other: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform mass over real tokens; zero on masked tokens and in problems with an empty side. (n, T)."""
    m = mask.to(dtype)
    count = m.sum(-1, keepdim=True)
    return m * (other.any(-1, keepdim=True).to(dtype) / count.clamp_min(1.0))


def _chunk(problems: int, entries: int, device: torch.device, cap: int = 1 << 62) -> int:
    """Problems per chunk so that a chunk holds about the cache budget of cost entries."""
    if device.type == "cpu":       # threads split each op: more threads, larger chunks, fewer barriers per pair
        budget = _CPU_CHUNK_ENTRIES * max(1, torch.get_num_threads())
    else:
        budget = _GPU_CHUNK_ENTRIES
    return max(1, min(problems, cap, budget // max(1, entries)))


class _Workspace:
    """Chunk buffers reused across the chunks of one call (a fresh multi-MiB tensor page-faults on every use)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return buf[:n].view(shape)


# ----------------------------------------------------------------------------------------- core solver
@torch.no_grad()
def _solve(Ct: Tensor, a: Tensor, b: Tensor, eps: float, iters: int, tol: Optional[float], plan: Tensor,
           ws: _Workspace) -> Tensor:
    """Sinkhorn on transposed costs Ct (p, L, M) -> writes the plan (p, M, L) into `plan`, returns <T, C> (p,).

    a (p, M), b (p, L): masses (zero = masked token). Masked L positions must cost >= PENALTY in Ct (the row
    bias), so that they stay out of the M side's c-transform. See the module docstring for the algorithm.
    """
    p, L, M = Ct.shape
    tiny, inv_eps = torch.finfo(Ct.dtype).tiny, 1.0 / eps
    real_a, real_b = a > 0, b > 0
    alpha = Ct.amin(dim=1)                                                 # (p, M) c-transform of the M side
    alpha = torch.where(real_a, alpha, torch.full_like(alpha, -_PENALTY))  # masked M tokens: out of the next min
    Kt, K = ws.get("Kt", (p, L, M)), ws.get("K", (p, M, L))
    beta = torch.sub(Ct, alpha.unsqueeze(1), out=Kt).amin(dim=2)           # (p, L) c-transform of the L side
    beta = torch.where(real_b, beta, torch.zeros_like(beta))

    def kernel(fresh: bool) -> None:                                       # Kt, K = exp((alpha + beta - C) / eps)
        if not fresh:
            torch.sub(Ct, alpha.unsqueeze(1), out=Kt)
        Kt.sub_(beta.unsqueeze(2)).mul_(-inv_eps).clamp_min_(_EXP_FLOOR).exp_()
        K.copy_(Kt.transpose(1, 2))

    kernel(fresh=True)
    u1 = real_a.to(Ct.dtype).unsqueeze(1)                                 # (p, 1, M) scalings of the M side
    v1 = real_b.to(Ct.dtype).unsqueeze(1)                                  # (p, 1, L) scalings of the L side
    a1, b1 = a.unsqueeze(1), b.unsqueeze(1)
    Kv, KTu = torch.empty_like(u1), torch.empty_like(v1)
    for it in range(iters):
        torch.bmm(v1, Kt, out=Kv)                                          # (K v)^T
        if tol is not None and it > 0 and float((u1 * Kv - a1).abs_().sum(-1).amax()) < tol:
            break
        torch.div(a1, Kv.clamp_min_(tiny), out=u1)
        torch.bmm(u1, K, out=KTu)                                          # (K^T u)^T
        torch.div(b1, KTu.clamp_min_(tiny), out=v1)
        if float(torch.maximum(u1.amax(), v1.amax())) > _ABSORB:           # absorb into the potentials
            alpha += eps * torch.where(real_a, u1.squeeze(1).clamp_min(tiny).log(), torch.zeros_like(alpha))
            beta += eps * torch.where(real_b, v1.squeeze(1).clamp_min(tiny).log(), torch.zeros_like(beta))
            kernel(fresh=False)
            u1 = real_a.to(Ct.dtype).unsqueeze(1)
            v1 = real_b.to(Ct.dtype).unsqueeze(1)
    torch.mul(K, u1.transpose(1, 2), out=plan).mul_(v1)
    torch.bmm(v1, Kt.mul_(Ct), out=Kv)                                     # <T, C> = v^T (K o C)^T u
    return torch.linalg.vecdot(Kv.squeeze(1), u1.squeeze(1))


def _paired(x: Tensor, y: Tensor, mx: Tensor, my: Tensor, a: Tensor, b: Tensor, unit: bool, eps: float,
            iters: int, tol: Optional[float], plan: Tensor) -> Tensor:
    """Chunked paired solve of x (P, M, d) against y (P, L, d) -> D (P,), plan (P, M, L) written in place.

    unit: tokens are already unit-norm with masked ones zeroed; otherwise the costs are scaled by inverse norms
    after the GEMM (a pass over M L entries instead of over (M + L) d token values).
    """
    (P, M, _), L = x.shape, y.shape[1]
    dtype = plan.dtype
    ws = _Workspace(dtype, x.device)
    bias = _row_bias(my, dtype).unsqueeze(2)                               # (P, L, 1)
    D = torch.empty(P, dtype=dtype, device=x.device)
    step = _chunk(P, M * L, x.device)
    for s in range(0, P, step):
        e = min(P, s + step)
        xc, yc = x[s:e].to(dtype), y[s:e].to(dtype)
        Ct = torch.bmm(yc, xc.transpose(1, 2), out=ws.get("cost", (e - s, L, M)))
        if unit:
            torch.sub(bias[s:e], Ct, out=Ct)
        else:
            scale = torch.mul(_inv_norm(yc, my[s:e]).unsqueeze(2), _inv_norm(xc, mx[s:e]).unsqueeze(1),
                              out=ws.get("scale", (e - s, L, M)))
            torch.addcmul(bias[s:e], Ct, scale, value=-1.0, out=Ct)
        D[s:e] = _solve(Ct, a[s:e], b[s:e], eps, iters, tol, plan[s:e], ws)
    return D


# ----------------------------------------------------------------------------------------- autograd forms
class _PairedOT(torch.autograd.Function):
    """(D (P,), plan (P, M, L)) for unit tokens xn (P, M, d), yn (P, L, d); envelope backward from the plan."""

    @staticmethod
    def forward(ctx, xn, yn, mx, my, a, b, eps, iters, tol):
        plan = torch.empty((xn.shape[0], xn.shape[1], yn.shape[1]), dtype=xn.dtype, device=xn.device)
        D = _paired(xn, yn, mx, my, a, b, True, eps, iters, tol, plan)
        ctx.save_for_backward(xn, yn, plan)
        ctx.mark_non_differentiable(plan)
        return D, plan

    @staticmethod
    @once_differentiable
    def backward(ctx, gD, _gplan):
        xn, yn, plan = ctx.saved_tensors
        with _fp32(xn):
            G = plan * gD.view(-1, 1, 1).to(plan.dtype)                    # dD/dC = T
            gx = torch.bmm(G, yn).neg_() if ctx.needs_input_grad[0] else None
            gy = torch.bmm(G.transpose(1, 2), xn).neg_() if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None, None, None, None, None


class _CandidateOT(torch.autograd.Function):
    """D[i, k] = <T, C> between unit tokens xn[i] (B, M, d) and yn[index[i, k]] (N, L, d) -> (B, K).

    The transposed costs of x[i]'s K problems come from one GEMM (K L, d) @ (d, M), already in the solver's
    layout. With a gradient to compute, the plans (B, K, M, L) are kept (B K M L floats); backward applies the
    envelope gradient dD/dC = T:
    grad x^_i = -sum_k g_ik T_ik y^_k, grad y^_j = -sum_{(i, k) -> j} g_ik T_ik^T x^_i.
    """

    @staticmethod
    def forward(ctx, xn, yn, index, mx, my, eps, iters, tol, rows):
        (B, M, d), (N, L, _), K = xn.shape, yn.shape, index.shape[1]
        ws = _Workspace(xn.dtype, xn.device)
        bias = _row_bias(my, xn.dtype)                                     # (N, L)
        keep = any(ctx.needs_input_grad[:2])                               # plans are kept only for backward
        plans = xn.new_empty((B, K, M, L)) if keep else None
        D = xn.new_empty((B, K))
        for i0 in range(0, B, rows):
            i1 = min(B, i0 + rows)
            n, idx = i1 - i0, index[i0:i1]
            yg = torch.index_select(yn, 0, idx.reshape(-1), out=ws.get("tokens", (n * K, L, d)))
            Ct = torch.baddbmm(bias[idx].reshape(n, K * L, 1), yg.view(n, K * L, d), xn[i0:i1].transpose(1, 2),
                               alpha=-1.0, out=ws.get("cost", (n, K * L, M))).view(n * K, L, M)
            bmx = mx[i0:i1].unsqueeze(1).expand(n, K, M).reshape(n * K, M)
            bmy = my[idx].reshape(n * K, L)
            out = plans[i0:i1].view(n * K, M, L) if keep else ws.get("plan", (n * K, M, L))
            D[i0:i1] = _solve(Ct, _masses(bmx, bmy, xn.dtype), _masses(bmy, bmx, xn.dtype), eps, iters, tol, out,
                              ws).view(n, K)
        if keep:
            ctx.save_for_backward(xn, yn, index, plans)
        ctx.rows = rows
        return D

    @staticmethod
    @once_differentiable
    def backward(ctx, gD):
        xn, yn, index, plans = ctx.saved_tensors
        (B, K, M, L), d = plans.shape, xn.shape[2]
        ws = _Workspace(xn.dtype, xn.device)
        gx = torch.zeros_like(xn) if ctx.needs_input_grad[0] else None
        gy = torch.zeros_like(yn) if ctx.needs_input_grad[1] else None
        with _fp32(xn):
            for i0 in range(0, B, ctx.rows):
                i1 = min(B, i0 + ctx.rows)
                n, idx = i1 - i0, index[i0:i1]
                G = torch.mul(plans[i0:i1].transpose(1, 2), gD[i0:i1].view(n, 1, K, 1),
                              out=ws.get("grad", (n, M, K, L))).view(n, M, K * L)
                if gx is not None:
                    yg = torch.index_select(yn, 0, idx.reshape(-1), out=ws.get("tokens", (n * K, L, d)))
                    torch.bmm(G, yg.view(n, K * L, d), out=gx[i0:i1]).neg_()
                if gy is not None:
                    gy.index_add_(0, idx.reshape(-1), torch.bmm(G.transpose(1, 2), xn[i0:i1]).view(n * K, L, d),
                                  alpha=-1.0)
        return gx, gy, None, None, None, None, None, None, None


class _PairwiseOT(torch.autograd.Function):
    """D[i, j] = <T, C> between unit tokens xn[i] (Bx, M, d) and yn[j] (By, L, d) -> (Bx, By).

    The costs of a (ni x nj) chunk come from one GEMM (nj L, d) @ (d, ni M) and one reordering copy. Without a
    gradient to compute nothing but D outlives a chunk; with one, the plans (Bx By M L floats) are kept for the
    envelope backward, which uses the same GEMM shapes. Chunks have ni == 1 or nj == By, so each chunk's plans
    are contiguous.
    """

    @staticmethod
    def forward(ctx, xn, yn, mx, my, eps, iters, tol, ni, nj):
        (Bx, M, d), (By, L, _) = xn.shape, yn.shape
        ws = _Workspace(xn.dtype, xn.device)
        xf, yf = xn.reshape(Bx * M, d), yn.reshape(By * L, d)
        bias = _row_bias(my, xn.dtype).reshape(By * L, 1)
        keep = any(ctx.needs_input_grad[:2])                               # plans are kept only for backward
        plans = xn.new_empty((Bx, By, M, L)) if keep else None
        D = xn.new_empty((Bx, By))
        for i0 in range(0, Bx, ni):
            i1 = min(Bx, i0 + ni)
            for j0 in range(0, By, nj):
                j1 = min(By, j0 + nj)
                pi, pj = i1 - i0, j1 - j0
                raw = torch.addmm(bias[j0 * L:j1 * L], yf[j0 * L:j1 * L], xf[i0 * M:i1 * M].T, alpha=-1.0,
                                  out=ws.get("raw", (pj * L, pi * M)))
                Ct = ws.get("cost", (pi, pj, L, M))
                Ct.copy_(raw.view(pj, L, pi, M).permute(2, 0, 1, 3))
                bmx = mx[i0:i1].unsqueeze(1).expand(pi, pj, M).reshape(pi * pj, M)
                bmy = my[j0:j1].unsqueeze(0).expand(pi, pj, L).reshape(pi * pj, L)
                out = plans[i0:i1, j0:j1].view(pi * pj, M, L) if keep else ws.get("plan", (pi * pj, M, L))
                D[i0:i1, j0:j1] = _solve(Ct.view(pi * pj, L, M), _masses(bmx, bmy, xn.dtype),
                                         _masses(bmy, bmx, xn.dtype), eps, iters, tol, out, ws).view(pi, pj)
        if keep:
            ctx.save_for_backward(xn, yn, plans)
        ctx.ni, ctx.nj = ni, nj
        return D

    @staticmethod
    @once_differentiable
    def backward(ctx, gD):
        xn, yn, plans = ctx.saved_tensors
        (Bx, By, M, L), d = plans.shape, xn.shape[2]
        ws = _Workspace(xn.dtype, xn.device)
        gx = torch.zeros_like(xn) if ctx.needs_input_grad[0] else None
        gy = torch.zeros_like(yn) if ctx.needs_input_grad[1] else None
        with _fp32(xn):
            for i0 in range(0, Bx, ctx.ni):
                i1 = min(Bx, i0 + ctx.ni)
                for j0 in range(0, By, ctx.nj):
                    j1 = min(By, j0 + ctx.nj)
                    pi, pj = i1 - i0, j1 - j0
                    G = torch.mul(plans[i0:i1, j0:j1].transpose(1, 2), gD[i0:i1, j0:j1].view(pi, 1, pj, 1),
                                  out=ws.get("grad", (pi, M, pj, L))).view(pi * M, pj * L)
                    if gx is not None:
                        gx[i0:i1] -= (G @ yn[j0:j1].reshape(pj * L, d)).view(pi, M, d)
                    if gy is not None:
                        gy[j0:j1] -= (G.T @ xn[i0:i1].reshape(pi * M, d)).view(pj, L, d)
        return gx, gy, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------- public API
def ot_distance(
    x: Tensor,
    y: Tensor,
    x_mask: Optional[Tensor] = None,
    y_mask: Optional[Tensor] = None,
    eps: float = 0.05,
    iters: int = 50,
    tol: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Entropic OT between P pairs of token sets under the module convention.

    x: (P, M, d), y: (P, L, d) (any float dtype; normalized here); x_mask (P, M), y_mask (P, L) bool, True = real.
    `iters` Sinkhorn iterations (fixed count); with `tol`, stop early once the L1 row-marginal error of every
    problem in a chunk is below tol. Returns distance (P,) and plan (P, M, L), float32 (float64 for float64
    inputs); the plan carries no gradient, the distance is differentiable through the cost.
    """
    sets = _open(x, y, x_mask, y_mask, eps, iters, paired=True)
    (P, M, _), L = x.shape, y.shape[1]
    (_, Mt, _), Lt = sets.x.shape, sets.y.shape[1]
    mx, my, dtype, dev = sets.mx, sets.my, sets.dtype, x.device
    a, b = _masses(mx, my, dtype), _masses(my, mx, dtype)
    with _fp32(x):
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            D, T = _PairedOT.apply(*sets.units(), mx, my, a, b, eps, iters, tol)
        else:
            T = torch.empty((P, Mt, Lt), dtype=dtype, device=dev)
            D = _paired(sets.x, sets.y, mx, my, a, b, False, eps, iters, tol, T)
    if (Mt, Lt) == (M, L):
        return D, T
    plan = torch.zeros((P, M, L), dtype=dtype, device=dev)
    plan[:, :Mt, :Lt] = T
    return D, plan


def candidate_ot_distance(
    x: Tensor,
    y: Tensor,
    index: Tensor,
    x_mask: Optional[Tensor] = None,
    y_mask: Optional[Tensor] = None,
    eps: float = 0.05,
    iters: int = 50,
    tol: Optional[float] = None,
    chunk_pairs: int = 8192,
) -> Tensor:
    """One-to-many OT: D[i, k] = ot_distance(x[i], y[index[i, k]]) for x (B, M, d), y (N, L, d), index (B, K).

    The shortlist form (an image against K candidate captions, a caption against K candidate images): every
    token set is normalized once and x[i] is never copied; it meets its K candidates in one (K L, d) @ (d, M)
    GEMM. At most `chunk_pairs` problems are in flight (their plans, B K M L floats, are kept when a gradient is
    needed). Returns (B, K), differentiable like `ot_distance`.
    """
    sets = _open(x, y, x_mask, y_mask, eps, iters, paired=False)
    if index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be (B, K) with B = {x.shape[0]} rows of x, got {tuple(index.shape)}")
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}")
    (B, M, _), (N, L, d), K, dev = sets.x.shape, sets.y.shape, index.shape[1], x.device
    # a chunk holds its costs and its gathered candidate tokens: both stay within the cache budget
    rows = _chunk(B, K * (M * L + L * d), dev, cap=max(1, chunk_pairs // max(1, K)))
    with _fp32(x):
        return _CandidateOT.apply(*sets.units(), index.to(dev), sets.mx, sets.my, eps, iters, tol, rows)


def pairwise_ot_distance(
    x: Tensor,
    y: Tensor,
    x_mask: Optional[Tensor] = None,
    y_mask: Optional[Tensor] = None,
    eps: float = 0.05,
    iters: int = 50,
    tol: Optional[float] = None,
    chunk_pairs: int = 8192,
) -> Tensor:
    """All-pairs OT distances D[i, j] = ot_distance(x[i], y[j]) for x (Bx, M, d), y (By, L, d) -> (Bx, By).

    Each token set is normalized once; the costs of a chunk of at most `chunk_pairs` problems come from one
    GEMM (nj * L, d) @ (d, ni * M). Differentiable like `ot_distance`; when a gradient is needed the plans of
    all Bx * By problems are kept for backward (Bx By M L floats), otherwise only one chunk is alive at a time.
    """
    sets = _open(x, y, x_mask, y_mask, eps, iters, paired=False)
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}")
    (Bx, M, _), (By, L, _) = sets.x.shape, sets.y.shape
    per_chunk = _chunk(Bx * By, M * L, x.device, cap=chunk_pairs)
    nj = min(By, per_chunk)
    ni = max(1, min(Bx, per_chunk // nj)) if nj == By else 1
    with _fp32(x):
        return _PairwiseOT.apply(*sets.units(), sets.mx, sets.my, eps, iters, tol, ni, nj)


def ot_distance_cfg(
    x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor], cfg: OTConfig,
    iters: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """`ot_distance` with cfg's eps, iters and tol.

    `iters` overrides cfg.iters (the losses pass cfg.train_iters). Returns distance (P,) and plan (P, M, L).
    """
    return ot_distance(x, y, x_mask, y_mask, eps=cfg.eps, iters=iters or cfg.iters, tol=cfg.tol)


def candidate_ot_distance_cfg(
    x: Tensor, y: Tensor, index: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor], cfg: OTConfig,
    iters: Optional[int] = None,
) -> Tensor:
    """`candidate_ot_distance` under `cfg` -> (B, K)."""
    return candidate_ot_distance(x, y, index, x_mask, y_mask, eps=cfg.eps, iters=iters or cfg.iters, tol=cfg.tol,
                                 chunk_pairs=cfg.chunk_pairs)


def pairwise_ot_distance_cfg(
    x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor], cfg: OTConfig,
    iters: Optional[int] = None,
) -> Tensor:
    """`pairwise_ot_distance` under `cfg` -> (Bx, By)."""
    return pairwise_ot_distance(x, y, x_mask, y_mask, eps=cfg.eps, iters=iters or cfg.iters, tol=cfg.tol,
                                chunk_pairs=cfg.chunk_pairs)


