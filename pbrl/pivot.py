"""The pivot's English references: generate once, cache as JSONL, match to target-language problems
by id.

    python -m pbrl.pivot --model PATH_OR_ID --data DIR_OR_HUB_ID --out refs.jsonl [--limit N] \
        [--batch-size 16]
    torchrun --nproc_per_node=8 -m pbrl.pivot ...     (each rank answers its share of the problems)

Each line is {"id", "question", "reference", "answer", "pivot"}. The English question is what ties
a reference to its problem: a cache written for other problems (another data set, an edited file)
is refused, naming the first id whose question differs, rather than used. "pivot" says what wrote
the reference (the model, a hash of its config.json, the generation settings): a cache begun by one
pivot is not completed by another. The file is appended one batch at a time and flushed, so a crash
loses at most the batch in flight; a rerun skips the ids already written (a torn last line is
dropped). A writer holds a lock on the cache: a second one is refused, not interleaved.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import sys
from contextlib import contextmanager
from pathlib import Path

from pbrl import distributed as dist
from pbrl.checkpoint import load_pretrained
from pbrl.cli import Progress, positive_int, run_main, shared_flags
from pbrl.data import Problem, encode_prompt, extract_number, load_mgsm
from pbrl.files import TEXT, append_records, read_records, resolve, weights_sha256
from pbrl.model import Transformer
from pbrl.sampler import generate
from pbrl.tokenizer import Tokenizer

FIELDS = {"id": TEXT, "question": TEXT, "reference": TEXT}


def read_references(path) -> dict[str, dict]:
    """id -> record of a pivot cache (a torn last line is ignored; a repeated id is an error)."""
    return read_records(path, FIELDS)


def check_questions(records: dict[str, dict], problems: list[Problem], path) -> None:
    """Every cached reference of these problems answers the same English question."""
    for p in problems:
        if p.id in records and records[p.id]["question"] != p.question:
            raise ValueError(f"pivot cache {path}: the reference for id {p.id!r} answers another "
                             f"question ({records[p.id]['question'][:80]!r}) than the data's "
                             f"({p.question[:80]!r}); the cache was written for other problems: "
                             f"point data.pivot_cache elsewhere or delete it")


def match_references(path, problems: list[Problem]) -> dict[str, str]:
    """problem id -> reference text, for every problem; a clear error lists the ids the cache
    lacks."""
    records = read_references(path)
    check_questions(records, problems, path)
    missing = sorted({p.id for p in problems} - records.keys())
    if missing:
        shown = ", ".join(missing[:20])
        shown += f" ... ({len(missing)} in all)" if len(missing) > 20 else ""
        raise KeyError(f"pivot cache {path} has no reference for problem id(s): {shown}; "
                       f"run `python -m pbrl.pivot` to fill it")
    return {p.id: records[p.id]["reference"] for p in problems}


def pivot_writer(path_or_id, max_new_tokens: int, enable_thinking: bool) -> dict:
    """What writes a pivot cache's references, as each record keeps it ("model" says where it was
    read from; the hashes say what it is)."""
    directory = resolve(path_or_id)
    config = (directory / "config.json").read_bytes()
    return {"model": str(path_or_id), "config_sha256": hashlib.sha256(config).hexdigest()[:16],
            "weights_sha256": weights_sha256(directory), "max_new_tokens": max_new_tokens,
            "enable_thinking": enable_thinking}


def same_writer(recorded: dict, writer: dict, settings: bool = True) -> bool:
    """The same model (by its hashes: a path spelled otherwise is the same model), and with
    `settings` the same generation settings; a record older than the weights hash is judged by the
    rest."""
    keys = set(recorded) | set(writer) if settings else {"config_sha256", "weights_sha256"}
    keys -= {"model"} | ({"weights_sha256"} - set(recorded))
    return all(recorded.get(k) == writer.get(k) for k in keys)


def check_writer(records: dict[str, dict], writer: dict, path, completing: bool = True) -> None:
    """Completing a cache: every record was written by `writer`, model and generation settings
    (else the cache would mix pivots). Using a complete one: every record that names its writer
    names this model (a stronger pivot must not train against the old one's references); records
    written by hand (no writer recorded) are used as given."""
    for record in records.values():
        theirs = record.get("pivot")
        if theirs is None and not completing:
            continue
        if theirs is None or not same_writer(theirs, writer, settings=completing):
            raise ValueError(f"pivot cache {path} was {'begun' if completing else 'written'} by "
                             f"{theirs or 'a pivot it did not record'} and would be "
                             f"{'completed' if completing else 'used'} by {writer}; one cache "
                             f"holds one pivot's references: use the same model and settings, or "
                             f"point data.pivot_cache (--out) elsewhere")


@contextmanager
def writing(out: Path):
    """Rank 0 holds an exclusive lock on the cache while its run writes it; a second writer is
    refused on every rank, before it generates anything."""
    lock, refusal = None, None
    if dist.init()[0] == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.with_name(out.name + ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = f"pivot cache {out} is being written by another run; wait for it to end"
    refusal = dist.all_gather_objects(refusal)[0]
    try:
        if refusal:
            raise FileExistsError(refusal)
        yield
    finally:
        if lock is not None:
            lock.close()


def write_references(model: Transformer, tokenizer: Tokenizer, problems: list[Problem], out,
                     writer: dict, batch_size: int = 16, max_new_tokens: int = 512,
                     log=print) -> int:
    """Generate references for the problems the cache at `out` lacks (greedy, chat-formatted, native
    CoT prompt); returns how many this rank wrote. Under several ranks (a collective) each rank
    takes every world-th missing problem and appends to its own part file, `out`.rank{r}; the parts
    are merged into `out` at the end, and any parts a crashed run left (whatever its number of
    ranks) at the start, so a rerun resumes where it stopped. `writer` (pivot_writer) is recorded
    with each reference and must be the one that wrote the cache so far."""
    out = Path(out)
    with writing(out):
        return _write(model, tokenizer, problems, out, writer, batch_size, max_new_tokens, log)


def _write(model, tokenizer, problems, out: Path, writer, batch_size, max_new_tokens, log) -> int:
    rank, world, _ = dist.init()
    if rank == 0:
        _merge_parts(out, problems)
    dist.barrier()
    done = read_references(out)
    check_questions(done, problems, out)
    todo = [p for p in problems if p.id not in done]
    if todo:
        check_writer(done, writer, out)
    log(f"pivot: {len(problems) - len(todo)} of {len(problems)} references cached, {len(todo)} to "
        f"generate"
        + (f" on {world} ranks" if world > 1 else ""))
    part = out if world == 1 else out.with_name(f"{out.name}.rank{rank}")
    mine = todo[rank::world]
    bar = Progress(len(mine), "pivot" if world == 1 else f"pivot (rank 0's share of {world})",
                   " problems", enabled=rank == 0)
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, p) for p in batch]
        completions = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.stop_ids,
                               pad_id=tokenizer.pad_id or 0)
        texts = [tokenizer.decode(ids) for ids in completions.as_lists()]
        append_records(part, [{"id": problem.id, "question": problem.question, "reference": text,
                               "answer": extract_number(text), "pivot": writer}
                              for problem, text in zip(batch, texts)], FIELDS)
        bar.update(len(batch))
    bar.close()
    dist.barrier()
    if rank == 0:
        _merge_parts(out, problems)
    dist.barrier()
    return len(mine)


def _merge_parts(out: Path, problems: list[Problem]) -> None:
    """Append the records of every part file (out.rank*) that `out` lacks, in the problems' order,
    then delete the parts."""
    parts = sorted(out.parent.glob(f"{out.name}.rank*"))
    if not parts:
        return
    done = read_references(out)
    found = {}
    for part in parts:
        records = read_references(part)
        check_questions(records, problems, part)
        found.update({k: v for k, v in records.items() if k not in done})
    order = {p.id: i for i, p in enumerate(problems)}
    append_records(out, sorted(found.values(), key=lambda r: order.get(r["id"], len(order))),
                   FIELDS)
    for part in parts:
        part.unlink()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="HF model directory or hub id of the English pivot")
    ap.add_argument("--data", required=True,
                    help="MGSM directory or hub dataset id (its English problems are used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=positive_int, help="only the first N problems")
    shared_flags(ap, "device", "batch-size", "max-new-tokens", "enable-thinking")
    args = ap.parse_args(argv)
    problems = load_mgsm(args.data, ["en"])["en"][:args.limit]
    writer = pivot_writer(args.model, args.max_new_tokens, args.enable_thinking)
    done = read_references(args.out)  # checked before the model loads
    check_questions(done, problems, args.out)
    if any(p.id not in done for p in problems):
        check_writer(done, writer, args.out)
    device = dist.resolve_device(args.device)
    # under torchrun: one process group, each rank on its own GPU (LOCAL_RANK)
    with dist.process_group() as (_, _, local):
        model, tokenizer = load_pretrained(args.model,
                                           device=local if args.device == "auto" else device)
        tokenizer.template_args["enable_thinking"] = args.enable_thinking
        write_references(model, tokenizer, problems, args.out, writer, args.batch_size,
                         args.max_new_tokens, log=lambda m: print(m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    run_main(main)
