"""Phases 1-3 and 7 of an iteration, each testable alone: which problems a step samples, each
sequence's seed, the sequences a rollout makes, their scores and what rollout.overlong makes of the
truncated ones, dynamic sampling's choice of groups, and the iteration's rollout metrics. The update
(phases 4 and 6) is in pbrl/losses.py, the advantages and losses' maths in pbrl/ppo.py.

Sequences are laid out as pbrl/losses.py describes: a row is its prompt then its response, right
padded, tokens [B, L]; per-token tensors are [B, L - 1], column t about token t + 1.
"""
from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from pbrl import ppo
from pbrl.data import Problem
from pbrl.losses import Experience
from pbrl.model import pad_rows
from pbrl.rewards import Sample, response_checks
from pbrl.sampler import Completions


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


def rollout_metrics(batch: Groups, exp: Experience, corrected, reduce, gather,
                    critic: bool = True) -> dict:
    """Reward per component and language, response length, the share of responses cut at
    max_new_tokens, the critic's fit (when there is one) and the share of tokens the rollout
    correction changed, over all ranks: reduce sums tensors and gather collects objects (identities
    in one process). The actor's loss measures the sampler/trainer log-prob mismatch."""
    mask, rewards, lengths = exp.mask, batch.rewards, batch.completions.lengths.tolist()
    per_sample = [{"lang": s.lang, "length": lengths[i], "checks": response_checks(s),
                   **{k: float(v[i]) for k, v in rewards.items()}}
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
            **{f"reward/{lang}": sum(mine) / len(mine) for lang, mine in by_lang.items()},
            **diagnostics(everything)}


def diagnostics(samples: list[dict]) -> dict[str, float]:
    """Per language, the share of responses that pass each of rewards.response_checks (the
    failure modes of a semantic reward against an English reference: answers drifting into
    English, copies of the reference, no final answer) as fidelity/{lang}/{check}; and the
    response length's median, 90th percentile and maximum, in tokens."""
    out = {}
    for lang in sorted({x["lang"] for x in samples}):
        mine = [x["checks"] for x in samples if x["lang"] == lang]
        for check in sorted(mine[0]):
            out[f"fidelity/{lang}/{check}"] = sum(c[check] for c in mine) / len(mine)
    lengths = sorted(x["length"] for x in samples)

    def at(q):  # nearest rank
        return float(lengths[min(len(lengths) - 1, math.ceil(q * len(lengths)) - 1)])
    return {**out, "response_length_p50": at(0.5), "response_length_p90": at(0.9),
            "response_length_max": float(lengths[-1])}


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
