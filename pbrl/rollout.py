"""The pieces of one PPO iteration, each testable alone: which problems a step samples, how each sequence's sampling
noise is seeded, how prompts and completions pack into sequences, how responses are scored, the forward passes that
read log-probs and values back at the response positions, the loss of one micro-batch for the actor and for the
critic, the advantages of each estimator, and the iteration's metrics.

A sequence is its prompt, left padded, then its response, right padded: input_ids [B, P + T]. Tensors over
responses are [B, T], aligned with the response tokens; the prediction of response token t is made at position
P + t - 1.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple

import torch

from pbrl import ppo
from pbrl.data import Problem
from pbrl.model import Transformer, pad_rows
from pbrl.rewards import Sample
from pbrl.sampler import Completions


class Experience(NamedTuple):
    """Everything one iteration carries from sampling to the update; row i*n + j is sample j of problem i."""
    input_ids: torch.Tensor         # [B, P + T] long: prompt (left padded), then response (right padded)
    attention_mask: torch.Tensor    # [B, P + T] bool, real tokens
    response_mask: torch.Tensor     # [B, T] bool, real response tokens (the actions)
    sampler_logprobs: torch.Tensor  # [B, T] the sampler's log-probs (compared with old_logprobs as a metric)
    old_logprobs: torch.Tensor      # [B, T] behaviour policy, recomputed by the trainer's own forward pass
    ref_logprobs: torch.Tensor      # [B, T] frozen reference policy
    values: torch.Tensor            # [B, T] critic at sampling time
    kl: torch.Tensor                # [B, T] per-token KL estimate to the reference
    advantages: torch.Tensor        # [B, T]
    returns: torch.Tensor           # [B, T] the critic's regression targets

    def rows(self, index: torch.Tensor) -> "Experience":
        return Experience(*(t[index] for t in self))


def problems_for_step(problems: list[Problem], step: int, per_step: int, seed: int, rank: int,
                      world: int) -> list[Problem]:
    """This rank's slice of step `step`'s problems. Steps walk through the problems in a seeded permutation per
    pass (epoch), continuing into the next pass's permutation at the end of one; a pure function of its arguments,
    so there is no data-loader state to checkpoint."""
    if per_step % world:
        raise ValueError(f"{per_step} problems per step do not split over {world} ranks")
    n = len(problems)
    order: list[int] = []
    epoch = (step * per_step) // n
    while len(order) < (step * per_step) % n + per_step:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order += torch.randperm(n, generator=g).tolist()
        epoch += 1
    start = (step * per_step) % n
    chosen = [problems[i] for i in order[start:start + per_step]]
    share = per_step // world
    return chosen[rank * share:(rank + 1) * share]


def sequence_seed(seed: int, step: int, problem: Problem, sample: int) -> int:
    """The seed of one sequence's sampling noise: the same whatever rank or batch position it lands on."""
    return zlib.crc32(f"{seed}/{step}/{problem.id + problem.lang}/{sample}".encode())


