"""PPO maths as small pure functions over [B, T] tensors with an explicit mask.

mask[b, t] is True where column t holds an action (a response token); every function ignores the
values elsewhere. Losses are normalised by totals of the *global* batch (`Counts`: its tokens and
responses over every micro-batch on every rank), so the micro-batch losses add up to the whole
batch's loss exactly, however the batch is split.

References: GAE, Schulman et al. 2016 (eq. 16); GRPO, Shao et al. 2024; RLOO, Ahmadian et al. 2024;
REINFORCE++, Hu et al. 2025; clipped surrogate, Schulman et al. 2017 (eq. 7); dual-clip, Ye et al.
2020; GSPO, Zheng et al. 2025; CISPO, MiniMax 2025; truncated and masked importance sampling against
the sampler, Yao et al. 2025 and ICEPOP; KL estimators k1/k2/k3, Schulman 2020 ("Approximating KL
divergence"); adaptive KL coefficient, Ziegler et al. 2019. Options are dicts of small functions
chosen by name: POLICY_LOSSES, AGGREGATIONS, CORRECTIONS.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch


class PolicyLoss(NamedTuple):
    loss: torch.Tensor       # scalar: this micro-batch's share of the global token mean
    clipfrac: torch.Tensor   # scalar: the fraction of its tokens whose ratio was clipped
    approx_kl: torch.Tensor  # scalar: token mean of k3(old -> new), a check on the update's size


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    # where, not a product: NaN or inf outside the mask must not leak
    x = torch.where(mask.bool(), x, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the masked positions; 0 when there are none."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce=_identity):
    """(mean, variance) of x over the masked positions, from [sum x, sum x^2, count]. `reduce`
    combines those sums first: with an all-reduce, every rank gets the whole batch's statistics."""
    m = mask.bool()
    sums = reduce(torch.stack([masked_sum(x, m), masked_sum(x * x, m), m.sum().to(x.dtype)]))
    mean = sums[0] / sums[2]
    var = sums[1] / sums[2] - mean ** 2
    return mean, var * sums[2] / (sums[2] - 1).clamp(min=1) if unbiased else var


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce=_identity):
    return masked_moments(x, mask, unbiased, reduce)[1]


def whiten(x, mask, eps: float = 1e-8, reduce=_identity) -> torch.Tensor:
    """(x - mean) / std over the masked positions (0 elsewhere)."""
    mean, var = masked_moments(x, mask, reduce=reduce)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation, a reverse scan over each row: rewards, values, mask [B, T]
    -> (advantages, returns) [B, T], 0 outside the mask. delta_t = r_t + gamma V_{t+1} - V_t and A_t
    = delta_t + gamma lam A_{t+1}, where t+1 is the next masked position (columns outside the mask
    are skipped, not steps) and V = A = 0 after the last one. returns = A + V, the critic's
    target."""
    mask = mask.bool()
    next_value = next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    return advantages, torch.where(mask, advantages + values, 0.0)


def _group_sums(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the size of its group and the sum of `values` over it; [B] each."""
    _, index = torch.unique(groups, return_inverse=True)
    size = torch.zeros(int(index.max()) + 1, dtype=values.dtype, device=values.device)
    size.index_add_(0, index, torch.ones_like(values))
    total = torch.zeros_like(size).index_add_(0, index, values)
    if bool((size < 2).any()):
        raise ValueError("every group needs at least 2 samples (rollout.samples_per_prompt >= 2): "
                         "a group of one has no baseline")
    return size[index], total[index]


def grpo_advantages(scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor,
                    scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantages: A_i = (r_i - mean_g) / (std_g + eps) over the samples of i's group
    g (unbiased std), on every token of the response. scale_by_std=False keeps r_i - mean_g (Dr.
    GRPO: dividing by the std favours groups whose scores barely differ). scores [B], groups [B]
    (the samples of one prompt share an id), mask [B, T] -> [B, T], 0 outside the mask."""
    size, total = _group_sums(scores, groups)
    advantage = scores - total / size
    if scale_by_std:
        squares = _group_sums(advantage ** 2, groups)[1]
        advantage = advantage / ((squares / (size - 1)).sqrt() + eps)
    return torch.where(mask.bool(), advantage[:, None], 0.0)


def rloo_advantages(scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean of the other samples of its group, a baseline that
    does not depend on r_i (unbiased). Shapes as grpo_advantages."""
    size, total = _group_sums(scores, groups)
    advantage = scores - (total - scores) / (size - 1)
    return torch.where(mask.bool(), advantage[:, None], 0.0)


# Per-token estimates of KL(pi || pi_ref) from log r = logp - ref_logp of tokens sampled from pi: k1
# is unbiased but can be negative; k3 is unbiased, never negative, low-variance; k2 biased,
# low-variance.
KL_ESTIMATORS = {"k1": lambda log_ratio: log_ratio,
                 "k2": lambda log_ratio: 0.5 * log_ratio ** 2,
                 "k3": lambda log_ratio: torch.expm1(-log_ratio) + log_ratio}


def kl_estimate(logprobs, ref_logprobs, kind: str = "k1") -> torch.Tensor:
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs)  # kind: config.validate checks it


