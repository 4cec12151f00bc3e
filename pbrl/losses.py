"""Phases 4 and 6 of an iteration, each testable alone: the model read back over the rollout's
sequences (per-token log-probs and entropies, or values; padded, or packed into one row with each
prompt once), micro-batches by size or by token budget, and the actor's and the critic's loss on
one micro-batch. The maths they call is in pbrl/ppo.py.

One layout from the rollout to the loss: a row is its prompt then its response, right padded, tokens
[B, L]. Per-token tensors are [B, L - 1] and aligned with the predictions: column t holds what
concerns token t + 1, which the model predicts at position t; `mask` marks the columns whose token
is a response token (an action).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pbrl import ppo
from pbrl.model import Transformer, document_causal


class Experience(NamedTuple):
    """What one iteration carries from the rollout to the update; row i*n + j is sample j of problem
    i."""
    tokens: torch.Tensor            # [B, L] long: prompt, then response, right padded with 0
    lengths: torch.Tensor           # [B] long: real tokens per row
    mask: torch.Tensor              # [B, L - 1] bool: token t + 1 is a response token
    # [B, L - 1] the sampler's (compared with old_logprobs as a metric)
    sampler_logprobs: torch.Tensor
    # [B, L - 1] the policy that sampled, by the trainer's own forward (None: by the update's)
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None  # [B, L - 1] the frozen reference policy (None: no KL)
    values: torch.Tensor            # [B, L - 1] the critic's, before each token
    kl: torch.Tensor                # [B, L - 1] per-token KL estimate to the reference
    advantages: torch.Tensor        # [B, L - 1]
    returns: torch.Tensor           # [B, L - 1] the critic's regression targets
    # [B, L - 1] each token's weight in the losses, 0 where it takes no part: the mask, times the
    # rollout correction (ppo.CORRECTIONS), without responses rollout.overlong filters out
    weights: torch.Tensor

    def rows(self, index: torch.Tensor) -> Experience:
        return Experience(*(None if t is None else t[index] for t in self))


def per_token(model: Transformer, tokens, lengths, mask, output: str, temperature: float = 1.0,
              packed: bool = False):
    """The model over each row but its last token, as wide as the longest row (packed: all in one
    row, packed_per_token): (log-probs, entropies) of the response tokens, or the values before
    them; [B, L - 1] each, 0 where not mask."""
    if packed:
        return packed_per_token(model, tokens, lengths, mask, output, temperature)
    width = int(lengths.max()) - 1
    out = model(tokens[:, :width], output=output, labels=tokens[:, 1:width + 1],
                label_mask=mask[:, :width], temperature=temperature)
    pad = (0, mask.shape[1] - width)
    if output == "values":
        return F.pad(torch.where(mask[:, :width], out, 0.0), pad)
    return tuple(F.pad(x, pad) for x in out)


def packed_per_token(model: Transformer, tokens, lengths, mask, output: str,
                     temperature: float = 1.0, share: bool = True):
    """per_token with the rows packed into one row (`packing`): each prompt once, then its
    samples' responses, each seeing the prompt and itself (model.document_causal); positions are
    the columns they come from. No compute on padding or on a prompt's copies; the same outputs,
    [B, L - 1]."""
    rows, cols, docs, prefix = packing(tokens, lengths, mask, share)
    out = model(tokens[rows, cols][None], output=output, labels=tokens[rows, cols + 1][None],
                label_mask=mask[rows, cols][None], temperature=temperature, positions=cols[None],
                attend=document_causal(docs, prefix))
    unpacked = [torch.zeros(mask.shape, device=x.device).index_put((rows, cols), x[0])
                for x in (out if output == "logprobs" else (out,))]
    return tuple(unpacked) if output == "logprobs" else torch.where(mask, unpacked[0], 0.0)


def packing(tokens, lengths, mask, share: bool = True):
    """Where each token of the packed row comes from, rows [T] and cols [T], and its sequence docs
    [T] and prefix [T] (document_causal's). A row contributes its tokens but its last; with `share`
    the rows of one prompt (prompt_groups) contribute it once, all its tokens but its last, then
    each row its last prompt token (the one predicting the response's first) and its response but
    the response's last token, attending to that shared prompt."""
    prompts, ends = (lengths - mask.sum(1)).tolist(), (lengths - 1).tolist()
    spans = []  # (row, first column, end column, the span it sees whole: its index or -1)
    for group in prompt_groups(tokens, lengths, mask) if share else [[i] for i in range(len(ends))]:
        start, parent = 0, -1
        if len(group) > 1 and prompts[group[0]] > 1:
            start, parent = prompts[group[0]] - 1, len(spans)
            spans.append((group[0], 0, start, -1))
        spans += [(i, start, ends[i], parent) for i in group if ends[i] > start]
    row, first, end, parent = (torch.tensor(x, device=tokens.device) for x in zip(*spans))
    size = end - first
    offsets = torch.cumsum(size, 0) - size
    cols = first.repeat_interleave(size) + torch.arange(int(size.sum()), device=tokens.device) \
        - offsets.repeat_interleave(size)
    docs = torch.arange(len(spans), device=tokens.device).repeat_interleave(size)
    return row.repeat_interleave(size), cols, docs, parent.repeat_interleave(size)


def computed_tokens(exp: Experience, micro_batches: list, packed: bool) -> tuple[int, int]:
    """(positions, padding positions) that one pass over these micro-batches computes."""
    if packed:
        return sum(len(packing(*(x[rows] for x in exp[:3]))[0]) for rows in micro_batches), 0
    computed = sum(len(rows) * (int(exp.lengths[rows].max()) - 1) for rows in micro_batches)
    return computed, computed - int((exp.lengths - 1).sum())


def packing_units(tokens, lengths, mask, budget: int) -> list[tuple[list[int], int]]:
    """The rows of each prompt group (prompt_groups) with the tokens `packing` computes for them,
    (rows, tokens): a group of more than `budget` tokens is cut into parts that fit, each with its
    own copy of the prompt."""
    prompts, ends = (lengths - mask.sum(1)).tolist(), (lengths - 1).tolist()
    units = []
    for group in prompt_groups(tokens, lengths, mask):
        shared = prompts[group[0]] - 1
        part, width = [], shared
        for i in group:
            if part and width + ends[i] - shared > budget:
                units.append((part, width))
                part, width = [], shared
            part, width = part + [i], width + ends[i] - shared
        units.append((part, width))
    return units


def prompt_groups(tokens, lengths, mask) -> list[list[int]]:
    """The rows (by index) grouped by their prompts' tokens, in the order of each group's first
    row."""
    prompts = (lengths - mask.sum(1)).tolist()
    groups = {}
    for i, row in enumerate(tokens.tolist()):
        groups.setdefault(tuple(row[:prompts[i]]), []).append(i)
    return list(groups.values())


def token_micro_batches(widths: list[int], budget: int, gather=lambda k: [k]) -> list[list[int]]:
    """Units (widths: each one's tokens) into micro-batches of at most `budget` tokens, as even as
    the longest-first rule makes them (each row, longest first, joins the lightest micro-batch):
    the fewest that fit on every rank, so that every rank (gather: every rank's objects) runs the
    same number of forward and backward passes, as FSDP needs."""
    if max(widths) > budget:
        raise ValueError(f"a sequence of {max(widths)} tokens does not fit ppo.micro_batch_tokens="
                         f"{budget}")
    count = -(-sum(widths) // budget)
    while True:
        count = max(gather(count))
        loads, rows = [0] * count, [[] for _ in range(count)]
        for i in sorted(range(len(widths)), key=lambda i: -widths[i]):
            lightest = loads.index(min(loads))
            loads[lightest] += widths[i]
            rows[lightest].append(i)
        if not any(gather(max(loads) > budget)):
            return [sorted(r) for r in rows]
        count += 1


def actor_loss(actor, exp: Experience, counts: ppo.Counts, cfg, temperature, kl_beta):
    """The policy loss (cfg.policy_loss, aggregated by cfg.loss_agg over the global batch's counts)
    minus the entropy bonus (plus kl_beta * k3 KL to the reference with cfg.kl_in_loss) of one
    micro-batch; returns (loss, sums of its statistics)."""
    logp, entropy = per_token(actor, exp.tokens, exp.lengths, exp.mask, "logprobs", temperature,
                              cfg.micro_batch_tokens is not None)
    old = logp.detach() if exp.old_logprobs is None else exp.old_logprobs  # None: one step
    out = ppo.policy_loss(logp, old, exp.advantages, exp.weights, counts, cfg.eps_low,
                          cfg.eps_high, cfg.dual_clip, cfg.policy_loss, cfg.loss_agg)
    aggregate, keep = ppo.AGGREGATIONS[cfg.loss_agg], exp.weights > 0
    entropy_sum, tokens, gap = ppo.masked_sum(entropy, keep), keep.sum(), exp.sampler_logprobs - old
    stats = {"policy_loss": out.loss.detach(), "entropy": entropy_sum.detach(), "tokens": tokens,
             "clipfrac": out.clipfrac * tokens, "approx_kl": out.approx_kl * tokens,
             "logprob_mismatch": ppo.masked_sum(gap.abs(), keep),  # the sampler's against ours
             "logprob_mismatch_k3": ppo.masked_sum(ppo.KL_ESTIMATORS["k3"](gap), keep)}
    loss = out.loss - cfg.entropy_coef * aggregate(entropy, exp.weights, counts)
    if cfg.kl_in_loss and exp.ref_logprobs is not None:
        loss = loss + kl_penalty(logp, exp, counts, aggregate, kl_beta, stats)
    return loss, stats


def kl_penalty(logp, exp: Experience, counts: ppo.Counts, aggregate, kl_beta, stats):
    """ppo.kl_in_loss: kl_beta * the k3 KL to the reference, aggregated as the policy loss is;
    its sum goes into stats as kl_loss."""
    kl = ppo.kl_estimate(logp, exp.ref_logprobs, "k3")
    stats["kl_loss"] = ppo.masked_sum(kl, exp.weights > 0).detach()
    return kl_beta * aggregate(kl, exp.weights, counts)


def critic_loss(critic, exp: Experience, counts: ppo.Counts, cfg, temperature, kl_beta):
    """The clipped value loss of one micro-batch, a mean over the tokens of the loss; returns (loss,
    sums of its statistics)."""
    values = per_token(critic, exp.tokens, exp.lengths, exp.mask, "values",
                       packed=cfg.micro_batch_tokens is not None)
    keep = exp.weights > 0
    out = ppo.value_loss(values, exp.values, exp.returns, keep, counts.tokens, cfg.value_clip)
    return out.loss, {"value_loss": out.loss.detach(), "value_clipfrac": out.clipfrac * keep.sum()}
