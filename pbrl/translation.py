"""Training data for paper-scale runs: English problems (GSM8K's train split) with their questions translated into
the target languages by an instruct model through pbrl's own sampler, written in MGSM's layout.

    python -m pbrl.data translate --model TRANSLATOR --source openai/gsm8k --split train --langs de,fr,sw --out DIR

PB-RLSVR needs target-language questions only: gold answers (kept for the labelled baseline and for eval) come from
the English source. A translation must keep every number of the English question (compared as written numbers,
in any script): one that loses or changes a number is retried once with sampling, then dropped. Translations are
cached per language in DIR/translations/{lang}.jsonl, a batch at a time, so an interrupted run resumes. At the end
DIR/mgsm_en.tsv and DIR/mgsm_{lang}.tsv hold the problems every language kept, in the source's order, so that row
k is the same problem (id mgsm-k) in every file, as in MGSM.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from pbrl.cli import Progress
from pbrl.data import Problem, language, load_gsm8k, written_numbers
from pbrl.files import append_records, read_records, write_atomic

FIELDS = ("id", "question", "translation", "numbers_kept", "attempts")
TO_LANGUAGE_PROMPT = ("Translate the following English text into {language}. Keep every number exactly as written. "
                      "Reply with the translation only.\n\n{text}")
RETRY_TEMPERATURE = 0.7


def numbers(text: str) -> Counter:
    """The written numbers of a text, canonical ('1,250' and '1250' are one number), with their counts."""
    return Counter(written_numbers(text))


def keeps_numbers(english: str, translation: str) -> bool:
    """Every number of the English question is in the translation, as often (a translation may add numbers it
    spells out in words)."""
    return not numbers(english) - numbers(translation)


def one_line(text: str) -> str:
    """MGSM's TSV holds one question per line: tabs and line breaks become spaces."""
    return " ".join(text.split())


def translate_problems(translator, problems: list[Problem], langs: list[str], out: Path, batch_size: int = 16,
                       log=print) -> dict[str, Counter]:
    """Fill DIR/translations/{lang}.jsonl for every problem and language (resuming what is cached), then write the
    MGSM files. Returns per language the counts of kept, retried and dropped translations."""
    cache_dir = Path(out) / "translations"
    cache_dir.mkdir(parents=True, exist_ok=True)
    summary, translations = {}, {}
    for lang in langs:
        cache = cache_dir / f"{lang}.jsonl"
        done = read_records(cache, FIELDS)
        for p in problems:
            if p.id in done and done[p.id]["question"] != p.question:
                raise ValueError(f"{cache}: the translation of id {p.id!r} is of another question; the cache was "
                                 f"written for other problems: delete it or choose another --out")
        todo = [p for p in problems if p.id not in done]
        log(f"translate {lang}: {len(problems) - len(todo)} of {len(problems)} cached, {len(todo)} to translate")
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
                        r.update(translation=t, attempts=2, numbers_kept=keeps_numbers(r["question"], t))
                append_records(cache, records, FIELDS)
                bar.update(len(batch))
        translations[lang] = done = read_records(cache, FIELDS)
        counts = Counter()
        for p in problems:
            record = done[p.id]
            counts["kept" if record["numbers_kept"] else "dropped"] += 1
            counts["retried"] += record["attempts"] > 1
        summary[lang] = counts
    kept = [p for p in problems if all(translations[lang][p.id]["numbers_kept"] for lang in langs)]
    write_atomic(Path(out) / "mgsm_en.tsv", lambda f: f.write_text(
        "".join(f"{one_line(p.question)}\t{p.answer}\n" for p in kept), encoding="utf-8"))
    for lang in langs:
        write_atomic(Path(out) / f"mgsm_{lang}.tsv", lambda f, lang=lang: f.write_text(
            "".join(f"{one_line(translations[lang][p.id]['translation'])}\t{p.answer}\n" for p in kept),
            encoding="utf-8"))
    for lang, counts in summary.items():
        log(f"translate {lang}: {counts['kept']} kept, {counts['retried']} retried, {counts['dropped']} dropped "
            f"(a number lost or changed)")
    log(f"wrote {len(kept)} of {len(problems)} problems (kept in every language) to {out}/mgsm_{{en,"
        f"{','.join(langs)}}}.tsv")
    return summary


def main(argv=None) -> None:
    import argparse

    from pbrl.rewards import load_translator
    ap = argparse.ArgumentParser(prog="python -m pbrl.data translate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an instruct model (HF directory or hub id), or a directory with "
                                                   "lexicon.json (a word-by-word dictionary)")
    ap.add_argument("--source", required=True, help="GSM8K: a hub dataset id (openai/gsm8k), a directory or a JSONL "
                                                    "file with question and answer ('#### N')")
    ap.add_argument("--split", default="train")
    ap.add_argument("--langs", required=True, help="target languages, comma-separated (de,fr,sw,...)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = ap.parse_args(argv)
    langs = [lang for lang in args.langs.split(",") if lang]
    for lang in langs:
        language(lang)  # an unknown code is an error before any model loads
    if "en" in langs:
        raise ValueError("--langs lists the target languages; English is the source")
    problems = load_gsm8k(args.source, args.split)[:args.limit]
    from pbrl.distributed import resolve_device
    translator = load_translator(args.model, device=resolve_device(args.device), max_new_tokens=args.max_new_tokens,
                                 prompt=TO_LANGUAGE_PROMPT)
    translate_problems(translator, problems, langs, args.out, args.batch_size)
