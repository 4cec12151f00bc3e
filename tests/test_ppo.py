"""PPO maths against hand derivations and plain Python loops."""
import math

import pytest
import torch

from pbrl import ppo


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion on each row's list of unmasked steps, in plain Python."""
    adv = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        steps = [t for t in range(len(rewards[b])) if mask[b][t]]
        next_value = next_adv = 0.0
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b][t]
            adv[b][t] = next_adv
    return adv


def test_gae_hand_case():
    """values = rewards = [0, 0, 0, 1]: deltas r_t + g V_{t+1} - V_t = [0, 0, g, 0], so A = [g^3
    l^2, g^2 l, g, 0] and returns = A + V = [g^3 l^2, g^2 l, g, 1]."""
    g, lam = 0.9, 0.95
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    adv, ret = ppo.gae(x, x, torch.ones_like(x), g, lam)
    expected = torch.tensor([[g ** 3 * lam ** 2, g ** 2 * lam, g, 1.0]])
    assert torch.allclose(ret, expected) and torch.allclose(adv, expected - x)


def test_gae_single_reward_undiscounted():
    """gamma = lam = 1, V = 0: every advantage is the total future reward."""
    r = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = ppo.gae(r, torch.zeros_like(r), mask, 1.0, 1.0)
    assert adv.tolist() == [[2.0, 2.0, 2.0, 0.0]] and torch.equal(adv, ret)


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_plain_loop_on_random_masked_batches(seed):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 13
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3  # arbitrary holes, not only right padding
    mask[0] = False  # an empty response
    adv, ret = ppo.gae(rewards, values, mask, 0.97, 0.9)
    expected = torch.tensor(gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), 0.97, 0.9))
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, torch.where(mask, expected + values, 0.0), atol=1e-5)


