"""The post-training and RLHF losses of llmcore.training.losses against values computed from
their definitions: float64 Python loops over scalars (``math``), written here independently
of the functions under test, on fresh random inputs of odd sizes. Masked positions carry
NaN/Inf, which must reach neither an output nor a gradient."""

from __future__ import annotations

import math

import pytest
import torch

from llmcore.training.losses import (
    bradley_terry_loss,
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    preference_loss,
    slic_loss,
    whiten,
)

SIZES = [1, 7, 97]
SHAPES = [(1, 1), (7, 7), (3, 97), (97, 5)]
F64 = torch.float64


# ----------------------------------------------------------------------------- references

def logsig(x: float) -> float:
    """log σ(x), stable both ways."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_preference(pc, pr, rc, rr, loss_type, beta, eps):
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        delta = (a - c) - (b - d)
        z = beta * delta
        if loss_type == "dpo":
            out.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
        elif loss_type == "ipo":
            out.append((delta - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        else:
            out.append((-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps))
    return torch.tensor(out, dtype=F64)


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


def valid_indices(m: torch.Tensor) -> list[list[int]]:
    return [[t for t, v in enumerate(row) if v] for row in m.tolist()]


def ref_masked_mean(x, m) -> float:
    vals = [v for xr, mr in zip(rows(x), m.tolist(), strict=True)
            for v, keep in zip(xr, mr, strict=True) if keep]
    return sum(vals) / len(vals) if vals else 0.0


def ref_gae(r, v, m, gamma, lam):
    """Per row, over the list of valid positions only, from the end."""
    B, T = r.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b, idx in enumerate(valid_indices(m)):
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = r[b, t].item() + gamma * next_v - v[b, t].item()
            a = delta + gamma * lam * next_a
            adv[b][t], ret[b][t] = a, a + v[b, t].item()
            next_v, next_a = v[b, t].item(), a
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


# ----------------------------------------------------------------------------- inputs

def right_padded_mask(B: int, T: int) -> torch.Tensor:
    """Rows of random length 0..T (at least one row nonempty)."""
    lengths = torch.randint(0, T + 1, (B,))
    lengths[torch.randint(0, B, ())] = torch.randint(1, T + 1, ())
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


def holey_mask(B: int, T: int) -> torch.Tensor:
    m = torch.rand(B, T) < 0.7
    m.view(-1)[torch.randint(0, B * T, ())] = True
    return m


def plant(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x with NaN, +Inf or -Inf at the masked positions."""
    bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)
    junk = bad[torch.randint(0, 3, x.shape)]
    return torch.where(m, x, junk)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def logps(*shape) -> torch.Tensor:
    return -torch.rand(*shape, dtype=F64) * 5 - 0.01


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a.to(F64), b.to(F64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- preferences

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("loss_type,eps", [("dpo", 0.0), ("dpo", 0.1), ("dpo", 0.5),
                                           ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0),
                                           ("robust", 0.2), ("robust", 0.45)])
def test_preference_loss_matches_definition(n, loss_type, eps):
    pc, pr, rc, rr = (logps(n) * 20 for _ in range(4))
    beta = float(torch.empty(()).uniform_(0.01, 1.0))
    args = [leaf(t) for t in (pc, pr, rc, rr)]
    losses, chosen, rejected = preference_loss(*args, loss_type=loss_type, beta=beta,
                                               label_smoothing=eps)
    assert losses.shape == (n,) and losses.dtype == F64
    close(losses, ref_preference(pc, pr, rc, rr, loss_type, beta, eps))
    want_c = [beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist(), strict=True)]
    want_r = [beta * (b - d) for b, d in zip(pr.tolist(), rr.tolist(), strict=True)]
    close(chosen, torch.tensor(want_c, dtype=F64))
    close(rejected, torch.tensor(want_r, dtype=F64))
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    for t in args:
        assert torch.isfinite(t.grad).all()


def test_dpo_is_ln2_when_policy_equals_reference():
    pc, pr = logps(97) * 50, logps(97) * 50
    for beta in (0.01, 0.1, 2.0):
        for eps in (0.0, 0.3):
            losses, chosen, rejected = preference_loss(pc, pr, pc.clone(), pr.clone(), "dpo",
                                                       beta, eps)
            assert torch.equal(losses, torch.full_like(losses, math.log(2)))
            assert torch.equal(chosen, torch.zeros_like(chosen))
            assert torch.equal(rejected, torch.zeros_like(rejected))


