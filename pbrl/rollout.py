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
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from pbrl import ppo
from pbrl.data import Problem
from pbrl.model import Transformer, document_causal, pad_rows
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


class Groups(NamedTuple):
    """Phases 1-3 of an iteration on one rank: problems, their completions (row i*n + j is sample j
    of problems[i]) and what the reward made of them."""
    problems: list[Problem]
    completions: Completions
    samples: list[Sample]
    rewards: dict[str, torch.Tensor]  # name -> [B]: "reward" (the score), then its components
    keep: torch.Tensor                # [B] bool: the response takes part in the loss
    stats: dict                       # what dynamic sampling reports (empty without it)


def problems_for_step(problems: list[Problem], step: int, per_step: int, seed: int, rank, world):
    """This rank's share of step `step`'s problems. Steps walk through the problems in a seeded
    permutation per pass, continuing into the next pass's: a pure function, no loader state to
    save."""
    if per_step % world:
        raise ValueError(f"{per_step} problems per step do not split over {world} ranks")
    first, n, share = step * per_step, len(problems), per_step // world
    passes = range(first // n, (first + per_step - 1) // n + 1)  # those this step reaches into
    order = [i for p in passes for i in torch.randperm(
        n, generator=torch.Generator().manual_seed(seed * 100_003 + p)).tolist()]
    mine = order[first % n:first % n + per_step][rank * share:(rank + 1) * share]
    return [problems[i] for i in mine]


def sequence_seed(seed: int, step: int, problem: Problem, sample: int) -> int:
    """One sequence's sampling seed: the same whatever rank or batch position it lands on."""
    return zlib.crc32(f"{seed}/{step}/{problem.id + problem.lang}/{sample}".encode())


def sequences(prompts: list[list[int]], completions: Completions):
    """One prompt per completion row -> tokens [B, L], lengths [B], mask [B, L - 1] and the
    sampler's log-probs in the same layout [B, L - 1]."""
    tokens, real = pad_rows([p + r for p, r in zip(prompts, completions.as_lists())])
    starts = torch.tensor([len(p) for p in prompts])
    mask = (real & (torch.arange(tokens.shape[1]) >= starts[:, None]))[:, 1:]
    generated = torch.arange(completions.tokens.shape[1]) < completions.lengths[:, None]
    sampled = completions.logprobs[generated]
    return tokens, real.sum(1), mask, torch.zeros(mask.shape).masked_scatter(mask, sampled)


def score(reward_fn, problems: list[Problem], texts: list[str], references, samples_per_prompt):
    """Each response against its problem's English reference (and gold answer, which only ExactMatch
    reads); texts[i * n + j] is sample j of problems[i]. Returns the samples and reward_fn's {name:
    [B]}."""
    repeated = [p for p in problems for _ in range(samples_per_prompt)]
    samples = [Sample(p.lang, text, references[p.id], p.answer) for p, text in zip(repeated, texts)]
    return samples, reward_fn(samples)


# rollout.overlong: what becomes of responses that hit max_new_tokens without a stop token.
# (rewards, completions, max_new_tokens, buffer) -> (rewards, keep [B]).
def overlong_off(rewards, completions, max_new_tokens, buffer):
    return rewards, torch.ones_like(completions.finished)


def overlong_filter(rewards, completions, max_new_tokens, buffer):
    """DAPO's overlong filtering: a truncated response takes no part in the loss."""
    return rewards, completions.finished


def overlong_penalty(rewards, completions, max_new_tokens, buffer):
    """DAPO's soft overlong punishment, added to the score: 0 up to max_new_tokens - buffer
    tokens, then down linearly to -1 at max_new_tokens."""
    length = completions.lengths.to(rewards["reward"])
    penalty = ((max_new_tokens - buffer - length) / buffer).clamp(-1.0, 0.0)
    return {**rewards, "reward": rewards["reward"] + penalty, "overlong_penalty": penalty}, \
        torch.ones_like(completions.finished)


OVERLONG = {"off": overlong_off, "filter": overlong_filter, "penalty": overlong_penalty}


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


class Estimator(NamedTuple):
    """An advantage estimator (ppo.advantage) and what the rest of a run must know of it."""
    fn: Callable        # (cfg, scores [B], kl, values, mask, groups [B], beta, reduce) -> (A, R)
    critic: bool        # it reads a critic's values: prepare builds one, the planner counts it
    grouped: bool       # it compares the samples of a prompt: rollout.samples_per_prompt >= 2


# ppo.advantage's choices, each registered by @estimator; advantages and returns are [B, L - 1].
# beta weighs the KL in the reward (0 with ppo.kl_in_loss: the actor's loss holds it); reduce sums
# over ranks. The critic-free ones return no returns (zeros).
ADVANTAGES: dict[str, Estimator] = {}


def estimator(name: str, critic: bool = False, grouped: bool = False):
    def register(fn):
        ADVANTAGES[name] = Estimator(fn, critic, grouped)
        return fn
    return register


@estimator("gae", critic=True)
def gae_advantages(cfg, scores, kl, values, mask, groups, beta, reduce):
    """The score on each response's last token and -beta * KL on every token, GAE over the
    critic's values, optionally whitened over all ranks."""
    token_rewards = ppo.per_token_rewards(scores, kl, mask, beta)
    advantage, returns = ppo.gae(token_rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantage = ppo.whiten(advantage, mask, reduce=reduce)
    return advantage, returns


def sequence_scores(scores, kl, mask, beta):
    """The score minus beta * the summed KL (as verl folds a per-token KL into the sequence
    reward) [B]."""
    return scores - beta * ppo.masked_sum(kl, mask, dim=1)


@estimator("grpo", grouped=True)
def grpo_advantages(cfg, scores, kl, values, mask, groups, beta, reduce):
    """Each response's sequence score against its group's mean (over its std with
    ppo.group_std)."""
    advantage = ppo.grpo_advantages(sequence_scores(scores, kl, mask, beta), groups, mask,
                                    cfg.group_std)
    return advantage, torch.zeros_like(advantage)


@estimator("rloo", grouped=True)
def rloo_advantages(cfg, scores, kl, values, mask, groups, beta, reduce):
    """Each response's sequence score against the mean of its group's other samples."""
    advantage = ppo.rloo_advantages(sequence_scores(scores, kl, mask, beta), groups, mask)
    return advantage, torch.zeros_like(advantage)


@estimator("reinforce_pp")
def reinforce_pp_advantages(cfg, scores, kl, values, mask, groups, beta, reduce):
    """REINFORCE++: returns whitened over the global batch."""
    advantage = ppo.reinforce_pp_advantages(scores, kl, mask, beta, None, reduce)
    return advantage, torch.zeros_like(advantage)


@estimator("reinforce_pp_baseline", grouped=True)
def reinforce_pp_baseline_advantages(cfg, scores, kl, values, mask, groups, beta, reduce):
    """REINFORCE++ with each score minus its group's mean first."""
    advantage = ppo.reinforce_pp_advantages(scores, kl, mask, beta, groups, reduce)
    return advantage, torch.zeros_like(advantage)


def advantages(cfg, scores, kl, values, mask, groups, kl_beta: float, reduce):
    """(advantages, returns) [B, L - 1] by the estimator cfg.advantage names (ADVANTAGES)."""
    beta = 0.0 if cfg.kl_in_loss else kl_beta
    return ADVANTAGES[cfg.advantage].fn(cfg, scores, kl, values, mask, groups, beta, reduce)


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
        kl = ppo.kl_estimate(logp, exp.ref_logprobs, "k3")
        stats["kl_loss"] = ppo.masked_sum(kl, keep).detach()
        loss = loss + kl_beta * aggregate(kl, exp.weights, counts)
    return loss, stats


def critic_loss(critic, exp: Experience, counts: ppo.Counts, cfg, temperature, kl_beta):
    """The clipped value loss of one micro-batch, a mean over the tokens of the loss; returns (loss,
    sums of its statistics)."""
    values = per_token(critic, exp.tokens, exp.lengths, exp.mask, "values",
                       packed=cfg.micro_batch_tokens is not None)
    keep = exp.weights > 0
    out = ppo.value_loss(values, exp.values, exp.returns, keep, counts.tokens, cfg.value_clip)
    return out.loss, {"value_loss": out.loss.detach(), "value_clipfrac": out.clipfrac * keep.sum()}


def rollout_metrics(batch: Groups, exp: Experience, corrected, reduce, gather,
                    critic: bool = True) -> dict:
    """Reward per component and language, response length, the share of responses cut at
    max_new_tokens, the critic's fit (when there is one) and the share of tokens the rollout
    correction changed, over all ranks: reduce sums tensors and gather collects objects (identities
    in one process). The actor's loss measures the sampler/trainer log-prob mismatch."""
    mask, rewards = exp.mask, batch.rewards
    per_sample = [{"lang": s.lang, **{k: float(v[i]) for k, v in rewards.items()}}
                  for i, s in enumerate(batch.samples)]
    everything = [x for part in gather(per_sample) for x in part]
    token_means = {"kl": exp.kl, "corrected": corrected.float()}
    *sums, tokens, sequence_tokens, finished = reduce(torch.stack([
        *(ppo.masked_sum(x, mask) for x in token_means.values()), mask.sum().float(),
        exp.lengths.sum().float(), batch.completions.finished.sum().to(exp.kl)])).tolist()
    metrics = {**{k: s / max(tokens, 1.0) for k, s in zip(token_means, sums)},
               "response_tokens": tokens, "response_length": tokens / len(everything),
               "sequence_tokens": sequence_tokens, "truncated": 1 - finished / len(everything)}
    if critic:
        metrics["explained_variance"] = float(ppo.explained_variance(exp.values, exp.returns, mask,
                                                                     reduce=reduce))
    by_lang = {lang: [x["reward"] for x in everything if x["lang"] == lang]
               for lang in sorted({x["lang"] for x in everything})}
    return {**metrics, **{k: sum(x[k] for x in everything) / len(everything) for k in rewards},
            **{f"reward/{lang}": sum(mine) / len(mine) for lang, mine in by_lang.items()}}


# Dynamic sampling (rollout.dynamic_sampling): which groups teach something, and the step's batch
# chosen from several rounds of them in one global order.
def informative(scores: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """[B] scores -> [B / n] bool: the group's samples do not all score alike (under GRPO or RLOO a
    group that does has advantage 0 everywhere)."""
    groups = scores.view(-1, samples_per_prompt)
    return groups.amax(1) > groups.amin(1)


def group_records(rounds: list[Groups], n: int) -> list[dict]:
    """Each group of each round as plain objects, to send to every rank."""
    records = []
    for k, batch in enumerate(rounds):
        rows, c = batch.completions.as_lists(), batch.completions
        found = informative(batch.rewards["reward"], n).tolist()
        for i, problem in enumerate(batch.problems):
            part = slice(i * n, (i + 1) * n)
            records.append({
                "round": k, "index": i, "informative": found[i], "problem": problem,
                "tokens": rows[part], "samples": batch.samples[part],
                "logprobs": [lp[:len(t)] for lp, t in zip(c.logprobs[part].tolist(), rows[part])],
                "finished": c.finished[part].tolist(), "keep": batch.keep[part].tolist(),
                "rewards": {key: v[part].tolist() for key, v in batch.rewards.items()}})
    return records


def choose_groups(rounds: list[Groups], size: int, n: int, rank: int, world: int, gather,
                  pad_id: int) -> Groups:
    """This rank's share of the step's `size` groups: every rank's groups of every round in their
    global draw order (round, then rank, then position: the order problems_for_step deals them),
    the informative ones first, the first `size` of them, dealt out to ranks in that order."""
    everything = [(r["round"], owner, r["index"], r)
                  for owner, part in enumerate(gather(group_records(rounds, n))) for r in part]
    ordered = [r for *_, r in sorted(everything, key=lambda x: x[:3])]
    chosen = sorted(ordered, key=lambda r: not r["informative"])[:size]
    share = size // world
    mine = chosen[rank * share:(rank + 1) * share]
    device = rounds[0].completions.tokens.device

    def stack(key, pad, dtype=None):  # the rows of `key` of my groups, right padded
        rows = [torch.tensor(row, dtype=dtype) for r in mine for row in r[key]]
        return pad_sequence(rows, batch_first=True, padding_value=pad).to(device)
    lengths = torch.tensor([len(row) for r in mine for row in r["tokens"]], device=device)
    finished = torch.tensor([f for r in mine for f in r["finished"]], device=device)
    completions = Completions(stack("tokens", pad_id, torch.long), lengths, finished,
                              stack("logprobs", 0.0, torch.float32))
    rewards = {key: torch.tensor([v for r in mine for v in r["rewards"][key]])
               for key in mine[0]["rewards"]}
    return Groups([r["problem"] for r in mine], completions,
                  [s for r in mine for s in r["samples"]], rewards,
                  torch.tensor([k for r in mine for k in r["keep"]]), {})