def test_gae_ignores_values_and_rewards_at_masked_positions():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.4
    adv, ret = ppo.gae(rewards, values, mask, 0.9, 0.8)
    junk = torch.where(mask, 0.0, torch.randn(4, 9, generator=g) * 1e6)
    adv2, ret2 = ppo.gae(rewards + junk, values + junk, mask, 0.9, 0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    adv3, _ = ppo.gae(rewards.masked_fill(~mask, float("nan")),
                      values.masked_fill(~mask, float("inf")), mask, 0.9, 0.8)
    assert torch.equal(adv, adv3)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ppo.masked_mean(x, mask) == 2.5
    assert torch.isclose(ppo.masked_var(x, mask), values.var())
    assert torch.isclose(ppo.masked_var(x, mask, unbiased=False), values.var(unbiased=False))
    w = ppo.whiten(x, mask)
    assert torch.isclose(ppo.masked_mean(w, mask), torch.tensor(0.0), atol=1e-6)
    assert torch.isclose(ppo.masked_var(w, mask), torch.tensor(1.0), atol=1e-5)
    assert w[0, 2] == 0 and w[1, 1] == 0
    assert ppo.masked_mean(x, torch.zeros_like(mask)) == 0


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(ppo.kl_estimate(logp, logp, "k1"), torch.zeros(3))
    assert torch.equal(ppo.kl_estimate(logp, logp, "k3"), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    lr = logp - ref  # [0.5, -1.0, 0]
    assert torch.allclose(ppo.kl_estimate(logp, ref, "k1"), lr)
    assert torch.allclose(ppo.kl_estimate(logp, ref, "k2"), 0.5 * lr ** 2)
    # k3 = (1/r - 1) + log r: at log r = 0.5, e^-0.5 - 1 + 0.5
    assert torch.allclose(ppo.kl_estimate(logp, ref, "k3"),
                          torch.tensor([math.exp(-0.5) - 0.5, math.e - 2, 0.0]))
    assert (ppo.kl_estimate(torch.randn(1000), torch.randn(1000), "k3") >= 0).all()
    with pytest.raises(KeyError, match="k4"):  # a run's is checked with its config
        ppo.kl_estimate(logp, ref, "k4")


def test_k3_is_an_unbiased_kl_estimate():
    """E_{x~p}[k3] = KL(p || q) for two categorical distributions, checked against the exact sum."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()
    k3 = ppo.kl_estimate(p.log(), q.log(), "k3")
    assert torch.isclose((p * k3).sum(), exact)


def test_per_token_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    r = ppo.per_token_rewards(torch.tensor([1.0, -1.0, 5.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 1.0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(r, expected)


def test_policy_loss_hand_cases():
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    # ratio e with A = 1: the objective is clipped at 1 + eps -> loss -(1 + eps), and the gradient
    # is 0.
    logp = torch.ones(1, 1, requires_grad=True)
    out = ppo.policy_loss(logp, old, torch.ones(1, 1), mask, eps_low=0.2, eps_high=0.28)
    assert torch.isclose(out.loss, torch.tensor(-1.28)) and out.clipfrac == 1
    out.loss.backward()
    assert logp.grad.item() == 0
    # A = -1, ratio e^-1: clipped at 1 - eps_low -> loss = 0.8 (max(-A r, -A clip(r)) = max(0.37,
    # 0.8)).
    out = ppo.policy_loss(torch.full((1, 1), -1.0), old, -torch.ones(1, 1), mask, eps_low=0.2,
                          eps_high=0.28)
    assert torch.isclose(out.loss, torch.tensor(0.8))
    # A = -1, ratio e^2 = 7.39: unclipped loss 7.39; dual clip 3 bounds it at 3.
    big = torch.full((1, 1), 2.0)
    assert torch.isclose(ppo.policy_loss(big, old, -torch.ones(1, 1), mask).loss,
                         torch.tensor(math.e ** 2))
    assert torch.isclose(ppo.policy_loss(big, old, -torch.ones(1, 1), mask, dual_clip=3.0).loss,
                         torch.tensor(3.0))
    # Inside the trust region the loss is -A r and its gradient -A r.
    logp = torch.full((1, 1), 0.1, requires_grad=True)
    out = ppo.policy_loss(logp, old, torch.full((1, 1), 2.0), mask)
    out.loss.backward()
    assert torch.isclose(out.loss, torch.tensor(-2 * math.exp(0.1))) and out.clipfrac == 0
    assert torch.isclose(logp.grad, torch.tensor(-2 * math.exp(0.1)))


@pytest.mark.parametrize("agg", list(ppo.AGGREGATIONS))
@pytest.mark.parametrize("kind", list(ppo.POLICY_LOSSES))
def test_losses_are_split_invariant_and_ignore_masked_garbage(kind, agg):
    """Summing micro-batch losses normalised by the global batch's counts gives the full-batch loss
    and gradient, for every policy loss and aggregation, with token weights (a correction's) too."""
    g = torch.Generator().manual_seed(0)
    b, t = 8, 10
    logp = (torch.randn(b, t, generator=g) * 0.1).requires_grad_()
    old, adv = torch.randn(b, t, generator=g) * 0.1, torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]  # very different lengths per row
    mask[3] = False  # a row with no token in the loss (a filtered response)
    weights = torch.where(mask, torch.rand(b, t, generator=g) + 0.5, 0.0)
    adv = adv.masked_fill(~mask, float("nan"))
    full = ppo.policy_loss(logp, old, adv, weights, ppo.count(weights, t), kind=kind, agg=agg).loss
    grad_full, = torch.autograd.grad(full, logp)
    total = ppo.count(weights, t)
    parts = sum(ppo.policy_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], weights[i:i + 3],
                                total, kind=kind, agg=agg).loss for i in range(0, b, 3))
    grad_parts, = torch.autograd.grad(parts, logp)
    assert torch.isclose(full, parts) and torch.allclose(grad_full, grad_parts)
    assert torch.isfinite(grad_full).all() and (grad_full[~mask] == 0).all()
    assert (grad_full[mask] != 0).any()
    total = mask.sum()
    values = torch.randn(b, t, generator=g, requires_grad=True)
    ret, old_v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    v_full = ppo.value_loss(values, old_v, ret, mask).loss
    v_parts = sum(ppo.value_loss(values[i:i + 3], old_v[i:i + 3], ret[i:i + 3], mask[i:i + 3],
                                 num_tokens=total).loss for i in range(0, b, 3))
    assert torch.isclose(v_full, v_parts)