def test_label_smoothing_zero_is_plain_dpo_and_robust_zero_is_dpo():
    pc, pr, rc, rr = (logps(97) * 20 for _ in range(4))
    dpo, *_ = preference_loss(pc, pr, rc, rr, "dpo", 0.3, 0.0)
    quads = zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
    plain = torch.tensor([-logsig(0.3 * ((a - c) - (b - d))) for a, b, c, d in quads], dtype=F64)
    close(dpo, plain)
    robust, *_ = preference_loss(pc, pr, rc, rr, "robust", 0.3, 0.0)
    assert torch.equal(robust, dpo)
    smoothed, *_ = preference_loss(pc, pr, rc, rr, "dpo", 0.3, 0.2)
    assert not torch.allclose(smoothed, dpo)


def test_robust_is_unbiased_under_label_flips():
    """(1−ε)·ℓ(Δ) + ε·ℓ(−Δ) = −logσ(βΔ): in expectation over flips, the clean DPO loss."""
    pc, pr, rc, rr = (logps(97) * 20 for _ in range(4))
    beta, eps = 0.2, 0.3
    fwd, *_ = preference_loss(pc, pr, rc, rr, "robust", beta, eps)
    flip, *_ = preference_loss(pr, pc, rr, rc, "robust", beta, eps)
    clean = ref_preference(pc, pr, rc, rr, "dpo", beta, 0.0)
    close((1 - eps) * fwd + eps * flip, clean, 1e-10)


def test_ipo_on_length_averaged_logps_minimum_at_half_inverse_beta():
    """The trainer feeds length-averaged log-probs; the loss is (Δ − 1/(2β))², 0 with zero
    gradient at Δ = 1/(2β) and larger either side."""
    beta = 0.25
    T = 11
    token = logps(4, 7, T)  # [side, B, T] for policy chosen/rejected, ref chosen/rejected
    mask = holey_mask(4 * 7, T).view(4, 7, T)
    avg = torch.tensor([[sum(x for x, k in zip(r, mr, strict=True) if k) / max(1, sum(mr))
                         for r, mr in zip(side.tolist(), ms.tolist(), strict=True)]
                        for side, ms in zip(token, mask, strict=True)], dtype=F64)
    losses, *_ = preference_loss(*avg, loss_type="ipo", beta=beta)
    close(losses, ref_preference(*avg, "ipo", beta, 0.0))
    # place the policy's chosen log-prob so that Δ = 1/(2β) exactly (up to rounding)
    _, pr, rc, rr = avg
    target = 1 / (2 * beta)
    for shift in (-0.5, -1e-3, 0.0, 1e-3, 0.5):
        pc = leaf(rc + (pr - rr) + target + shift)
        loss, *_ = preference_loss(pc, pr, rc, rr, "ipo", beta)
        close(loss, torch.full_like(loss, shift ** 2), 1e-9)
        loss.sum().backward()
        close(pc.grad, torch.full_like(pc.grad, 2 * shift), 1e-9)


def test_hinge_is_zero_beyond_the_margin():
    pc, pr, rc, rr = (logps(97) for _ in range(4))
    beta = 0.5
    losses, *_ = preference_loss(pc, pr, rc, rr, "hinge", beta)
    delta = (pc - rc) - (pr - rr)
    assert torch.equal(losses == 0, beta * delta >= 1)


def test_preference_loss_large_margins_stay_finite():
    big = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float32)
    zero = torch.zeros(3)
    for loss_type, eps in (("dpo", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)):
        pc = leaf(big)
        losses, *_ = preference_loss(pc, zero, zero, zero, loss_type, 0.1, eps)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all(), loss_type


def test_preference_loss_dtypes():
    x = logps(7).to(torch.bfloat16)
    losses, chosen, _ = preference_loss(x, x.flip(0), x, x, "dpo")
    assert losses.dtype == torch.float32 and chosen.dtype == torch.float32


def test_preference_loss_errors():
    x = logps(7)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape \\[6\\]"):
        preference_loss(x, x, x, x[:6])
    with pytest.raises(ValueError, match="policy_rejected_logps must be a floating-point"):
        preference_loss(x, torch.ones(7, dtype=torch.long), x, x)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, loss_type="sigmoid")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x, x, "robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x, x, "dpo", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing applies"):
        preference_loss(x, x, x, x, "ipo", label_smoothing=0.1)


