"""Tokens/s of pbrl's KV-cached sampler vs transformers' generate() on the same random ~110M Llama model.

    python benchmarks/sampler.py [--device cpu|cuda] [--dtype float32|bfloat16] [--new-tokens 64] [--repeats 3]

Greedy, no eos (every row generates exactly --new-tokens), prompts of different lengths (left padded in both).
Checks that both produce identical tokens, prints a table and the speed ratio, and appends it to
benchmarks/sampler.csv. Requires transformers (requirements-test.txt).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import append_csv  # noqa: E402
from pbrl.checkpoint import load_model  # noqa: E402

from pbrl.sampler import generate  # noqa: E402


def timed(fn, device, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d, dtype=dtype, device=args.device)
    hf = hf.to(device=args.device, dtype=dtype)
    rows = []
    print(f"model: random Llama, {params / 1e6:.0f}M parameters, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens, greedy")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, 32000, (int(n),), generator=g).tolist()
                   for n in torch.randint(16, 48, (batch,), generator=g)]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device)

        def run_ours():
            return generate(ours, prompts, args.new_tokens).tokens

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            return out[:, width:].cpu()

        t_ours, tok_ours = timed(run_ours, args.device, args.repeats)
        t_hf, tok_hf = timed(run_hf, args.device, args.repeats)
        same = torch.equal(tok_ours, tok_hf)
        n = batch * args.new_tokens
        rows.append(dict(device=args.device, dtype=args.dtype, batch=batch, new_tokens=args.new_tokens,
                         pbrl_tok_s=round(n / t_ours, 1), hf_tok_s=round(n / t_hf, 1),
                         ratio=round(t_hf / t_ours, 2), identical=same))
        print(f"batch {batch}: pbrl {n / t_ours:8.1f} tok/s   transformers {n / t_hf:8.1f} tok/s   "
              f"ratio {t_hf / t_ours:.2f}x   identical outputs: {same}")
    print(f"appended to {append_csv('sampler.csv', rows)}")


if __name__ == "__main__":
    main()