def pack(prompts: list[list[int]], completions: Completions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt per completion row -> input_ids, attention_mask [B, P + T] and response_mask [B, T]."""
    prompt_ids, prompt_mask = pad_rows(prompts, side="left")
    t = completions.tokens.shape[1]
    response_mask = torch.arange(t)[None, :] < completions.lengths[:, None]
    response_ids = torch.where(response_mask, completions.tokens, 0)
    return (torch.cat([prompt_ids, response_ids], dim=1), torch.cat([prompt_mask, response_mask], dim=1),
            response_mask)


def score(reward_fn, problems: list[Problem], texts: list[str], references: dict[str, str],
          samples_per_prompt: int) -> tuple[list[Sample], dict[str, torch.Tensor]]:
    """Each response against its problem's English reference (and gold answer, which only ExactMatch reads);
    texts[i * n + j] is sample j of problems[i]. Returns the samples and reward_fn's {name: [B]} components."""
    samples = [Sample(p.lang, text, references[p.id], p.answer)
               for p, text in zip([p for p in problems for _ in range(samples_per_prompt)], texts)]
    return samples, reward_fn(samples)


def advantages(cfg, scores: torch.Tensor, kl: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               groups: torch.Tensor, kl_beta: float, reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by the estimator a PPOConfig names. gae: the score on each response's last token
    and -kl_beta * KL on every token, GAE over the critic's values, optionally whitened over all ranks (reduce).
    grpo / rloo: the score minus kl_beta * the response's summed KL (as verl folds a per-token KL into the sequence
    reward) against the other samples of its group; no returns (there is no critic). With cfg.kl_in_loss the KL
    stays out of the reward (the actor's loss holds it)."""
    beta = 0.0 if cfg.kl_in_loss else kl_beta
    if cfg.advantage == "gae":
        token_rewards = ppo.per_token_rewards(scores, kl, mask, beta)
        advantage, returns = ppo.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
        return (ppo.whiten(advantage, mask, reduce=reduce) if cfg.whiten_advantages else advantage), returns
    sequence = scores - beta * ppo.masked_sum(kl, mask, dim=1)
    advantage = ppo.grpo_advantages(sequence, groups, mask, cfg.group_std) if cfg.advantage == "grpo" \
        else ppo.rloo_advantages(sequence, groups, mask)
    return advantage, torch.zeros_like(advantage)


def _packed(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """Each row's prompt and response moved to the start of the row (right padding only: causal attention is then
    exact without a mask, so the fused attention kernels run), trimmed to the longest row; then the inputs without
    their last token, their labels (the next tokens), and where those are response tokens. Returns (inputs,
    attention, labels, label_mask, at): at [B, U] indexes each row's outputs at its U response positions (U = the
    longest response), for `_responses`."""
    b, p = input_ids.shape[0], input_ids.shape[1] - response_mask.shape[1]
    prompt_len, response_len = attention_mask[:, :p].sum(1), response_mask.sum(1)
    lengths = prompt_len + response_len
    width = int(lengths.max())
    slots = torch.arange(width, device=input_ids.device)[None]
    cols = (slots + p - prompt_len[:, None]).clamp(max=input_ids.shape[1] - 1)  # [B, width] source columns
    real = slots < lengths[:, None]
    ids = torch.where(real, input_ids.gather(1, cols), 0)
    is_response = torch.cat([torch.zeros(b, p, dtype=torch.bool, device=input_ids.device), response_mask], 1)
    label_mask = (is_response.gather(1, cols) & real)[:, 1:]
    used = max(int(response_len.max()), 1)
    at = (prompt_len[:, None] - 1 + torch.arange(used, device=input_ids.device)).clamp(max=max(width - 2, 0))
    return ids[:, :-1], real[:, :-1], ids[:, 1:], label_mask, at


def _responses(x: torch.Tensor, at: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-position outputs x [B, width - 1] -> [B, T] at the response positions, 0 after each response."""
    x = torch.where(response_mask[:, :at.shape[1]], x.gather(1, at), 0.0)
    return torch.nn.functional.pad(x, (0, response_mask.shape[1] - x.shape[1]))


def response_logprobs(model: Transformer, input_ids, attention_mask, response_mask,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token) and the policy's entropy at each response position, [B, T] each (0 after a
    response), under softmax(logits / temperature) (the sampling distribution), through the fused log-prob kernel."""
    inputs, attention, labels, label_mask, at = _packed(input_ids, attention_mask, response_mask)
    logp, entropy = model(inputs, attention_mask=attention, output="logprobs", labels=labels, label_mask=label_mask,
                          temperature=temperature)
    return _responses(logp, at, response_mask), _responses(entropy, at, response_mask)


def response_values(model: Transformer, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """The critic's value before each response token, [B, T] (0 after a response)."""
    inputs, attention, _, _, at = _packed(input_ids, attention_mask, response_mask)
    return _responses(model(inputs, attention_mask=attention, output="values"), at, response_mask)


def actor_loss(actor, exp: Experience, num_tokens, cfg, temperature: float, kl_beta: float):
    """The clipped surrogate (minus the entropy bonus, plus kl_beta * k3 KL to the reference when cfg.kl_in_loss)
    of one micro-batch, as its share of the global token mean; returns (loss, sums of its statistics)."""
    mask = exp.response_mask
    logp, entropy = response_logprobs(actor, exp.input_ids, exp.attention_mask, mask, temperature)
    out = ppo.policy_loss(logp, exp.old_logprobs, exp.advantages, mask, num_tokens, cfg.eps_low, cfg.eps_high,
                          cfg.dual_clip)
    entropy_sum = ppo.masked_sum(entropy, mask)
    tokens = mask.sum()
    stats = {"policy_loss": out.loss.detach(), "entropy": entropy_sum.detach(), "clipfrac": out.clipfrac * tokens,
             "approx_kl": out.approx_kl * tokens, "tokens": tokens}
    loss = out.loss - cfg.entropy_coef * entropy_sum / num_tokens
    if cfg.kl_in_loss:
        kl_sum = ppo.masked_sum(ppo.kl_estimate(logp, exp.ref_logprobs, "k3"), mask)
        stats["kl_loss"] = kl_sum.detach()
        loss = loss + kl_beta * kl_sum / num_tokens
    return loss, stats


def critic_loss(critic, exp: Experience, num_tokens, cfg, temperature: float, kl_beta: float):
    """The clipped value loss of one micro-batch; returns (loss, sums of its statistics)."""
    values = response_values(critic, exp.input_ids, exp.attention_mask, exp.response_mask)
    out = ppo.value_loss(values, exp.values, exp.returns, exp.response_mask, num_tokens, cfg.value_clip)
    return out.loss, {"value_loss": out.loss.detach(), "value_clipfrac": out.clipfrac * exp.response_mask.sum()}


def rollout_metrics(samples, rewards: dict[str, torch.Tensor], exp: Experience, reduce, gather,
                    critic: bool = True) -> dict:
    """Reward per component and language, response length, the critic's fit (when there is one) and the
    sampler/trainer log-prob mismatch, over all ranks: reduce sums tensors and gather collects objects across ranks
    (identities in one process)."""
    mask = exp.response_mask
    per_sample = [{"lang": s.lang, **{k: float(v[i]) for k, v in rewards.items()}} for i, s in enumerate(samples)]
    everything = [x for part in gather(per_sample) for x in part]
    mismatch, tokens, sequence_tokens = reduce(torch.stack([
        ppo.masked_sum((exp.sampler_logprobs - exp.old_logprobs).abs(), mask), mask.sum().float(),
        exp.attention_mask.sum().float()])).tolist()
    metrics = {"logprob_mismatch": mismatch / max(tokens, 1.0), "response_tokens": tokens,
               "sequence_tokens": sequence_tokens, "response_length": tokens / len(everything)}
    if critic:
        metrics["explained_variance"] = float(ppo.explained_variance(exp.values, exp.returns, mask, reduce=reduce))
    for key in rewards:
        metrics[key] = sum(x[key] for x in everything) / len(everything)
    for lang in sorted({x["lang"] for x in everything}):
        mine = [x["reward"] for x in everything if x["lang"] == lang]
        metrics[f"reward/{lang}"] = sum(mine) / len(mine)
    return metrics