@pytest.mark.parametrize("n", SIZES)
def test_slic_loss_matches_definition(n):
    c, r = leaf(logps(n) * 10), leaf(logps(n) * 10)
    nll = leaf(torch.rand(n, dtype=F64) * 3)
    delta, lam = 1.5, 0.2
    losses = slic_loss(c, r, nll, delta=delta, lam=lam)
    want = [max(0.0, delta - a + b) + lam * t for a, b, t in
            zip(c.tolist(), r.tolist(), nll.tolist(), strict=True)]
    close(losses, torch.tensor(want, dtype=F64))
    losses.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (c, r, nll))
    with pytest.raises(ValueError, match="target_nll has shape"):
        slic_loss(c, r, nll[:0])
    with pytest.raises(ValueError, match="delta"):
        slic_loss(c, r, nll, delta=-1.0)
    with pytest.raises(ValueError, match="lam"):
        slic_loss(c, r, nll, lam=-0.1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("center_coef", [None, 0.01])
def test_bradley_terry_matches_definition(n, margin_kind, center_coef):
    rc, rr = leaf(torch.randn(n, dtype=F64) * 3), leaf(torch.randn(n, dtype=F64) * 3)
    margins = {"none": [0.0] * n, "float": [0.7] * n,
               "tensor": torch.rand(n, dtype=F64).tolist()}[margin_kind]
    margin = {"none": None, "float": 0.7,
              "tensor": torch.tensor(margins, dtype=F64)}[margin_kind]
    loss = bradley_terry_loss(rc, rr, margin=margin, center_coef=center_coef)
    pairs = list(zip(rc.tolist(), rr.tolist(), margins, strict=True))
    want = sum(-logsig(a - b - m) for a, b, m in pairs) / n
    if center_coef is not None:
        want += center_coef * sum((a + b) ** 2 for a, b, _ in pairs) / n
    assert loss.dim() == 0
    close(loss, torch.tensor(want, dtype=F64))
    loss.backward()
    assert torch.isfinite(rc.grad).all() and torch.isfinite(rr.grad).all()


def test_bradley_terry_errors():
    r = torch.randn(7)
    with pytest.raises(ValueError, match="r_rejected has shape"):
        bradley_terry_loss(r, r[:5])
    with pytest.raises(ValueError, match="margin has shape"):
        bradley_terry_loss(r, r, margin=torch.zeros(3))
    with pytest.raises(ValueError, match="r_chosen must be a floating-point"):
        bradley_terry_loss(torch.ones(7, dtype=torch.int32), r)
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(r, r, center_coef=-1.0)


# ----------------------------------------------------------------------------- PPO

@pytest.mark.parametrize("shape", SHAPES)
def test_kl_penalty_k1_k3(shape):
    lp, ref = logps(*shape), logps(*shape)
    k1 = kl_penalty(lp, ref, "k1")
    k3 = kl_penalty(lp, ref, "k3")
    want1 = [[a - b for a, b in zip(x, y, strict=True)]
             for x, y in zip(rows(lp), rows(ref), strict=True)]
    want3 = [[math.exp(b - a) - 1 - (b - a) for a, b in zip(x, y, strict=True)]
             for x, y in zip(rows(lp), rows(ref), strict=True)]
    close(k1, torch.tensor(want1, dtype=F64))
    close(k3, torch.tensor(want3, dtype=F64))
    assert (k3 >= 0).all()
    assert torch.equal(kl_penalty(lp, lp, "k3"), torch.zeros_like(lp))


def test_kl_estimators_are_unbiased():
    """Sampling y ~ p: E[k1] = E[k3] = KL(p‖q)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(13, dtype=F64, generator=gen), 0)
    q = torch.softmax(torch.randn(13, dtype=F64, generator=gen), 0)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    y = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    lp, lq = p.log()[y], q.log()[y]
    for kind in ("k1", "k3"):
        est = kl_penalty(lp, lq, kind).mean().item()
        assert abs(est - kl) < 0.02 * max(kl, 0.1), (kind, est, kl)


def test_kl_penalty_errors():
    x = logps(3, 7)
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(x, x, "k2")
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        kl_penalty(x, x[:, :3])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["right_padded", "holey"])
def test_ppo_rewards(shape, mask_kind):
    B, T = shape
    m = (right_padded_mask if mask_kind == "right_padded" else holey_mask)(B, T)
    kl = torch.randn(B, T, dtype=F64)
    scores = torch.randn(B, dtype=F64)
    coef = 0.05
    out = ppo_rewards(plant(scores, m.any(1)), plant(kl, m), m, coef)
    want = [[0.0] * T for _ in range(B)]
    for b, idx in enumerate(valid_indices(m)):
        for t in idx:
            want[b][t] = -coef * kl[b, t].item()
        if idx:
            want[b][idx[-1]] += scores[b].item()
    close(out, torch.tensor(want, dtype=F64))


def test_ppo_rewards_errors():
    kl, m = torch.randn(3, 7), torch.ones(3, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match="scores has shape"):
        ppo_rewards(torch.randn(4), kl, m, 0.1)
    with pytest.raises(ValueError, match="kl must have 2 dim"):
        ppo_rewards(torch.randn(3), kl[0], m[0], 0.1)
    with pytest.raises(ValueError, match="mask has shape"):
        ppo_rewards(torch.randn(3), kl, m[:, :5], 0.1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("mask_kind", ["right_padded", "holey"])
def test_gae_matches_reverse_loop(shape, gamma, lam, mask_kind):
    B, T = shape
    m = (right_padded_mask if mask_kind == "right_padded" else holey_mask)(B, T)
    r, v = torch.randn(B, T, dtype=F64), torch.randn(B, T, dtype=F64)
    rl, vl = leaf(plant(r, m)), leaf(plant(v, m))
    adv, ret = gae(rl, vl, m, gamma, lam)
    want_adv, want_ret = ref_gae(r, v, m, gamma, lam)
    close(adv, want_adv, 1e-10)
    close(ret, want_ret, 1e-10)
    (adv.sum() + ret.sum()).backward()
    for t in (rl, vl):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[~m] == 0).all()


def test_gae_right_padded_equals_the_zero_filled_loop():
    """TRL's loop: rewards and values zero beyond the response, V = 0 after the last
    position, every position a step; on right-padded masks the same advantages."""
    B, T = 7, 97
    m = right_padded_mask(B, T)
    r = torch.where(m, torch.randn(B, T, dtype=F64), 0.0)
    v = torch.where(m, torch.randn(B, T, dtype=F64), 0.0)
    gamma, lam = 0.97, 0.9
    last = torch.zeros(B, dtype=F64)
    rev = []
    for t in reversed(range(T)):
        nv = v[:, t + 1] if t < T - 1 else 0.0
        last = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        rev.append(last)
    want = torch.stack(rev[::-1], 1)
    adv, ret = gae(r, v, m, gamma, lam)
    close(adv, torch.where(m, want, 0.0), 1e-10)
    close(ret, torch.where(m, want + v, 0.0), 1e-10)


def test_gae_closed_forms():
    """λ = 0: A = one-step TD error; γ = λ = 1: A = Σ_{t' ≥ t} r − V_t (Monte Carlo)."""
    B, T = 5, 9
    m = torch.ones(B, T, dtype=torch.bool)
    r, v = torch.randn(B, T, dtype=F64), torch.randn(B, T, dtype=F64)
    adv, _ = gae(r, v, m, 0.9, 0.0)
    nxt = torch.cat([v[:, 1:], torch.zeros(B, 1, dtype=F64)], 1)
    close(adv, r + 0.9 * nxt - v, 1e-12)
    adv, ret = gae(r, v, m, 1.0, 1.0)
    to_go = r.flip(1).cumsum(1).flip(1)
    close(adv, to_go - v, 1e-12)
    close(ret, to_go, 1e-12)


def test_gae_errors():
    r, m = torch.randn(3, 7), torch.ones(3, 7)
    with pytest.raises(ValueError, match="values has shape"):
        gae(r, r[:, :6], m)
    with pytest.raises(ValueError, match="rewards must have 2 dim"):
        gae(r[0], r[0], m[0])
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, m, lam=-0.1)


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean(shape):
    m = holey_mask(*shape)
    x = torch.randn(*shape, dtype=F64)
    xl = leaf(plant(x, m))
    out = masked_mean(xl, m)
    close(out, torch.tensor(ref_masked_mean(x, m), dtype=F64))
    out.backward()
    assert torch.isfinite(xl.grad).all() and (xl.grad[~m] == 0).all()
    per_row = masked_mean(plant(x, m), m, dim=1)
    want = [ref_masked_mean(x[b:b + 1], m[b:b + 1]) for b in range(shape[0])]
    close(per_row, torch.tensor(want, dtype=F64))
    empty = torch.zeros(shape, dtype=torch.bool)
    assert masked_mean(plant(x, empty), empty).item() == 0.0


@pytest.mark.parametrize("shape", [(7, 7), (3, 97), (97, 5)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shape, shift_mean):
    m = holey_mask(*shape)
    x = torch.randn(*shape, dtype=F64) * 4 + 3
    xl = leaf(plant(x, m))
    out = whiten(xl, m, shift_mean=shift_mean)
    vals = [v for xr, mr in zip(rows(x), m.tolist(), strict=True)
            for v, k in zip(xr, mr, strict=True) if k]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    got = out[m].tolist()
    for v, g in zip(vals, got, strict=True):
        want = (v - mu) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)
        assert abs(g - want) < 1e-10
    g_mu = sum(got) / len(got)
    g_var = sum((g - g_mu) ** 2 for g in got) / (len(got) - 1)
    assert abs(g_mu - (0.0 if shift_mean else mu)) < 1e-10
    assert abs(g_var - 1.0) < 1e-6
    assert torch.equal(out[~m], torch.zeros_like(out[~m]))
    out.pow(2).sum().backward()
    assert torch.isfinite(xl.grad).all() and (xl.grad[~m] == 0).all()


def test_whiten_degenerate_masks():
    x = torch.randn(3, 7, dtype=F64)
    one = torch.zeros(3, 7, dtype=torch.bool)
    one[1, 4] = True
    assert torch.equal(whiten(plant(x, one), one), torch.zeros_like(x))
    shifted = whiten(plant(x, one), one, shift_mean=False)
    assert shifted[1, 4].item() == x[1, 4].item() and shifted.abs().sum() == abs(x[1, 4])
    none = torch.zeros(3, 7, dtype=torch.bool)
    assert torch.equal(whiten(plant(x, none), none), torch.zeros_like(x))


def ref_policy(lp, old, adv, m, clip):
    losses, clipped_count, sq, n = 0.0, 0, 0.0, 0
    for b, idx in enumerate(valid_indices(m)):
        for t in idx:
            d = lp[b, t].item() - old[b, t].item()
            ratio = math.exp(d)
            a = adv[b, t].item()
            l1, l2 = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            losses += max(l1, l2)
            clipped_count += l2 > l1
            sq += d * d
            n += 1
    n = max(n, 1)
    return losses / n, clipped_count / n, 0.5 * sq / n


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_ppo_policy_loss(shape, clip):
    m = holey_mask(*shape)
    old = logps(*shape)
    lp = old + torch.randn(*shape, dtype=F64) * 0.3  # ratios both inside and outside 1 ± ε
    adv = torch.randn(*shape, dtype=F64)
    lpl = leaf(plant(lp, m))
    loss, clipfrac, approxkl = ppo_policy_loss(lpl, plant(old, m), plant(adv, m), m, clip)
    want = ref_policy(lp, old, adv, m, clip)
    close(loss, torch.tensor(want[0], dtype=F64), 1e-10)
    close(clipfrac, torch.tensor(want[1], dtype=F64), 1e-12)
    close(approxkl, torch.tensor(want[2], dtype=F64), 1e-10)
    assert not clipfrac.requires_grad and not approxkl.requires_grad
    loss.backward()
    assert torch.isfinite(lpl.grad).all() and (lpl.grad[~m] == 0).all()


def test_ppo_policy_loss_at_the_clip_boundaries():
    """Gradient flows while the ratio is inside [1−ε, 1+ε] or on the pessimistic side, and
    is 0 once clipping is active (A > 0 and r > 1+ε, or A < 0 and r < 1−ε); on the
    boundary itself both terms agree."""
    clip = 0.2
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.5], dtype=F64)
    n = ratios.numel()
    old = torch.zeros(2, n, dtype=F64)
    adv = torch.tensor([[1.0] * n, [-1.0] * n], dtype=F64)
    m = torch.ones(2, n, dtype=torch.bool)
    lp = leaf(ratios.log().expand(2, n))
    loss, clipfrac, _ = ppo_policy_loss(lp, old, adv, m, clip)
    loss.backward()
    # d loss / d logp = −A·r / 2n where the unclipped term wins, 0 where the clip is active
    active = torch.stack([ratios > 1 + clip, ratios < 1 - clip])
    close(lp.grad, torch.where(active, 0.0, -adv * ratios / (2 * n)), 1e-12)
    assert clipfrac.item() == 4 / (2 * n)
    close(loss, torch.tensor(ref_policy(lp.detach(), old, adv, m, clip)[0], dtype=F64))
    edge = torch.tensor([[1 - clip, 1 + clip]], dtype=F64).log()
    for a in (1.0, -1.0):
        loss, _, _ = ppo_policy_loss(edge, torch.zeros_like(edge), torch.full_like(edge, a),
                                     torch.ones_like(edge, dtype=torch.bool), clip)
        close(loss, torch.tensor(-a, dtype=F64), 1e-12)  # mean of −A·(1−ε) and −A·(1+ε)


