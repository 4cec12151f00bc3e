"""Per-language accuracy of one or more checkpoints on MGSM, GSM8K or MMLU-ProX.

    python eval.py --model PATH_OR_ID [--model PATH2 ...] --task mgsm --langs en,de,sw \
        [--limit N] [--num-fewshot 8] [--samples 8 --temperature 0.7]

Prints a Markdown table (a column per model, a row per language, the average over non-English
languages) and writes OUT/scores.json and OUT/samples.jsonl (every prompt, response, extracted
answer and verdict). Greedy by default; with --samples K at a --temperature, the table is pass@1
(the mean over the samples), followed by pass@K and majority-vote accuracy.
"""
import argparse
import json

from pbrl.checkpoint import check_pretrained, load_pretrained
from pbrl.cli import (DTYPES, languages, natural_int, nonnegative_float, positive_int, run_main,
                      shared_flags)
from pbrl.data import load_mgsm_exemplars, load_problems
from pbrl.distributed import resolve_device
from pbrl.evaluate import accuracy_by_language, evaluate, format_table, sampled_scores
from pbrl.files import results_dir, write_atomic

DEFAULT_DATA = {"mgsm": "juletxara/mgsm", "gsm8k": "openai/gsm8k", "mmlu_prox": "li-lab/MMLU-ProX"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="HF directory or hub id; repeat to compare")
    ap.add_argument("--task", choices=list(DEFAULT_DATA), default="mgsm")
    ap.add_argument("--data",
                    help="local directory/file or hub dataset id (default: the task's hub dataset)")
    ap.add_argument("--langs", type=languages, default="en", help="comma-separated language codes")
    ap.add_argument("--limit", type=positive_int, help="first N problems per language")
    ap.add_argument("--no-chat", action="store_true",
                    help="raw prompts instead of the chat template")
    ap.add_argument("--num-fewshot", type=natural_int, default=0,
                    help="K solved exemplars in the problem's language before each question (mgsm; "
                         "default 0)")
    ap.add_argument("--fewshot-data",
                    help="MGSM's native exemplars: a directory or hub dataset with a "
                                           "*{lang}_train*.tsv per language (default: --data)")
    ap.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    ap.add_argument("--samples", type=positive_int, default=1,
                    help="answers per problem; above 1 also pass@K and majority-vote accuracy")
    ap.add_argument("--seed", type=natural_int, default=0, help="the samples' noise")
    shared_flags(ap, "device", "dtype", "batch-size", "max-new-tokens", "enable-thinking")
    ap.add_argument("--out", help="results directory, which must not hold an earlier evaluation "
                                  "(default: runs/eval, or runs/eval-2, -3, ... if it does)")
    args = ap.parse_args(argv)

    # Everything that can be wrong with the input is found before the first model spends minutes
    # generating.
    device = resolve_device(args.device)
    if args.samples > 1 and args.temperature == 0:
        raise ValueError(f"--samples {args.samples} at --temperature 0 would repeat one greedy "
                         f"answer; give a temperature > 0")
    if len(set(args.model)) != len(args.model):
        raise ValueError(f"--model names the same checkpoint twice: {args.model}")
    langs = args.langs
    problems = load_problems(args.task, args.data or DEFAULT_DATA[args.task], langs, args.limit)
    if args.num_fewshot and args.task != "mgsm":
        raise ValueError(f"--num-fewshot is for --task mgsm; got {args.num_fewshot} for "
                         f"{args.task}")
    shots = load_mgsm_exemplars(args.fewshot_data or args.data or DEFAULT_DATA["mgsm"], langs,
                                args.num_fewshot) \
        if args.num_fewshot else None
    for path in args.model:
        check_pretrained(path)
    out = results_dir(args.out, "runs/eval", ("scores.json", "samples.jsonl"))
    scores, sampled, samples = {}, {}, []
    for path in args.model:
        model, tokenizer = load_pretrained(path, dtype=DTYPES.get(args.dtype), device=device)
        tokenizer.template_args["enable_thinking"] = args.enable_thinking
        records = evaluate(model, tokenizer, problems, args.batch_size, args.max_new_tokens,
                           chat=not args.no_chat, label=str(path), shots=shots,
                           temperature=args.temperature, samples=args.samples, seed=args.seed)
        samples += [{"model": path, **r} for r in records]
        scores[path] = accuracy_by_language(records)
        if args.samples > 1:
            sampled[path] = sampled_scores(records, args.samples)
        del model
    write_results(out, args, scores, sampled, samples)


def write_results(out, args, scores: dict, sampled: dict, samples: list[dict]) -> None:
    """samples.jsonl and scores.json, and the tables: accuracy (pass@1), then with samples pass@K
    and maj@K."""
    with write_atomic(out / "samples.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples),
                       encoding="utf-8")
    extra = {"samples": args.samples, "temperature": args.temperature, "sampled": sampled} \
        if sampled else {}
    with write_atomic(out / "scores.json") as tmp:
        tmp.write_text(json.dumps({"task": args.task, "scores": scores, **extra}, indent=2))
    print(format_table(scores))
    for name in next(iter(sampled.values()), {}):  # pass@K, then maj@K
        print(f"\n{name}\n\n" + format_table({path: s[name] for path, s in sampled.items()}))
    print(f"wrote {out / 'scores.json'} and {out / 'samples.jsonl'}")


if __name__ == "__main__":
    run_main(main)
