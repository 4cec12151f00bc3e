"""Per-language accuracy of one or more checkpoints on MGSM, GSM8K or MMLU-ProX.

    python eval.py --model PATH_OR_ID [--model PATH2 ...] --task mgsm --langs en,de,sw [--limit N]

Prints a Markdown table (a column per model, a row per language, the average over non-English languages) and
writes OUT/scores.json and OUT/samples.jsonl (every prompt, response, extracted answer and verdict).
"""
import argparse
import json
from pathlib import Path

import torch

from pbrl.data import load_gsm8k, load_mgsm, load_mmlu_prox
from pbrl.evaluate import accuracy_by_language, evaluate, format_table
from pbrl.model import Transformer
from pbrl.tokenizer import Tokenizer

DEFAULT_DATA = {"mgsm": "juletxara/mgsm", "gsm8k": "openai/gsm8k", "mmlu_prox": "li-lab/MMLU-ProX"}


def load_problems(task: str, data: str, langs: list[str], limit: int | None):
    if task == "mgsm":
        by_lang = load_mgsm(data, langs)
    elif task == "mmlu_prox":
        by_lang = load_mmlu_prox(data, langs)
    else:
        if langs != ["en"]:
            raise ValueError(f"gsm8k is English only; got --langs {','.join(langs)}")
        by_lang = {"en": load_gsm8k(data)}
    return [p for lang in langs for p in by_lang[lang][:limit]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="HF directory or hub id; repeat to compare")
    ap.add_argument("--task", choices=list(DEFAULT_DATA), default="mgsm")
    ap.add_argument("--data", help="local directory/file or hub dataset id (default: the task's hub dataset)")
    ap.add_argument("--langs", default="en", help="comma-separated language codes")
    ap.add_argument("--limit", type=int, help="first N problems per language")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--no-chat", action="store_true", help="raw prompts instead of the chat template")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="runs/eval")
    args = ap.parse_args(argv)

    problems = load_problems(args.task, args.data or DEFAULT_DATA[args.task], args.langs.split(","), args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = {}
    with (out / "samples.jsonl").open("w", encoding="utf-8") as samples:
        for path in args.model:
            model = Transformer.from_pretrained(path, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                                device=args.device)
            records = evaluate(model, Tokenizer.from_pretrained(path), problems, args.batch_size,
                               args.max_new_tokens, chat=not args.no_chat, label=f"{path}: ")
            for r in records:
                samples.write(json.dumps({"model": path, **r}, ensure_ascii=False) + "\n")
            scores[path] = accuracy_by_language(records)
            del model
    (out / "scores.json").write_text(json.dumps({"task": args.task, "scores": scores}, indent=2))
    print(format_table(scores))
    print(f"wrote {out / 'scores.json'} and {out / 'samples.jsonl'}")


if __name__ == "__main__":
    main()