def per_token_rewards(scores, kl, mask, beta: float) -> torch.Tensor:
    """scores [B], kl [B, T], mask [B, T] -> rewards [B, T]: -beta * kl on every response token,
    plus the score on the last. A row without response tokens gets nothing (no action to credit)."""
    mask = mask.bool()
    rewards = torch.where(mask, -beta * kl, 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)  # [B], -1 for an empty response
    rows = torch.arange(mask.shape[0], device=mask.device)[last >= 0]
    rewards[rows, last[last >= 0]] += scores[last >= 0].to(rewards.dtype)
    return rewards


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                            beta: float, groups: torch.Tensor | None = None,
                            reduce=_identity) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025): each token's return (the score at the end, -beta * KL on every
    token, no discount), whitened over the global batch (reduce: over all ranks). With groups (the
    baseline variant) each score first loses its group's mean. scores [B], kl and mask [B, T] ->
    [B, T], 0 outside the mask."""
    if groups is not None:
        size, total = _group_sums(scores, groups)
        scores = scores - total / size
    rewards = per_token_rewards(scores, kl, mask, beta)  # 0 outside the mask
    returns = rewards.flip(1).cumsum(1).flip(1)
    return whiten(returns, mask, reduce=reduce)


# Rollout correction: the sampler's log-probs and the trainer's (old) ones of the same tokens differ
# (bf16 decoding against the FSDP forward, other kernels). log r = old - sampler [B, T], 0 outside
# the mask -> (each token's weight in the loss, which tokens the correction truncated or masked).
def no_correction(log_ratio, mask, clip, low, high):
    return torch.ones_like(log_ratio), torch.zeros_like(mask)


def tis(log_ratio, mask, clip, low, high):
    """Truncated importance sampling (Yao et al. 2025): weight min(pi_old / pi_sampler, clip)."""
    return log_ratio.clamp(max=math.log(clip)).exp(), log_ratio > math.log(clip)


def seq_tis(log_ratio, mask, clip, low, high):
    """TIS with the sequence's ratio, exp(sum_t log r_t), on every token of the response."""
    return tis(masked_sum(log_ratio, mask, dim=1)[:, None].expand_as(log_ratio), mask, clip, low,
               high)


def mis(log_ratio, mask, clip, low, high):
    """Masked importance sampling (ICEPOP): a token whose ratio lies outside [low, high] drops out
    of the loss; the others count once."""
    outside = (log_ratio < math.log(low)) | (log_ratio > math.log(high))
    return (~outside).to(log_ratio.dtype), outside


def seq_mis(log_ratio, mask, clip, low, high):
    """MIS by the sequence's geometric-mean ratio, exp(mean_t log r_t): whole responses drop."""
    return mis(masked_mean(log_ratio, mask, dim=1)[:, None].expand_as(log_ratio), mask, clip, low,
               high)


CORRECTIONS = {"off": no_correction, "tis": tis, "seq_tis": seq_tis, "mis": mis,
               "seq_mis": seq_mis}


def correction_weights(kind: str, old_logprobs, sampler_logprobs, mask, clip: float = 2.0,
                       low: float = 0.5, high: float = 2.0):
    """Each token's weight in the policy loss under the correction `kind` (CORRECTIONS) [B, T], 0
    outside the mask; and which tokens it truncated or masked [B, T] bool."""
    mask = mask.bool()
    weights, changed = CORRECTIONS[kind](torch.where(mask, old_logprobs - sampler_logprobs, 0.0),
                                         mask, clip, low, high)
    return torch.where(mask, weights, 0.0), changed & mask


class Counts(NamedTuple):
    """What a loss is normalised by: totals over the global batch (every micro-batch on every
    rank), so the micro-batch losses add up to the whole batch's loss however it is split."""
    tokens: torch.Tensor | float      # tokens that take part in the loss
    sequences: torch.Tensor | float   # rows with at least one such token
    max_new_tokens: int = 1           # seq_mean_token_sum_norm's constant


def count(weights: torch.Tensor, max_new_tokens: int = 1, reduce=_identity) -> Counts:
    """The Counts of a batch whose token weights (or mask) are `weights` [B, T]; reduce sums them
    over ranks."""
    keep = weights > 0
    tokens, sequences = reduce(torch.stack([keep.sum(), keep.any(1).sum()]).float())
    return Counts(tokens, sequences, max_new_tokens)


