"""The pieces of one PPO iteration, each testable alone: which problems a step samples, each
sequence's seed, the sequences a rollout makes, their scores, the log-probs and values read back
from them, the advantages, the actor's and the critic's loss on a micro-batch, and the iteration's
metrics.

One layout from the rollout to the loss: a row is its prompt then its response, right padded, tokens
[B, L]. Per-token tensors are [B, L - 1] and aligned with the predictions: column t holds what
concerns token t + 1, which the model predicts at position t; `mask` marks the columns whose token
is a response token (an action).
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pbrl import ppo
from pbrl.data import Problem
from pbrl.model import Transformer, pad_rows
from pbrl.rewards import Sample
from pbrl.sampler import Completions


class Experience(NamedTuple):
    """What one iteration carries from the rollout to the update; row i*n + j is sample j of problem
    i."""
    tokens: torch.Tensor            # [B, L] long: prompt, then response, right padded with 0
    lengths: torch.Tensor           # [B] long: real tokens per row
    mask: torch.Tensor              # [B, L - 1] bool: token t + 1 is a response token
    # [B, L - 1] the sampler's (compared with old_logprobs as a metric)
    sampler_logprobs: torch.Tensor
    # [B, L - 1] the policy that sampled, by the trainer's own forward
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor      # [B, L - 1] the frozen reference policy
    values: torch.Tensor            # [B, L - 1] the critic's, before each token
    kl: torch.Tensor                # [B, L - 1] per-token KL estimate to the reference
    advantages: torch.Tensor        # [B, L - 1]
    returns: torch.Tensor           # [B, L - 1] the critic's regression targets

    def rows(self, index: torch.Tensor) -> Experience:
        return Experience(*(t[index] for t in self))


def problems_for_step(problems: list[Problem], step: int, per_step: int, seed: int, rank: int,
                      world: int) -> list[Problem]:
    """This rank's share of step `step`'s problems. Steps walk through the problems in a seeded
    permutation per pass, continuing into the next pass's: a pure function, no loader state to
    save."""
    if per_step % world:
        raise ValueError(f"{per_step} problems per step do not split over {world} ranks")
    n, start = len(problems), (step * per_step) % len(problems)
    order: list[int] = []
    epoch = (step * per_step) // n
    while len(order) < start + per_step:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order += torch.randperm(n, generator=generator).tolist()
        epoch += 1
    share = per_step // world
    return [problems[i] for i in order[start:start + per_step][rank * share:(rank + 1) * share]]


def sequence_seed(seed: int, step: int, problem: Problem, sample: int) -> int:
    """One sequence's sampling seed: the same whatever rank or batch position it lands on."""
    return zlib.crc32(f"{seed}/{step}/{problem.id + problem.lang}/{sample}".encode())


def sequences(prompts: list[list[int]], completions: Completions):
    """One prompt per completion row -> tokens [B, L], lengths [B], mask [B, L - 1] and the
    sampler's log-probs in the same layout [B, L - 1]."""
    responses = completions.as_lists()
    tokens, real = pad_rows([p + r for p, r in zip(prompts, responses)])
    starts = torch.tensor([len(p) for p in prompts])
    mask = (real & (torch.arange(tokens.shape[1]) >= starts[:, None]))[:, 1:]
    generated = torch.arange(completions.tokens.shape[1]) < completions.lengths[:, None]
    sampled = completions.logprobs[generated]
    return tokens, real.sum(1), mask, torch.zeros(mask.shape).masked_scatter(mask, sampled)


def score(reward_fn, problems: list[Problem], texts: list[str], references: dict[str, str],
          samples_per_prompt: int):
    """Each response against its problem's English reference (and gold answer, which only ExactMatch
    reads); texts[i * n + j] is sample j of problems[i]. Returns the samples and reward_fn's {name:
    [B]}."""
    repeated = [p for p in problems for _ in range(samples_per_prompt)]
    samples = [Sample(p.lang, text, references[p.id], p.answer) for p, text in zip(repeated, texts)]
    return samples, reward_fn(samples)


def per_token(model: Transformer, tokens, lengths, mask, output: str, temperature: float = 1.0):
    """The model over each row but its last token, as wide as the longest row: (log-probs,
    entropies) of the response tokens, or the values before them; [B, L - 1] each, 0 where not
    mask."""
    width = int(lengths.max()) - 1
    out = model(tokens[:, :width], output=output, labels=tokens[:, 1:width + 1],
                label_mask=mask[:, :width], temperature=temperature)
    pad = (0, mask.shape[1] - width)
    if output == "values":
        return F.pad(torch.where(mask[:, :width], out, 0.0), pad)
    return tuple(F.pad(x, pad) for x in out)


