"""Chat with a model: python -m pbrl.generate --model PATH_OR_ID --prompt "..."

Without --model it builds (once, cached under .cache/) a tiny random model and tokenizer, so the whole path,
checkpoint loading, chat template, KV-cached sampling and decoding, runs with no download. Its text is noise.
"""
from __future__ import annotations

import argparse
import time

import torch

from pbrl.checkpoint import load_pretrained
from pbrl.cli import positive_int, run_main
from pbrl.distributed import resolve_device
from pbrl.sampler import generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory or hub id (default: a tiny random model built locally)")
    ap.add_argument("--prompt", default="Janet has 3 apples and buys 5 more. How many apples does she have?")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=positive_int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: the checkpoint's")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = ap.parse_args(argv)

    path = args.model
    if path is None:
        from pbrl.toy import build_random_model
        path = build_random_model(".cache/pbrl/random-llama")
        print(f"[no --model given: using the tiny random model in {path}; expect noise]")
    model, tokenizer = load_pretrained(path, dtype=DTYPES.get(args.dtype), device=resolve_device(args.device))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.encode_chat(messages)
    t0 = time.perf_counter()
    out = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0, seed=args.seed)
    seconds = time.perf_counter() - t0
    print(tokenizer.decode(out.as_lists()[0]))
    n = int(out.lengths[0])
    print(f"[{len(prompt)} prompt tokens, {n} generated in {seconds:.2f}s, {n / seconds:.1f} tokens/s, "
          f"{'stopped at eos' if out.finished[0] else 'reached --max-new-tokens'}]")


if __name__ == "__main__":
    run_main(main)
