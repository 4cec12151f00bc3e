"""Chat with a model: python -m pbrl.chat --model PATH_OR_ID --prompt "..."

Without --model it builds (once, cached under .cache/) a tiny random model and tokenizer, so the
whole path, checkpoint loading, chat template, KV-cached sampling and decoding, runs with no
download. Its text is noise.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pbrl.checkpoint import load_pretrained, save_model
from pbrl.cli import (
    DTYPES,
    fraction,
    natural_int,
    nonnegative_float,
    positive_int,
    run_main,
    shared_flags,
)
from pbrl.distributed import resolve_device
from pbrl.model import random_llama
from pbrl.sampler import generate
from pbrl.tokenizer import chat_tokenizer, save_tokenizer, train_bpe

# What the demo model's tokenizer is trained on: enough text that any prompt encodes into real
# tokens.
CORPUS = ["Janet has 3 apples and buys 5 more. How many apples does she have?", "The answer is 8.",
          "Wie viel ist 12 * 7? Die Antwort lautet 84.", "La réponse est 12.", "Jibu ni 3.", "user",
          "assistant", "system", "You are a helpful assistant."] * 10


def build_random_model(out: Path, seed: int = 0) -> Path:
    """A ~1M-parameter random Llama 3 model with a small tokenizer, as a HF directory (built once,
    cached)."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    tokenizer = chat_tokenizer(train_bpe(CORPUS, vocab_size=400))
    save_tokenizer(tokenizer, out)
    bos = tokenizer.token_id("<|begin_of_text|>")
    save_model(random_llama(tokenizer.vocab_size, 128, 4, seed, bos, tokenizer.eos_id), out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model",
                    help="HF model directory or hub id (default: a tiny random model built "
                         "locally)")
    ap.add_argument("--prompt",
                    default="Janet has 3 apples and buys 5 more. How many apples does she have?")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=positive_int)
    ap.add_argument("--top-p", type=fraction)
    ap.add_argument("--seed", type=natural_int, default=0)
    shared_flags(ap, "device", "dtype", "max-new-tokens", "enable-thinking", max_new_tokens=64)
    args = ap.parse_args(argv)

    path = args.model
    if path is None:
        path = build_random_model(Path(".cache/pbrl/random-llama-v2"))
        print(f"[no --model given: using the tiny random model in {path}; expect noise]")
    model, tokenizer = load_pretrained(path, dtype=DTYPES.get(args.dtype),
                                       device=resolve_device(args.device))
    tokenizer.template_args["enable_thinking"] = args.enable_thinking
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.encode_chat(messages)
    t0 = time.perf_counter()
    out = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k,
                   top_p=args.top_p, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0,
                   seed=args.seed)
    seconds = time.perf_counter() - t0
    print(tokenizer.decode(out.as_lists()[0]))
    n = int(out.lengths[0])
    print(f"[{len(prompt)} prompt tokens, {n} generated in {seconds:.2f}s, {n / seconds:.1f} "
          f"tokens/s, {'stopped at eos' if out.finished[0] else 'reached --max-new-tokens'}]")


if __name__ == "__main__":
    run_main(main)
