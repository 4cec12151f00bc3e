"""Decoding speed of pbrl's sampler against transformers' generate() and against the
memory-bandwidth roofline, and a rollout-shaped run with and without compaction of finished rows, in
one run on one random 125M Llama.

    python benchmarks/sampler.py [--device cpu|cuda] [--dtype float32|bfloat16] \
        [--batch-sizes 1,8,64]

1. Greedy decoding, no stop token (every row makes --new-tokens), prompts of different lengths:
   tokens/s of pbrl eager, pbrl compiled (--no-compile skips it; its first call, which compiles,
   is timed apart: ~15-25 s per batch size on a 2-core CPU) and transformers; the greedy tokens
   must be identical.
2. The roofline: a decoding step reads every weight once (the LM head included, the embedding
   matrix not), so batch-1 decoding cannot beat read bandwidth / weight bytes tokens/s. The
   bandwidth is measured in the same run, before and after the timings (the higher counts), as the
   fastest of a reduction and a matrix-vector product over a buffer far larger than the caches;
   and the batch-1 step's weight matrix products alone, back to back (the floor of a step that does
   nothing else). And the ceiling on any speed-up over transformers that runs the same matrix
   products: transformers' time / the time its matmuls take (aten mm/addmm/bmm, profiled).
3. A rollout: --prompts prompts x --samples samples at temperature 1, up to --rollout-tokens
   tokens, 1 in 80 tokens a stop token (lengths spread geometrically around ~80, as chains of
   thought of very different lengths), with compaction (pbrl's default) and without (SYNC_EVERY
   beyond the length: every row decodes to the end).
4. The training shape: batch --long-batch, prompts of 100-330 tokens, a cache of --long-slots
   slots (room for a long chain of thought), greedy, eager: seconds per decoding step of pbrl
   (attention over the filled slots: on CUDA the Triton kernel, elsewhere the slots up to the
   furthest row's) against the step before it (SDPA over every slot, masked), each step timed
   alone; tokens/s here are those of the decoding steps.
--parts picks among greedy, rollout, long (default all). Requires transformers
(requirements-test.txt). Appends its rows to benchmarks/sampler.csv.
"""
import argparse
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pbrl.sampler as sampler  # noqa: E402
from benchmarks.results import append_csv  # noqa: E402
from benchmarks.timing import best_seconds, read_bandwidth  # noqa: E402
import pbrl.model  # noqa: E402
from pbrl.checkpoint import load_model  # noqa: E402
from pbrl.cudagraphs import CudaGraphs  # noqa: E402
from pbrl.model import KVCache  # noqa: E402


@contextmanager
def every_slot():
    """The decoding step as before #29: masked SDPA over every cache slot (no kernel on CUDA, the
    whole cache on the CPU)."""
    with mock.patch.object(pbrl.model, "triton_decoding", lambda q: False), \
            mock.patch.object(KVCache, "upto", lambda self, slots: self):
        yield


def long_cache(ours, args) -> dict:
    """Part 4: seconds per eager greedy decoding step with a cache far longer than the prompts,
    attention over the filled slots against over every slot: each decoding step of a call timed
    alone (sampler.decode_step wrapped), the mean over a call's steps, the best of --repeats calls
    after a warm-up. The tokens must agree."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 32000, (int(n),), generator=g).tolist()
               for n in torch.randint(100, 331, (args.long_batch,), generator=g)]
    real_step, steps = sampler.decode_step, []

    def timed_step(*a):
        start = time.perf_counter()
        real_step(*a)
        steps.append(time.perf_counter() - start)
    step, tokens = {}, {}
    with mock.patch.object(sampler, "decode_step", timed_step):
        for name, context in (("every slot", every_slot), ("filled", nullcontext)):
            means = []
            with context():
                for _ in range(args.repeats + 1):  # the first warms up
                    steps.clear()
                    tokens[name] = sampler.generate(ours, prompts, args.new_tokens,
                                                    slots=args.long_slots).tokens
                    means.append(sum(steps) / len(steps))
            step[name] = min(means[1:])
    same, speedup = torch.equal(*tokens.values()), step["every slot"] / step["filled"]
    print(f"batch {args.long_batch}, prompts 100-330 tokens, a cache of {args.long_slots} slots, "
          f"eager: {step['filled'] * 1e3:.0f} ms per decoding step over the filled slots, "
          f"{step['every slot'] * 1e3:.0f} ms over every slot: {speedup:.2f}x; identical tokens: "
          f"{same}")
    return dict(device=args.device, dtype=args.dtype,
                run=f"eager, {args.long_slots}-slot cache, filled vs every slot",
                batch=args.long_batch, pbrl_tok_s=round(args.long_batch / step["filled"], 1),
                first_call_s="", baseline="every slot",
                baseline_tok_s=round(args.long_batch / step["every slot"], 1),
                vs_baseline=round(speedup, 2), vs_hf_ceiling="", of_roofline="", identical=same)


def weight_matmuls_step(model, device: str, repeats: int) -> float:
    """Seconds of one batch-1 step's weight matrix products alone, back to back in the model's order
    (every matrix but the embedding, the LM head included): the floor a decoding step that does
    nothing else would reach."""
    weights = [w for name, w in model.named_parameters() if w.dim() == 2 and "embed" not in name]
    inputs = {n: torch.randn(1, n, device=device, dtype=weights[0].dtype)
              for n in {w.shape[1] for w in weights}}

    def step():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
    with torch.inference_mode():
        return best_seconds(step, repeats)[0]


def matmul_seconds(fn, device) -> float:
    """Seconds that one call of fn spends in matrix multiplications (self time of aten mm/addmm/bmm;
    on CUDA the device time of the kernels each launched: the operators are CPU events, their
    kernels CUDA events)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    return sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time decoding through pbrl.cudagraphs.CudaGraphs (default: on)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rollout-tokens", type=int, default=256)
    ap.add_argument("--long-batch", type=int, default=64)
    ap.add_argument("--long-slots", type=int, default=1024)
    ap.add_argument("--parts", default="greedy,rollout,long")
    args = ap.parse_args()
    parts = args.parts.split(",")
    from transformers import LlamaConfig, LlamaForCausalLM
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d, dtype=dtype, device=args.device)
    hf = hf.to(device=args.device, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for name, p in ours.named_parameters()
                       if "embed" not in name)
    bandwidth = read_bandwidth(args.device)
    print(f"model: random Llama, {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M "
          f"parameters, {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"{weight_bytes / 1e6:.0f} MB of weights read per step; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s before the timings")
    rows, greedy = [], []
    for batch in [int(b) for b in args.batch_sizes.split(",")] if "greedy" in parts else []:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, 32000, (int(n),), generator=g).tolist()
                   for n in torch.randint(16, 48, (batch,), generator=g)]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=args.device)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            return out[:, width:].cpu()

        t_hf, tok_hf, _ = best_seconds(run_hf, args.repeats)
        with torch.inference_mode():
            ceiling = t_hf / matmul_seconds(run_hf, args.device)
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            graphs = CudaGraphs() if mode == "compiled" else None
            t, tok, first = best_seconds(
                lambda: sampler.generate(ours, prompts, args.new_tokens, graphs=graphs).tokens,
                args.repeats)
            greedy.append((batch, mode, t, first, t_hf, ceiling, torch.equal(tok, tok_hf)))
    if "greedy" in parts:
        greedy_rows(ours, args, greedy, rows, bandwidth, weight_bytes)
    if "rollout" in parts:
        rows.append(rollout(ours, args))
    if "long" in parts:
        rows.append(long_cache(ours, args))
    print(f"appended to {append_csv('sampler.csv', rows)}")