# Loss aggregation: [B, T] per-token losses, their weights (0: not in the loss) -> the scalar share
# of this micro-batch in the global batch's loss.
def token_mean(x: torch.Tensor, weights: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Every token of the global batch counts alike (PPO's, DAPO's): long responses weigh more."""
    return masked_sum(x * weights, weights > 0) / counts.tokens


def seq_mean_token_mean(x: torch.Tensor, weights: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Each response's token mean, then the mean over responses (GRPO's paper, GSPO)."""
    keep = weights > 0
    per_row = masked_sum(x * weights, keep, dim=1) / keep.sum(1).clamp(min=1)
    return per_row.sum() / counts.sequences


def seq_mean_token_sum_norm(x: torch.Tensor, weights: torch.Tensor,
                            counts: Counts) -> torch.Tensor:
    """Each response's token sum over one constant, max_new_tokens, then the mean over responses
    (Dr. GRPO): no length bias either way."""
    return masked_sum(x * weights, weights > 0) / (counts.max_new_tokens * counts.sequences)


AGGREGATIONS = {"token_mean": token_mean, "seq_mean_token_mean": seq_mean_token_mean,
                "seq_mean_token_sum_norm": seq_mean_token_sum_norm}


# Policy losses: log r = logp - old_logp [B, T] (0 outside the mask), advantages [B, T] ->
# (per-token losses, which tokens were clipped) [B, T] each.
def clipped_surrogate(log_ratio, advantages, mask, eps_low, eps_high, dual_clip=None):
    """PPO (Schulman et al. 2017): max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)). dual_clip c
    > 1 also bounds a negative-advantage token's loss by -A c (Ye et al. 2020)."""
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss, clipped > unclipped


def gspo(log_ratio, advantages, mask, eps_low, eps_high, dual_clip=None):
    """GSPO (Zheng et al. 2025): PPO's clip on the sequence's ratio s = exp(mean_t log r_t), the
    same value on every token of the response. Each token carries s with the gradient of its own
    log-prob (GSPO-token), so under seq_mean_token_mean the gradient is GSPO's, A grad s."""
    sequence = masked_mean(log_ratio, mask, dim=1)[:, None].detach()
    return clipped_surrogate(log_ratio - log_ratio.detach() + sequence, advantages, mask,
                             eps_low, eps_high)


def cispo(log_ratio, advantages, mask, eps_low, eps_high, dual_clip=None):
    """CISPO (MiniMax 2025): -stopgrad(clip(r, 1 - eps_low, 1 + eps_high)) A log pi. A clipped
    token keeps its gradient, scaled by the clipped ratio. The loss's value is -clip(r) A."""
    ratio = log_ratio.exp()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    # exp(x - x.detach()) is 1 with the gradient of x (of log pi): the gradient is -weight A grad
    # log pi
    return -advantages * weight * torch.exp(log_ratio - log_ratio.detach()), weight != ratio


POLICY_LOSSES = {"ppo": clipped_surrogate, "gspo": gspo, "cispo": cispo}


def policy_loss(logprobs, old_logprobs, advantages, weights, counts: Counts | None = None,
                eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
                kind: str = "ppo", agg: str = "token_mean") -> PolicyLoss:
    """The policy loss `kind` (POLICY_LOSSES) of each token, aggregated by `agg` (AGGREGATIONS).
    weights [B, T]: how much each token counts (a bool mask: 1 or 0; rollout correction and
    overlong filtering make others). counts: the global batch's (default: this batch's). dual_clip
    is for the ppo loss only (config.validate checks it)."""
    mask = weights > 0
    # Zeros outside the mask first: a NaN there would reach the gradient through 0 * NaN.
    advantages = torch.where(mask, advantages, 0.0)
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    loss, clipped = POLICY_LOSSES[kind](log_ratio, advantages, mask, eps_low, eps_high, dual_clip)
    with torch.no_grad():
        clipfrac = masked_mean(clipped.float(), mask)
        approx_kl = masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask)
    return PolicyLoss(AGGREGATIONS[agg](loss, weights, counts or count(weights)), clipfrac,
                      approx_kl)