def advantages(cfg, scores, kl, values, mask, groups, kl_beta: float, reduce):
    """(advantages, returns) [B, L - 1] by the estimator cfg.advantage names. gae: the score on each
    response's last token and -kl_beta * KL on every token, GAE over the critic's values, optionally
    whitened over all ranks (reduce). grpo | rloo: the score minus kl_beta * the summed KL (as verl
    folds a per-token KL into the sequence reward) against the other samples of its group; no
    returns. With cfg.kl_in_loss the KL stays out of the reward (the actor's loss holds it)."""
    beta = 0.0 if cfg.kl_in_loss else kl_beta
    if cfg.advantage == "gae":
        token_rewards = ppo.per_token_rewards(scores, kl, mask, beta)
        advantage, returns = ppo.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantage = ppo.whiten(advantage, mask, reduce=reduce)
        return advantage, returns
    sequence = scores - beta * ppo.masked_sum(kl, mask, dim=1)
    advantage = ppo.grpo_advantages(sequence, groups, mask,
                                    cfg.group_std) if cfg.advantage == "grpo" \
        else ppo.rloo_advantages(sequence, groups, mask)
    return advantage, torch.zeros_like(advantage)


def actor_loss(actor, exp: Experience, num_tokens, cfg, temperature: float, kl_beta: float):
    """The clipped surrogate minus the entropy bonus (plus kl_beta * k3 KL to the reference with
    cfg.kl_in_loss) of one micro-batch, as its share of the global token mean; returns (loss, sums
    of its statistics)."""
    logp, entropy = per_token(actor, exp.tokens, exp.lengths, exp.mask, "logprobs", temperature)
    out = ppo.policy_loss(logp, exp.old_logprobs, exp.advantages, exp.mask, num_tokens, cfg.eps_low,
                          cfg.eps_high, cfg.dual_clip)
    entropy_sum, tokens = ppo.masked_sum(entropy, exp.mask), exp.mask.sum()
    stats = {"policy_loss": out.loss.detach(), "entropy": entropy_sum.detach(),
             "clipfrac": out.clipfrac * tokens, "approx_kl": out.approx_kl * tokens,
             "tokens": tokens}
    loss = out.loss - cfg.entropy_coef * entropy_sum / num_tokens
    if cfg.kl_in_loss:
        kl_sum = ppo.masked_sum(ppo.kl_estimate(logp, exp.ref_logprobs, "k3"), exp.mask)
        stats["kl_loss"] = kl_sum.detach()
        loss = loss + kl_beta * kl_sum / num_tokens
    return loss, stats


def critic_loss(critic, exp: Experience, num_tokens, cfg, temperature: float, kl_beta: float):
    """The clipped value loss of one micro-batch; returns (loss, sums of its statistics)."""
    values = per_token(critic, exp.tokens, exp.lengths, exp.mask, "values")
    out = ppo.value_loss(values, exp.values, exp.returns, exp.mask, num_tokens, cfg.value_clip)
    return out.loss, {"value_loss": out.loss.detach(),
                      "value_clipfrac": out.clipfrac * exp.mask.sum()}


def rollout_metrics(samples, rewards: dict[str, torch.Tensor], exp: Experience, reduce, gather,
                    critic: bool = True) -> dict:
    """Reward per component and language, response length, the critic's fit (when there is one) and
    the sampler/trainer log-prob mismatch, over all ranks: reduce sums tensors and gather collects
    objects (identities in one process)."""
    mask = exp.mask
    per_sample = [{"lang": s.lang, **{k: float(v[i]) for k, v in rewards.items()}}
                  for i, s in enumerate(samples)]
    everything = [x for part in gather(per_sample) for x in part]
    mismatch, tokens, sequence_tokens = reduce(torch.stack([
        ppo.masked_sum((exp.sampler_logprobs - exp.old_logprobs).abs(), mask), mask.sum().float(),
        exp.lengths.sum().float()])).tolist()
    metrics = {"logprob_mismatch": mismatch / max(tokens, 1.0), "response_tokens": tokens,
               "sequence_tokens": sequence_tokens, "response_length": tokens / len(everything)}
    if critic:
        metrics["explained_variance"] = float(ppo.explained_variance(exp.values, exp.returns, mask,
                                                                     reduce=reduce))
    for key in rewards:
        metrics[key] = sum(x[key] for x in everything) / len(everything)
    for lang in sorted({x["lang"] for x in everything}):
        mine = [x["reward"] for x in everything if x["lang"] == lang]
        metrics[f"reward/{lang}"] = sum(mine) / len(mine)
    return metrics
