"""otc_ray.ot against POT and geomloss (oracles); batching, masking, chunking, gradients, precision."""
from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otc_ray.config import OTConfig
from otc_ray.ot import (
    candidate_ot_distance,
    ot_distance,
    ot_distance_cfg,
    pairwise_ot_distance,
    trim_padding,
)


def _problems(P=6, M=7, L=5, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, M, d, generator=g, dtype=dtype)
    y = torch.randn(P, L, d, generator=g, dtype=dtype)
    mx = torch.rand(P, M, generator=g) > 0.3
    my = torch.rand(P, L, generator=g) > 0.3
    mx[:, 0] = True
    my[:, 0] = True
    return x, y, mx, my


def _pot_plan(x, y, mx, my, eps):
    """POT's log-domain Sinkhorn on the real tokens of one problem, embedded in a zero (M, L) plan."""
    xi = torch.nn.functional.normalize(x[mx].double(), dim=-1)
    yi = torch.nn.functional.normalize(y[my].double(), dim=-1)
    C = (1.0 - xi @ yi.T).numpy()
    a, b = np.full(len(xi), 1.0 / len(xi)), np.full(len(yi), 1.0 / len(yi))
    T = pot.sinkhorn(a, b, C, reg=eps, method="sinkhorn_log", numItermax=4000, stopThr=1e-10)
    full = np.zeros((x.shape[0], y.shape[0]))
    full[np.ix_(mx.numpy(), my.numpy())] = T
    return full, float((T * C).sum())