def value_loss(values, old_values, returns, mask, num_tokens=None, clip: float | None = 0.2):
    """0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), token mean over the global
    batch."""
    mask = mask.bool()
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    values, old_values, returns = (torch.where(mask, x, 0.0) for x in (values, old_values, returns))
    loss = (values - returns) ** 2
    clipped = loss if clip is None else \
        (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    with torch.no_grad():
        clipfrac = masked_mean((clipped > loss).float(), mask)
    return ValueLoss(0.5 * masked_sum(torch.maximum(loss, clipped), mask) / num_tokens, clipfrac)


def explained_variance(values, returns, mask, reduce=_identity) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked positions: 1 is a perfect critic, 0 no better than a
    constant (and 0 when the returns do not vary)."""
    var_returns = masked_moments(returns, mask, reduce=reduce)[1]
    var_error = masked_moments(returns - values, mask, reduce=reduce)[1]
    return torch.where(var_returns > 1e-8, 1 - var_error / var_returns.clamp(min=1e-8), 0.0)


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Iteration `step`'s learning-rate multiplier: linear warmup over warmup_steps, then constant,
    or cosine down to 10% at total_steps. A pure function of the step: nothing to checkpoint."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) after each batch of n
    sequences: pulls the measured KL toward target. target None keeps beta fixed."""

    def __init__(self, init_beta: float, target: float | None = None, horizon: int = 10_000):
        if init_beta < 0 or (target is not None and target <= 0) or horizon <= 0:
            raise ValueError(f"need init_beta >= 0, target > 0, horizon > 0; got {init_beta}, "
                             f"{target}, {horizon}")
        self.beta, self.target, self.horizon = init_beta, target, horizon

    def update(self, kl: float, n_sequences: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n_sequences / self.horizon
        return self.beta


# --------------------------------------------------------------------------------------------------
# The advantage estimators (ppo.advantage)
# --------------------------------------------------------------------------------------------------
class Estimator(NamedTuple):
    """An advantage estimator (advantage) and what the rest of a run must know of it."""
    fn: Callable        # (cfg, scores [B], kl, values, mask, groups [B], beta, reduce) -> (A, R)
    critic: bool        # it reads a critic's values: prepare builds one, the planner counts it
    grouped: bool       # it compares the samples of a prompt: rollout.samples_per_prompt >= 2


# advantage's choices, each registered by @estimator; advantages and returns are [B, L - 1].
# beta weighs the KL in the reward (0 with kl_in_loss: the actor's loss holds it); reduce sums
# over ranks. The critic-free ones return no returns (zeros).
ADVANTAGES: dict[str, Estimator] = {}


def estimator(name: str, critic: bool = False, grouped: bool = False):
    def register(fn):
        ADVANTAGES[name] = Estimator(fn, critic, grouped)
        return fn
    return register


@estimator("gae", critic=True)
def gae_estimator(cfg, scores, kl, values, mask, groups, beta, reduce):
    """The score on each response's last token and -beta * KL on every token, GAE over the
    critic's values, optionally whitened over all ranks."""
    token_rewards = per_token_rewards(scores, kl, mask, beta)
    advantage, returns = gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantage = whiten(advantage, mask, reduce=reduce)
    return advantage, returns


def sequence_scores(scores, kl, mask, beta):
    """The score minus beta * the summed KL (as verl folds a per-token KL into the sequence
    reward) [B]."""
    return scores - beta * masked_sum(kl, mask, dim=1)


@estimator("grpo", grouped=True)
def grpo_estimator(cfg, scores, kl, values, mask, groups, beta, reduce):
    """Each response's sequence score against its group's mean (over its std with
    group_std)."""
    advantage = grpo_advantages(sequence_scores(scores, kl, mask, beta), groups, mask,
                                    cfg.group_std)
    return advantage, torch.zeros_like(advantage)


@estimator("rloo", grouped=True)
def rloo_estimator(cfg, scores, kl, values, mask, groups, beta, reduce):
    """Each response's sequence score against the mean of its group's other samples."""
    advantage = rloo_advantages(sequence_scores(scores, kl, mask, beta), groups, mask)
    return advantage, torch.zeros_like(advantage)


@estimator("reinforce_pp")
def reinforce_pp_estimator(cfg, scores, kl, values, mask, groups, beta, reduce):
    """REINFORCE++: returns whitened over the global batch."""
    advantage = reinforce_pp_advantages(scores, kl, mask, beta, None, reduce)
    return advantage, torch.zeros_like(advantage)


@estimator("reinforce_pp_baseline", grouped=True)
def reinforce_pp_baseline_estimator(cfg, scores, kl, values, mask, groups, beta, reduce):
    """REINFORCE++ with each score minus its group's mean first."""
    advantage = reinforce_pp_advantages(scores, kl, mask, beta, groups, reduce)
    return advantage, torch.zeros_like(advantage)


def advantages(cfg, scores, kl, values, mask, groups, kl_beta: float, reduce):
    """(advantages, returns) [B, L - 1] by the estimator cfg.advantage names (ADVANTAGES)."""
    beta = 0.0 if cfg.kl_in_loss else kl_beta
    return ADVANTAGES[cfg.advantage].fn(cfg, scores, kl, values, mask, groups, beta, reduce)