def greedy_rows(ours, args, greedy, rows, bandwidth, weight_bytes):
    """Part 2: the roofline, and part 1's rows against it."""
    bandwidth = max(bandwidth, read_bandwidth(args.device))
    roofline = bandwidth / weight_bytes
    floor = weight_matmuls_step(ours, args.device, 5 * args.repeats)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (the higher of before and after): roofline "
          f"{roofline:.1f} decoding steps/s; the weight matrices alone at batch 1, back to back: "
          f"{1 / floor:.1f} steps/s, {1 / floor / roofline:.2f} of the roofline")
    for batch, mode, t, first, t_hf, ceiling, same in greedy:
        n, of_roofline = batch * args.new_tokens, args.new_tokens / t / roofline
        rows.append(dict(device=args.device, dtype=args.dtype, run=f"greedy {mode}", batch=batch,
                         pbrl_tok_s=round(n / t, 1), first_call_s=round(first, 1),
                         baseline="transformers", baseline_tok_s=round(n / t_hf, 1),
                         vs_baseline=round(t_hf / t, 2), vs_hf_ceiling=round(ceiling, 2),
                         of_roofline=round(of_roofline, 2), identical=same))
        print(f"batch {batch:>3} {mode:>8}: pbrl {n / t:8.1f} tok/s (first call {first:5.1f} s)   "
              f"transformers {n / t_hf:8.1f} tok/s   {t_hf / t:.2f}x (ceiling with its matmuls "
              f"{ceiling:.2f}x)   {of_roofline:.2f} of the roofline's steps/s   identical: {same}")

def rollout(ours, args) -> dict:
    """Part 3: a rollout, n samples per prompt, temperature 1, lengths spread by a stop set of 1 in
    80 tokens, with compaction and without."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (int(n),), generator=g).tolist()
               for n in torch.randint(100, 200, (args.prompts,), generator=g)]
    stop_ids = list(range(7, 32000, 80))
    timings = {}
    real_sync = sampler.SYNC_EVERY
    for name, sync in (("compaction", real_sync), ("no compaction", args.rollout_tokens + 1)):
        sampler.SYNC_EVERY = sync
        timings[name], out, _ = best_seconds(lambda: sampler.generate(
            ours, prompts, args.rollout_tokens, temperature=1.0, n=args.samples, seed=0,
            stop_ids=stop_ids), max(1, args.repeats - 1))
        timings[name + " tokens"] = out.as_lists()
    sampler.SYNC_EVERY = real_sync
    same = timings["compaction tokens"] == timings["no compaction tokens"]
    lengths = out.lengths.float()
    generated = int(out.lengths.sum())
    speedup = timings["no compaction"] / timings["compaction"]
    print(f"rollout {args.prompts} prompts x {args.samples} samples, temperature 1, lengths mean "
          f"{lengths.mean():.0f} min {lengths.min():.0f} max {lengths.max():.0f} (cap "
          f"{args.rollout_tokens}): {generated / timings['compaction']:.1f} tok/s with compaction, "
          f"{generated / timings['no compaction']:.1f} without: {speedup:.2f}x; identical samples: "
          f"{same}")
    return dict(device=args.device, dtype=args.dtype, run="rollout, compaction vs none",
                batch=args.prompts * args.samples,
                pbrl_tok_s=round(generated / timings["compaction"], 1),
                first_call_s="", baseline="no compaction",
                baseline_tok_s=round(generated / timings["no compaction"], 1),
                vs_baseline=round(speedup, 2), vs_hf_ceiling="", of_roofline="",
                identical=same)


if __name__ == "__main__":
    main()