@pytest.mark.parametrize("eps", [0.05, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plan_and_distance_match_pot(eps, dtype):
    x, y, mx, my = _problems(dtype=dtype)
    D, T = ot_distance(x, y, mx, my, eps=eps, iters=3000)
    for p in range(x.shape[0]):
        ref_plan, ref_d = _pot_plan(x[p], y[p], mx[p], my[p], eps)
        np.testing.assert_allclose(T[p].double().numpy(), ref_plan, atol=1e-4 if dtype == torch.float32 else 1e-9)
        assert abs(D[p].item() - ref_d) < 1e-4


def test_small_eps_matches_pot_and_is_finite():
    x, y, mx, my = _problems(P=3, M=4, L=3, d=8, seed=3)
    D, T = ot_distance(x.float(), y.float(), mx, my, eps=0.01, iters=5000)
    assert torch.isfinite(D).all() and torch.isfinite(T).all()
    for p in range(3):
        ref_plan, ref_d = _pot_plan(x[p], y[p], mx[p], my[p], 0.01)
        np.testing.assert_allclose(T[p].double().numpy(), ref_plan, atol=1e-4)
        assert abs(D[p].item() - ref_d) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_absorption_reaches_the_true_plan_at_tiny_eps(dtype):
    """Each x token has one near copy among the y tokens (cost ~0) and costs ~1 = 500 eps to the others: the
    potentials must move through many absorptions. At this eps the entropic plan is the matching permutation to
    within 1%; a plan stuck on a truncated kernel (clamped entries carrying mass) also meets the marginals but
    splits rows across columns."""
    g = torch.Generator().manual_seed(0)
    n, d = 6, 32
    x = torch.nn.functional.normalize(torch.randn(1, n, d, generator=g, dtype=torch.float64), dim=-1)
    perm = torch.randperm(n, generator=g)
    y = x[:, perm] + 0.05 * torch.randn(1, n, d, generator=g, dtype=torch.float64)       # y_j is a copy of x_perm[j]
    _, plan = ot_distance(x.to(dtype), y.to(dtype), eps=0.002, iters=3000)
    best = torch.nn.functional.one_hot(torch.argsort(perm), n).to(plan.dtype)           # row i -> the j with perm[j] = i
    assert torch.isfinite(plan).all()
    assert (n * plan[0] - best).abs().max() < 0.02
    torch.testing.assert_close(plan[0].sum(1), torch.full((n,), 1 / n, dtype=plan.dtype), atol=1e-3, rtol=0)


def test_batched_equals_loop_of_single_solves():
    x, y, mx, my = _problems(P=9, dtype=torch.float32)
    D, T = ot_distance(x, y, mx, my, iters=40)
    for p in range(9):
        d1, t1 = ot_distance(x[p:p + 1], y[p:p + 1], mx[p:p + 1], my[p:p + 1], iters=40)
        torch.testing.assert_close(D[p:p + 1], d1, atol=1e-6, rtol=0)
        torch.testing.assert_close(T[p:p + 1], t1, atol=1e-7, rtol=0)


def test_marginals_hold_and_padding_gets_zero_mass():
    x, y, mx, my = _problems(P=5, M=8, L=6)
    my[:, -1] = False                       # a column that is padding everywhere (trimmed internally)
    mx[4] = False                           # a problem with no real image token
    _, T = ot_distance(x, y, mx, my, iters=500)
    a = mx / mx.sum(1, keepdim=True).clamp_min(1) * my.any(1, keepdim=True)
    b = my / my.sum(1, keepdim=True) * mx.any(1, keepdim=True)
    torch.testing.assert_close(T.sum(2), a.double(), atol=1e-8, rtol=0)
    torch.testing.assert_close(T.sum(1), b.double(), atol=1e-8, rtol=0)
    pad = ~(mx.unsqueeze(2) & my.unsqueeze(1))
    assert (T[pad] == 0).all()
    assert T.shape == (5, 8, 6)


def test_fully_masked_problem_is_zero_not_nan():
    x, y, mx, my = _problems(P=3, dtype=torch.float32)
    my[1] = False
    D, T = ot_distance(x, y, mx, my)
    assert torch.isfinite(D).all() and torch.isfinite(T).all()
    assert D[1] == 0 and (T[1] == 0).all() and D[0] > 0


def _orthonormal(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return q.T.contiguous()                 # (n, d), orthonormal rows


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 6), extra=st.integers(0, 3), seed=st.integers(0, 10_000), scale=st.floats(0.5, 4.0))
def test_known_permutation_is_recovered(n, extra, seed, scale):
    x = _orthonormal(n, n + extra, seed) * scale           # any norm: tokens are normalized inside
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    y = x[perm]                                            # y[l] = x[perm[l]]: the matching costs 0, the rest 1
    _, T = ot_distance(x[None], y[None], eps=0.05, iters=100)
    inverse = torch.argsort(perm)
    assert torch.equal(T[0].argmax(1), inverse)
    torch.testing.assert_close(T[0][torch.arange(n), inverse], torch.full((n,), 1.0 / n, dtype=T.dtype),
                               atol=1e-6, rtol=0)


def test_gradcheck_envelope_gradient_of_regularized_value():
    """The envelope gradient (plan fixed) is the exact gradient of <T, C> - eps H(T) at convergence."""
    eps = 0.1
    x, y, mx, my = _problems(P=2, M=3, L=4, d=3, seed=7)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def regularized(xx, yy):
        D, T = ot_distance(xx, yy, mx, my, eps=eps, iters=300)
        neg_entropy = torch.where(T > 0, T * T.clamp_min(1e-300).log(), torch.zeros_like(T)).sum((1, 2))
        return D + eps * neg_entropy.detach()   # value of the regularized objective, gradient of D

    assert torch.autograd.gradcheck(regularized, (x, y), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradient_flows_through_the_cost_only():
    x, y, mx, my = _problems(P=4, dtype=torch.float32)
    x.requires_grad_(True)
    y.requires_grad_(True)
    D, T = ot_distance(x, y, mx, my)
    assert not T.requires_grad
    D.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert (x.grad[~mx] == 0).all() and (y.grad[~my] == 0).all()   # padding tokens get no gradient


def test_bfloat16_inputs_give_finite_results_close_to_float32():
    x, y, mx, my = _problems(P=8, M=16, L=8, d=32, dtype=torch.float32)
    D32, T32 = ot_distance(x, y, mx, my)
    D16, T16 = ot_distance(x.bfloat16(), y.bfloat16(), mx, my)
    assert D16.dtype == torch.float32 and torch.isfinite(D16).all() and torch.isfinite(T16).all()
    torch.testing.assert_close(D16, D32, atol=2e-2, rtol=0)
    torch.testing.assert_close(T16.sum(2), T32.sum(2), atol=1e-5, rtol=0)


def test_autocast_region_does_not_lower_the_precision():
    """Callers run features under torch.autocast(bf16); the OT costs and iterations must stay float32."""
    x, y, mx, my = _problems(P=6, M=12, L=7, d=24, dtype=torch.float32)
    D, T = ot_distance(x, y, mx, my)
    P_ = pairwise_ot_distance(x, y, mx, my)
    C_ = candidate_ot_distance(x, y, torch.arange(6).unsqueeze(1), mx, my)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Da, Ta = ot_distance(x, y, mx, my)
        Pa = pairwise_ot_distance(xg, y, mx, my)
        Ca = candidate_ot_distance(x, y, torch.arange(6).unsqueeze(1), mx, my)
    Pa.sum().backward()
    torch.testing.assert_close(Da, D, atol=1e-6, rtol=0)
    torch.testing.assert_close(Ta, T, atol=1e-7, rtol=0)
    torch.testing.assert_close(Pa, P_, atol=1e-6, rtol=0)
    torch.testing.assert_close(Ca, C_, atol=1e-6, rtol=0)
    assert xg.grad.dtype == torch.float32 and torch.isfinite(xg.grad).all()


def test_tol_stops_early_and_meets_tolerance():
    x, y, mx, my = _problems(P=4, M=12, L=9, d=4, seed=11)
    a = (mx / mx.sum(1, keepdim=True)).double()
    err = lambda T: (T.sum(2) - a).abs().sum(1).max().item()  # noqa: E731
    _, full = ot_distance(x, y, mx, my, eps=0.02, iters=20000)
    _, early = ot_distance(x, y, mx, my, eps=0.02, iters=20000, tol=1e-3)
    assert err(early) < 1e-3
    assert err(early) > 10 * err(full)      # it stopped before running all iterations


def test_pairwise_equals_explicit_loop_and_chunking_is_invisible():
    x, y, mx, my = _problems(P=5, dtype=torch.float32)
    y2, my2 = y[:4], my[:4]
    D = pairwise_ot_distance(x, y2, mx, my2, iters=30)
    assert D.shape == (5, 4)
    for i in range(5):
        ref, _ = ot_distance(x[i:i + 1].expand(4, -1, -1), y2, mx[i:i + 1].expand(4, -1), my2, iters=30)
        torch.testing.assert_close(D[i], ref, atol=1e-6, rtol=0)
    for chunk in (1, 3, 7):
        torch.testing.assert_close(pairwise_ot_distance(x, y2, mx, my2, iters=30, chunk_pairs=chunk), D,
                                   atol=1e-6, rtol=0)


def test_candidate_form_values_and_gradients_equal_paired_form():
    x, y, mx, my = _problems(P=4, dtype=torch.float64)
    y, my = torch.cat([y, y.flip(0)]), torch.cat([my, my.flip(0)])           # N = 8 candidates
    index = torch.tensor([[0, 5, 2], [1, 1, 7], [6, 3, 0], [4, 2, 3]])
    w = torch.randn(4, 3, dtype=torch.float64)
    xa, ya = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    D = candidate_ot_distance(xa, ya, index, mx, my, iters=200, chunk_pairs=2)
    (D * w).sum().backward()
    xb, yb = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref, _ = ot_distance(xb.unsqueeze(1).expand(-1, 3, -1, -1).reshape(12, *x.shape[1:]),
                         yb[index].reshape(12, *y.shape[1:]), mx.unsqueeze(1).expand(-1, 3, -1).reshape(12, -1),
                         my[index].reshape(12, -1), iters=200)
    (ref.view(4, 3) * w).sum().backward()
    torch.testing.assert_close(D, ref.view(4, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ya.grad, yb.grad, atol=1e-12, rtol=0)


def test_pairwise_gradient_equals_candidate_gradient():
    x, y, mx, my = _problems(P=3, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64)
    xa, ya = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    (pairwise_ot_distance(xa, ya, mx, my, iters=100, chunk_pairs=2) * w).sum().backward()
    xb, yb = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    index = torch.arange(3).expand(3, 3)
    (candidate_ot_distance(xb, yb, index, mx, my, iters=100) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ya.grad, yb.grad, atol=1e-12, rtol=0)


def _geomloss_plan(x, y, mx, my, eps, scaling):
    """The oracle: geomloss SamplesLoss("sinkhorn", tensorized, debias=False, potentials=True) on the unit tokens
    with uniform masses over the real ones (blur = sqrt(eps) solves the same entropic problem), the plan from the
    dual potentials T = a b exp((F + G - C) / eps). Returns distance (P,) and plan (P, M, L)."""
    from geomloss import SamplesLoss

    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    a = mx.to(x.dtype) / mx.sum(1, keepdim=True)
    b = my.to(x.dtype) / my.sum(1, keepdim=True)
    solver = SamplesLoss("sinkhorn", p=2, blur=eps ** 0.5, scaling=scaling, debias=False, potentials=True,
                         backend="tensorized", diameter=2.0)
    F, G = solver(a, xn, b, yn)
    C = 1.0 - torch.bmm(xn, yn.transpose(1, 2))
    T = ((F.unsqueeze(2) + G.unsqueeze(1) - C) / eps).exp() * a.unsqueeze(2) * b.unsqueeze(1)
    return (T * C).flatten(1).sum(1), T


def test_plan_close_to_geomloss_at_large_blur():
    x, y, mx, my = _problems(P=4, M=10, L=8, d=8, dtype=torch.float32)
    eps = 1.0                                                             # blur 1: large against costs in [0, 2]
    Dg, Tg = _geomloss_plan(x, y, mx, my, eps, scaling=0.99)
    Dt, Tt = ot_distance(x, y, mx, my, eps=eps, iters=500)
    assert (Tg - Tt).abs().max() < 1e-2 * Tt.max()
    torch.testing.assert_close(Dg, Dt, atol=1e-3, rtol=0)
    torch.testing.assert_close(ot_distance_cfg(x, y, mx, my, OTConfig(eps=eps, iters=500))[0], Dt)


def test_shape_errors_name_the_sizes():
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="d=8.*d=6"):
        ot_distance(x, torch.randn(3, 5, 6))
    with pytest.raises(ValueError, match="P=3 and P=2"):
        ot_distance(x, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        ot_distance(x, torch.randn(3, 5, 8), x_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        ot_distance(x, x, eps=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y, mx, my = _problems(P=16, dtype=torch.float32)
    D, T = ot_distance(x, y, mx, my)
    Dc, Tc = ot_distance(x.cuda(), y.cuda(), mx.cuda(), my.cuda())
    torch.testing.assert_close(Dc.cpu(), D, atol=1e-5, rtol=0)
    torch.testing.assert_close(Tc.cpu(), T, atol=1e-6, rtol=0)
    P = pairwise_ot_distance(x.cuda().bfloat16(), y.cuda().bfloat16(), mx.cuda(), my.cuda())
    assert torch.isfinite(P).all()


def test_trim_padding_drops_positions_padded_in_every_set_and_changes_no_distance():
    words = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    t, m = trim_padding(words, mask)
    assert t.shape == (3, 3, 4) and torch.equal(t, words[:, :3]) and torch.equal(m, mask[:, :3])
    assert trim_padding(words, None)[0] is words                             # no mask: nothing is padding
    t, m = trim_padding(words, torch.zeros(3, 6, dtype=torch.bool))          # nothing real: one position kept
    assert t.shape == (3, 1, 4) and m.shape == (3, 1)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    full = ot_distance(x, words.double(), None, mask)
    y, y_mask = trim_padding(words.double(), mask)
    short = ot_distance(x, y, None, y_mask)
    assert torch.allclose(full[0], short[0]) and torch.allclose(full[1][:, :, :3], short[1])