def test_value_loss_hand_case():
    mask = torch.ones(1, 2)
    values = torch.tensor([[1.0, 0.05]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    # token 0: unclipped (1-0)^2 = 1, clipped V = 0.2 -> 0.04; max 1. token 1: unclipped 0.9025,
    # clipped same.
    out = ppo.value_loss(values, old, returns, mask, clip=0.2)
    assert torch.isclose(out.loss, torch.tensor(0.5 * (1 + 0.9025) / 2))
    assert torch.isclose(ppo.value_loss(values, old, returns, mask, clip=None).loss,
                         torch.tensor(0.5 * 1.9025 / 2))


def test_explained_variance():
    mask = torch.ones(1, 4)
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert ppo.explained_variance(returns, returns, mask) == 1
    assert torch.isclose(ppo.explained_variance(torch.full_like(returns, 2.5), returns, mask),
                         torch.tensor(0.0))


def test_adaptive_kl_controller():
    c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    # error clipped at +0.2
    assert math.isclose(c.update(kl=12.0, n_sequences=10), 0.1 * (1 + 0.2 * 0.1))
    assert math.isclose(c.update(kl=5.4, n_sequences=10), 0.1 * 1.02 * (1 - 0.1 * 0.1))
    fixed = ppo.AdaptiveKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05
    with pytest.raises(ValueError, match="need init_beta >= 0"):
        ppo.AdaptiveKLController(-1.0)


def test_whitening_and_explained_variance_across_ranks_equal_one_process():
    """Two 'ranks' hold half the rows each; reduce= adds the other rank's sums, as an all-reduce
    would."""
    g = torch.Generator().manual_seed(3)
    x, values = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    halves = (slice(0, 3), slice(3, 6))

    def sums_of(rows, fn):
        captured = []
        fn(rows, lambda t: captured.append(t) or t)
        return captured

    for fn in (lambda rows, reduce: ppo.whiten(x[rows], mask[rows], reduce=reduce),
               lambda rows, reduce: ppo.explained_variance(values[rows], x[rows], mask[rows],
                                                           reduce=reduce)):
        whole = fn(slice(None), ppo._identity)
        for mine, other in (halves, halves[::-1]):
            theirs = iter(sums_of(other, fn))
            got = fn(mine, lambda t: t + next(theirs))
            expected = whole[mine] if whole.dim() else whole
            assert torch.allclose(got, expected, atol=1e-6)


MASK2 = torch.tensor([[True, True, False], [True, False, False], [True, True, True],
                      [True, True, False]])


def test_grpo_hand_derived():
    """One group of 4 scores [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3), so
    the advantages are +-0.5 * sqrt(3); without the std division (Dr. GRPO) +-0.5."""
    scores, groups = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long)
    adv = ppo.grpo_advantages(scores, groups, MASK2, eps=0.0)
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 * 3 ** 0.5
    assert torch.allclose(adv, torch.where(MASK2, expected[:, None], 0.0))
    assert torch.allclose(ppo.grpo_advantages(scores, groups, MASK2, scale_by_std=False),
                          torch.where(MASK2, torch.tensor([0.5, -0.5, -0.5, 0.5])[:, None], 0.0))


def test_rloo_baseline_leaves_the_sample_out():
    """Groups [3, 1, 2] and [4]: for 3 the baseline is mean(1, 2) = 1.5, for 1 it is 2.5, for 2 it
    is 2."""
    scores, groups = torch.tensor([3.0, 1.0, 5.0, 2.0, 7.0]), torch.tensor([0, 0, 9, 0, 9])
    mask = torch.ones(5, 2, dtype=torch.bool)
    adv = ppo.rloo_advantages(scores, groups, mask)
    assert torch.allclose(adv[:, 0], torch.tensor([1.5, -1.5, -2.0, 0.0, 2.0]))
    assert torch.equal(adv[:, 0], adv[:, 1])  # the same advantage on every token


@pytest.mark.parametrize("fn", [ppo.rloo_advantages, ppo.grpo_advantages])
def test_group_estimators_equal_scores_zero_and_groups_of_one(fn):
    mask = torch.ones(4, 3, dtype=torch.bool)
    assert fn(torch.full((4,), 0.7), torch.tensor([0, 0, 1, 1]), mask).abs().max() == 0
    with pytest.raises(ValueError, match="every group needs at least 2 samples"):
        fn(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), mask[:3])


@pytest.mark.parametrize("fn", [ppo.rloo_advantages, ppo.grpo_advantages])
def test_group_estimators_on_two_ranks_equal_one_process(fn):
    """A prompt's samples stay on one rank, so each rank's advantages are the whole batch's rows."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(12, generator=g)
    groups = torch.arange(4).repeat_interleave(3)
    mask = torch.rand(12, 5, generator=g) > 0.2
    whole = fn(scores, groups, mask)
    halves = [fn(scores[rows], groups[rows], mask[rows]) for rows in (slice(0, 6), slice(6, 12))]
    assert torch.equal(torch.cat(halves), whole)
