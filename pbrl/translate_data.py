"""Training data for paper-scale runs: English problems (GSM8K's train split), their questions
translated into the target languages by an instruct model through pbrl's own sampler, in MGSM's
layout.

    python -m pbrl.translate_data --model TRANSLATOR --source openai/gsm8k --split train \
        --langs de,fr,sw --out DIR

PB-RLSVR needs target-language questions only: gold answers (for the labelled baseline and for eval)
come from the English source. A translation must keep every number of the English question (compared
as written numbers, in any script): one that loses or changes a number is retried once with
sampling, then dropped. Translations are cached per language in DIR/translations/{lang}.jsonl a
batch at a time, so an interrupted run resumes. At the end DIR/mgsm_en.tsv and DIR/mgsm_{lang}.tsv
hold the problems every language kept, in the source's order: row k is the same problem (id mgsm-k)
in every file, as in MGSM.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from pbrl.cli import Progress, languages, positive_int, run_main, shared_flags
from pbrl.data import Problem, load_gsm8k, prompt_format, written_numbers
from pbrl.distributed import resolve_device
from pbrl.files import FLAG, NUMBER, TEXT, append_records, read_records, write_atomic
from pbrl.translators import load_translator

FIELDS = {"id": TEXT, "question": TEXT, "translation": TEXT, "numbers_kept": FLAG,
          "attempts": NUMBER}
TO_LANGUAGE_PROMPT = ("Translate the following English text into {language}. Keep every number "
                      "exactly as written. Reply with the translation only.\n\n{text}")
RETRY_TEMPERATURE = 0.7


def keeps_numbers(english: str, translation: str) -> bool:
    """Every number of the English question is in the translation, as often (a translation may add
    numbers it spells out in words). '1,250' and '1250' are one number."""
    return not Counter(written_numbers(english)) - Counter(written_numbers(translation))


def one_line(text: str) -> str:
    """MGSM's TSV holds one question per line: tabs and line breaks become spaces."""
    return " ".join(text.split())


def translate_problems(translator, problems: list[Problem], langs: list[str], out: Path,
                       batch_size: int = 16, log=print) -> dict[str, Counter]:
    """Every problem into every language (resuming what DIR/translations holds), then the MGSM
    files. Returns per language the counts of kept, retried and dropped translations."""
    (Path(out) / "translations").mkdir(parents=True, exist_ok=True)
    translations = {lang: translate_language(translator, problems, lang, out, batch_size, log)
                    for lang in langs}
    kept = [p for p in problems if all(translations[lang][p.id]["numbers_kept"] for lang in langs)]
    rows = {"en": {p.id: p.question for p in kept}} | {
        lang: {p.id: translations[lang][p.id]["translation"] for p in kept} for lang in langs}
    for lang, questions in rows.items():
        with write_atomic(Path(out) / f"mgsm_{lang}.tsv") as tmp:
            tmp.write_text("".join(f"{one_line(questions[p.id])}\t{p.answer}\n" for p in kept),
                           encoding="utf-8")
    summary = {}
    for lang in langs:
        records = [translations[lang][p.id] for p in problems]
        summary[lang] = Counter(kept=sum(r["numbers_kept"] for r in records),
                                retried=sum(r["attempts"] > 1 for r in records),
                                dropped=sum(not r["numbers_kept"] for r in records))
        log(f"translate {lang}: {summary[lang]['kept']} kept, {summary[lang]['retried']} retried, "
            f"{summary[lang]['dropped']} dropped (a number lost or changed)")
    log(f"wrote {len(kept)} of {len(problems)} problems (kept in every language) to "
        f"{out}/mgsm_{{en,{','.join(langs)}}}.tsv")
    return summary


def translate_language(translator, problems, lang: str, out: Path, batch_size: int, log) -> dict:
    """id -> translation record of every problem in one language, the cache filled a batch at a
    time."""
    cache = Path(out) / "translations" / f"{lang}.jsonl"
    done = read_records(cache, FIELDS)
    for p in problems:
        if p.id in done and done[p.id]["question"] != p.question:
            raise ValueError(f"{cache}: the translation of id {p.id!r} is of another question; the "
                             f"cache was written for other problems: delete it or choose another "
                             f"--out")
    todo = [p for p in problems if p.id not in done]
    log(f"translate {lang}: {len(problems) - len(todo)} of {len(problems)} cached, {len(todo)} to "
        f"translate")
    with Progress(len(todo), f"translate {lang}", " problems") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = translator([p.question for p in batch], [lang] * len(batch))
            records = [{"id": p.id, "question": p.question, "translation": t, "attempts": 1,
                        "numbers_kept": keeps_numbers(p.question, t)} for p, t in zip(batch, texts)]
            retry = [r for r in records if not r["numbers_kept"]]
            if retry:  # once more, sampled: greedy decoding would repeat the same mistake
                again = translator([r["question"] for r in retry], [lang] * len(retry),
                                   temperature=RETRY_TEMPERATURE, seed=start)
                for r, t in zip(retry, again):
                    r.update(translation=t, attempts=2,
                             numbers_kept=keeps_numbers(r["question"], t))
            append_records(cache, records, FIELDS)
            bar.update(len(batch))
    return read_records(cache, FIELDS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pbrl.translate_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="an instruct model (HF directory or hub id), or a "
                                                   "directory with lexicon.json (a dictionary)")
    ap.add_argument("--source", required=True, help="GSM8K: a hub dataset id (openai/gsm8k), a "
                                                    "directory or a JSONL file with question and "
                                                    "answer")
    ap.add_argument("--split", default="train")
    ap.add_argument("--langs", required=True, type=languages,
                    help="target languages, comma-separated (de,fr,sw,...)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=positive_int, help="only the first N problems")
    shared_flags(ap, "device", "batch-size", "max-new-tokens")
    args = ap.parse_args(argv)
    langs = args.langs
    for lang in langs:
        prompt_format(lang)  # an unknown code is an error before any model loads
    if "en" in langs:
        raise ValueError("--langs lists the target languages; English is the source")
    problems = load_gsm8k(args.source, args.split)[:args.limit]
    translator = load_translator(args.model, device=resolve_device(args.device),
                                 max_new_tokens=args.max_new_tokens, prompt=TO_LANGUAGE_PROMPT)
    translate_problems(translator, problems, langs, args.out, args.batch_size)


if __name__ == "__main__":
    run_main(main)
