"""Time and peak memory of per-token log-probs: naive (logits, log_softmax, gather) vs pbrl's fused
paths.

    python benchmarks/logprobs.py                          # CPU: PyTorch chunked path, V=151,936
    python benchmarks/logprobs.py --device cuda            # CUDA: Triton kernels vs torch, bf16
    python benchmarks/logprobs.py --sizes 8192x1024,2048x4096 --vocab 151936

Each case (method x N x H x forward / forward+backward) runs in a fresh process on the CPU, where
peak memory is the growth of the process's peak RSS over what the inputs already hold; on CUDA,
torch.cuda.max_memory_allocated above the inputs and triton.testing.do_bench for time. Prints ratios
(naive / fused) and appends benchmarks/logprobs.csv.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pbrl import kernels  # noqa: E402
from benchmarks.results import append_csv  # noqa: E402


def naive(hidden, weight, labels):
    logits = hidden @ weight.T
    return logits.float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


def fused(hidden, weight, labels):
    return kernels.linear_token_logprobs(hidden, weight, labels)[0]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(method, n, h, v, backward, device, dtype, repeats):
    """Returns (seconds, peak extra bytes) for one case, in this process."""
    fn = {"naive": naive, "fused": fused}[method]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_(backward)
    weight = torch.randn(v, h, generator=g).to(device, dtype).requires_grad_(backward)
    labels = torch.randint(0, v, (n,), generator=g).to(device)

    def step():
        out = fn(hidden, weight, labels)
        if backward:
            out.sum().backward()
            hidden.grad = weight.grad = None
        return out

    if device == "cuda":
        import triton
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = triton.testing.do_bench(step, rep=200) / 1e3
        return seconds, torch.cuda.max_memory_allocated() - base
    base = rss_bytes()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--sizes", default="2048x1024,8192x1024,2048x4096", help="comma-separated NxH")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.case:
        c = json.loads(args.case)
        seconds, peak = run_case(c["method"], c["n"], c["h"], args.vocab, c["backward"],
                                 args.device, dtype, args.repeats)
        print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
        return
    rows = []
    print(f"V={args.vocab}, {args.device}, {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads; fused = "
          f"{'Triton' if args.device == 'cuda' else 'PyTorch chunked'} path")
    print(f"{'N':>6} {'H':>5} {'pass':>8} | {'naive s':>8} {'fused s':>8} {'time x':>7} | "
          f"{'naive MB':>9} {'fused MB':>9} {'mem /':>7}")
    for size in args.sizes.split(","):
        n, h = map(int, size.split("x"))
        for backward in (False, True):
            result = {}
            for method in ("naive", "fused"):
                case = json.dumps({"method": method, "n": n, "h": h, "backward": backward})
                cmd = [sys.executable, __file__, "--device", args.device, "--vocab",
                       str(args.vocab), "--repeats", str(args.repeats), "--case", case]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"case {case} failed:\n{done.stderr}")
                result[method] = json.loads(done.stdout.strip().splitlines()[-1])
            nv, fu = result["naive"], result["fused"]
            row = dict(device=args.device, dtype=str(dtype).removeprefix("torch."),
                       vocab=args.vocab, n=n, h=h,
                       backward=backward, naive_s=round(nv["seconds"], 4),
                       fused_s=round(fu["seconds"], 4),
                       time_ratio=round(fu["seconds"] / nv["seconds"], 2),
                       naive_mb=round(nv["peak_bytes"] / 2**20),
                       fused_mb=round(fu["peak_bytes"] / 2**20),
                       memory_reduction=round(nv["peak_bytes"] / max(fu["peak_bytes"], 1), 1))
            rows.append(row)
            print(f"{n:>6} {h:>5} {'fwd+bwd' if backward else 'fwd':>8} | "
                  f"{row['naive_s']:>8.2f} {row['fused_s']:>8.2f} "
                  f"{row['time_ratio']:>6.2f}x | {row['naive_mb']:>9} {row['fused_mb']:>9} "
                  f"{row['memory_reduction']:>6.1f}x", flush=True)
    print(f"appended to {append_csv('logprobs.csv', rows)}")


if __name__ == "__main__":
    main()
