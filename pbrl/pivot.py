"""The pivot's English references: generate once, cache as JSONL, match to target-language problems by id.

    python -m pbrl.pivot --model PATH_OR_ID --data DIR_OR_HUB_ID --out refs.jsonl [--limit N] [--batch-size 16]

Each line is {"id", "question", "reference", "answer"}. The file is appended one batch at a time and flushed, so a
crash loses at most the batch in flight; a rerun skips the ids already written (a torn last line is dropped).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pbrl.data import Problem, extract_number, load_mgsm, mgsm_prompt
from pbrl.model import Transformer
from pbrl.sampler import generate
from pbrl.tokenizer import Tokenizer


def read_references(path) -> dict[str, dict]:
    """id -> record of a pivot cache. A last line without its newline (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return {}
    records = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    for line_no, line in enumerate(lines[:-1], start=1):  # the part after the last newline is torn or empty
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
        if "id" not in record or "reference" not in record:
            raise ValueError(f"{path}:{line_no}: a reference needs 'id' and 'reference'")
        records[record["id"]] = record
    return records


def match_references(path, problems: list[Problem]) -> dict[str, str]:
    """problem id -> reference text, for every problem; a clear error lists the ids the cache lacks."""
    records = read_references(path)
    missing = sorted({p.id for p in problems} - records.keys())
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise KeyError(f"pivot cache {path} has no reference for problem id(s): {shown}; "
                       f"run `python -m pbrl.pivot` to fill it")
    return {p.id: records[p.id]["reference"] for p in problems}


def write_references(model: Transformer, tokenizer: Tokenizer, problems: list[Problem], out, batch_size: int = 16,
                     max_new_tokens: int = 512, log=print) -> int:
    """Generate references for the problems the cache at `out` lacks (greedy, chat-formatted, native CoT prompt);
    returns how many were written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_references(out)
    _drop_torn_line(out)
    todo = [p for p in problems if p.id not in done]
    log(f"pivot: {len(problems) - len(todo)} of {len(problems)} references cached, {len(todo)} to generate")
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": mgsm_prompt(p)}]) for p in batch]
        completions = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.stop_ids,
                               pad_id=tokenizer.pad_id or 0)
        with out.open("a", encoding="utf-8") as f:
            for problem, ids in zip(batch, completions.as_lists()):
                text = tokenizer.decode(ids)
                f.write(json.dumps({"id": problem.id, "question": problem.question, "reference": text,
                                    "answer": extract_number(text)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        n = start + len(batch)
        log(f"pivot: {n}/{len(todo)} written ({n / (time.perf_counter() - t0):.2f} problems/s)")
    return len(todo)


def _drop_torn_line(path: Path) -> None:
    """Cut a last line that lacks its newline (the write a crash interrupted), so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or hub id of the English pivot")
    ap.add_argument("--data", required=True, help="MGSM directory or hub dataset id (its English problems are used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    problems = load_mgsm(args.data, ["en"])["en"][:args.limit]
    model = Transformer.from_pretrained(args.model, device=args.device)
    write_references(model, Tokenizer.from_pretrained(args.model), problems, args.out, args.batch_size,
                     args.max_new_tokens, log=lambda m: print(m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
