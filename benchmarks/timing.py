"""What the benchmarks share: wall seconds of a call with the GPU's queue drained, the best of
several calls, and the memory read bandwidth that a decoding roofline divides by."""
import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn):
    """(wall seconds of fn(), its result), the GPU's queue drained before and after."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def best_seconds(fn, repeats: int):
    """(the fewest seconds of `repeats` calls, the last result, the seconds of the warm-up call
    before them: the one that compiles)."""
    warmup, out = seconds(fn)
    best = float("inf")
    for _ in range(repeats):
        t, out = seconds(fn)
        best = min(best, t)
    return best, out, warmup


def read_bandwidth(device, repeats: int = 5, side: int = 2**14) -> float:
    """Bytes/s: the fastest read of a side x side fp32 buffer (1 GiB by default), by a full
    reduction and by a matrix-vector product over it, whichever streams memory faster here (on a
    2-core CPU MKL's GEMV read ~30% faster than torch.sum: a roofline from the sum alone would be
    one the model's own matrix products can beat)."""
    matrix = torch.ones(side, side, device=device)
    vector = torch.ones(side, device=device)
    best = min(best_seconds(fn, repeats)[0] for fn in (matrix.sum, lambda: matrix @ vector))
    return matrix.numel() * 4 / best
