"""Per-language accuracy: batched generation through pbrl's sampler (greedy by default, or n samples
per problem at a temperature), extraction shared with the rewards; with samples, pass@k (Chen et
al. 2021's unbiased estimator) and majority-vote accuracy too."""
from __future__ import annotations

import math
import zlib
from collections import Counter

import torch

from pbrl.cli import Progress
from pbrl.data import Problem, encode_prompt, extract_choice, extract_number, is_correct, prompt
from pbrl.model import Transformer
from pbrl.sampler import generate
from pbrl.tokenizer import Tokenizer


def evaluate(model: Transformer, tokenizer: Tokenizer, problems: list[Problem],
             batch_size: int = 16,
             max_new_tokens: int = 512, chat: bool = True, label: str = "eval",
             progress: bool = True,
             shots: dict[str, list[tuple[str, str]]] | None = None, temperature: float = 0.0,
             samples: int = 1, seed: int = 0) -> list[dict]:
    """One record per problem and sample: id, lang, prompt, response, extracted answer, gold,
    correct, sample (0..samples-1). Problems are sorted by prompt length into batches (less
    padding); records come back in the input order, a problem's samples together. Each sample's
    noise is seeded by (seed, problem, sample), so it does not depend on the batch. Progress goes to
    stderr under `label`. shots: per language, the exemplars that precede each prompt
    (few-shot)."""
    encoded = [encode_prompt(tokenizer, p, chat, (shots or {}).get(p.lang, ())) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: len(encoded[i]))
    records: list[list[dict] | None] = [None] * len(problems)
    bar = Progress(len(problems), label, " problems", enabled=progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seeds = [zlib.crc32(f"eval/{seed}/{problems[i].id}{problems[i].lang}/{j}".encode())
                 for i in idx for j in range(samples)]
        out = generate(model, [encoded[i] for i in idx], max_new_tokens, temperature=temperature,
                       n=samples, seeds=torch.tensor(seeds), stop_ids=tokenizer.stop_ids,
                       pad_id=tokenizer.pad_id or 0).as_lists()
        for k, i in enumerate(idx):
            records[i] = [record(problems[i], tokenizer.decode(ids), j)
                          for j, ids in enumerate(out[k * samples:(k + 1) * samples])]
        bar.update(len(idx))
    bar.close()
    return [r for mine in records for r in mine]


def record(p: Problem, response: str, sample: int) -> dict:
    extracted = extract_choice(response) if p.choices else extract_number(response)
    return {"id": p.id, "lang": p.lang, "prompt": prompt(p), "response": response,
            "extracted": extracted, "gold": p.answer, "correct": is_correct(p, response),
            "sample": sample}


def accuracy_by_language(records: list[dict]) -> dict[str, float]:
    """lang -> accuracy in percent (with several samples per problem: pass@1, their mean), plus
    'avg' over the non-English languages present."""
    langs = sorted({r["lang"] for r in records})
    acc = {lang: 100.0 * sum(r["correct"] for r in records if r["lang"] == lang) /
           sum(r["lang"] == lang for r in records) for lang in langs}
    targets = [acc[lang] for lang in langs if lang != "en"]
    if targets:
        acc["avg"] = sum(targets) / len(targets)
    return acc


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """Markdown table, one column per model, one row per language, then the non-English average."""
    names = list(scores)
    rows = sorted({k for s in scores.values() for k in s if k != "avg"},
                  key=lambda k: (k != "en", k))
    if any("avg" in s for s in scores.values()):
        rows.append("avg")
    lines = ["| lang | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        label = "avg (non-en)" if row == "avg" else row
        lines.append(f"| {label} | " + " | ".join(
            f"{scores[n][row]:.1f}" if row in scores[n] else "-" for n in names) + " |")
    return "\n".join(lines)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k of the n samples, c of them right, is right, without
    replacement: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021's unbiased estimator of pass@k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_scores(records: list[dict], k: int) -> dict[str, dict[str, float]]:
    """From several samples per problem: per language (and 'avg' over the non-English ones), in
    percent, pass@k and the accuracy of the majority vote (the most frequent extracted answer;
    a tie goes to the one sampled first; no answer at all is wrong)."""
    by_problem: dict[tuple, list[dict]] = {}
    for r in records:
        by_problem.setdefault((r["lang"], r["id"]), []).append(r)
    rows = []
    for (lang, _), mine in by_problem.items():
        if len(mine) < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem; {mine[0]['id']} "
                             f"({lang}) has {len(mine)}")
        # most_common sorts stably: of answers voted alike, the one sampled first
        votes = Counter(r["extracted"] for r in mine if r["extracted"] is not None).most_common(1)
        top = votes[0][0] if votes else None
        rows.append({"lang": lang, "pass": pass_at_k(len(mine), sum(r["correct"] for r in mine), k),
                     "majority": top is not None and top == mine[0]["gold"]})
    out = {}
    for name in ("pass", "majority"):
        scores = accuracy_by_language([{"lang": r["lang"], "correct": r[name]} for r in rows])
        out[f"pass@{k}" if name == "pass" else f"maj@{k}"] = scores
    return out
