"""Per-language accuracy: batched greedy generation through pbrl's sampler, extraction shared with
the rewards."""
from __future__ import annotations

from pbrl.cli import Progress
from pbrl.data import Problem, encode_prompt, extract_choice, extract_number, is_correct, prompt
from pbrl.model import Transformer
from pbrl.sampler import generate
from pbrl.tokenizer import Tokenizer


def evaluate(model: Transformer, tokenizer: Tokenizer, problems: list[Problem],
             batch_size: int = 16,
             max_new_tokens: int = 512, chat: bool = True, label: str = "eval",
             progress: bool = True,
             shots: dict[str, list[tuple[str, str]]] | None = None) -> list[dict]:
    """One record per problem: id, lang, prompt, response, extracted answer, gold, correct. Problems
    are sorted by prompt length into batches (less padding); records come back in the input order.
    Progress goes to stderr under `label`. shots: per language, the exemplars that precede each
    prompt (few-shot)."""
    encoded = [encode_prompt(tokenizer, p, chat, (shots or {}).get(p.lang, ())) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: len(encoded[i]))
    records: list[dict | None] = [None] * len(problems)
    bar = Progress(len(problems), label, " problems", enabled=progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        out = generate(model, [encoded[i] for i in idx], max_new_tokens,
                       stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0)
        for i, ids in zip(idx, out.as_lists()):
            p, response = problems[i], tokenizer.decode(ids)
            extracted = extract_choice(response) if p.choices else extract_number(response)
            records[i] = {"id": p.id, "lang": p.lang, "prompt": prompt(p), "response": response,
                          "extracted": extracted, "gold": p.answer,
                          "correct": is_correct(p, response)}
        bar.update(len(idx))
    bar.close()
    return records


def accuracy_by_language(records: list[dict]) -> dict[str, float]:
    """lang -> accuracy in percent, plus 'avg' over the non-English languages present."""
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