def ref_value(v, old, ret, m, clip):
    total, clipped_count, n = 0.0, 0, 0
    for b, idx in enumerate(valid_indices(m)):
        for t in idx:
            vc = min(max(v[b, t].item(), old[b, t].item() - clip), old[b, t].item() + clip)
            l1 = (v[b, t].item() - ret[b, t].item()) ** 2
            l2 = (vc - ret[b, t].item()) ** 2
            total += max(l1, l2)
            clipped_count += l2 > l1
            n += 1
    n = max(n, 1)
    return 0.5 * total / n, clipped_count / n


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.2, 1.0])
def test_ppo_value_loss(shape, clip):
    m = holey_mask(*shape)
    old = torch.randn(*shape, dtype=F64)
    v = old + torch.randn(*shape, dtype=F64) * 0.5
    ret = torch.randn(*shape, dtype=F64)
    vl = leaf(plant(v, m))
    loss, clipfrac = ppo_value_loss(vl, plant(old, m), plant(ret, m), m, clip)
    want = ref_value(v, old, ret, m, clip)
    close(loss, torch.tensor(want[0], dtype=F64), 1e-10)
    close(clipfrac, torch.tensor(want[1], dtype=F64), 1e-12)
    loss.backward()
    assert torch.isfinite(vl.grad).all() and (vl.grad[~m] == 0).all()


def test_ppo_value_loss_clip_boundary():
    """V beyond V_old ± ε on the far side of R: the clipped error is larger, so it counts
    and the gradient is 0; V moving toward R within ε keeps the plain gradient V − R."""
    old = torch.zeros(1, 3, dtype=F64)
    ret = torch.tensor([[1.0, 1.0, -1.0]], dtype=F64)
    v = leaf(torch.tensor([[0.1, 0.5, 0.5]], dtype=F64))
    loss, clipfrac = ppo_value_loss(v, old, ret, torch.ones(1, 3, dtype=torch.bool), 0.2)
    loss.backward()
    # [0]: inside; [1]: clipped to 0.2, (0.2−1)² > (0.5−1)² so the clipped term wins, grad 0;
    # [2]: clipped to 0.2, (0.2+1)² < (0.5+1)², the unclipped term wins.
    close(v.grad, torch.tensor([[(0.1 - 1) / 3, 0.0, (0.5 + 1) / 3]], dtype=F64))
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_ppo_losses_errors_and_dtypes():
    x, m = torch.randn(3, 7), torch.ones(3, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_policy_loss(x, x, x[:, :3], m)
    with pytest.raises(ValueError, match="mask has shape"):
        ppo_policy_loss(x, x, x, m[:2])
    with pytest.raises(ValueError, match="clip"):
        ppo_policy_loss(x, x, x, m, clip=0.0)
    with pytest.raises(ValueError, match="returns must be a floating-point"):
        ppo_value_loss(x, x, torch.ones(3, 7, dtype=torch.long), m)
    with pytest.raises(ValueError, match="mask must be a torch.Tensor"):
        ppo_value_loss(x, x, x, [1, 0])
    with pytest.raises(ValueError, match="x has shape|mask has shape"):
        masked_mean(x, m[:, :2])
    bf = x.to(torch.bfloat16)
    loss, clipfrac, approxkl = ppo_policy_loss(bf, bf, bf, m.float())
    assert loss.dtype == clipfrac.dtype == approxkl.dtype == torch.float32
