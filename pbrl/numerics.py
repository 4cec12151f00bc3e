"""The toy experiment's arithmetic, the same on every x86-64 CPU with AVX2.

A float sum depends on its order, and CPU kernels choose the order by the instructions they find:
PyTorch's own kernels (ATen) by the widest vector unit, MKL's matrix products by the processor's
make and model. The toy's warm start, 1,200 optimizer steps of a tiny model, amplifies those
last-bit differences into different guesses about the target languages' verbs, and so into
different tables on different machines (docs/toy.md, "Across machines"). Before torch computes,
`pin` asks each library for its AVX2 code path, which every x86-64 CPU since 2013 runs (Intel and
AMD alike), and MKL for its strict reproducibility mode, whose matrix products do not depend on the
number of threads either.

This module imports torch only inside `describe`: `pin` runs before torch computes. Set
PBRL_TOY_NUMERICS=native to keep each library's own choice (to measure what the machine alone
changes).
"""
from __future__ import annotations

import os

PINNED = {"ATEN_CPU_CAPABILITY": "avx2",    # ATen's vectorised kernels (read at first use)
          "MKL_CBWR": "AVX2,STRICT",        # MKL's conditional numerical reproducibility
          "ONEDNN_MAX_CPU_ISA": "AVX2"}     # oneDNN (mkldnn) kernels, where torch uses them
OPT_OUT = "PBRL_TOY_NUMERICS"


def pin() -> None:
    """Ask for the AVX2 code paths in this process and every process it starts, unless
    PBRL_TOY_NUMERICS=native. Runs before torch computes anything (each library reads its setting
    once, at its first use); `pinned` says whether it took."""
    choice = os.environ.get(OPT_OUT, "pinned")
    if choice not in ("pinned", "native"):
        raise ValueError(f"{OPT_OUT}={choice!r}: expected 'pinned' (the default) or 'native'")
    if choice == "pinned":
        os.environ.update(PINNED)


def describe() -> dict[str, str]:
    """What this process computes with: ATen's code path as torch reports it, the MKL and oneDNN
    settings, the thread count, the torch version. Goes into the toy world's cache key and each
    experiment's results."""
    import torch
    return {"aten": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "-"),
            "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "-"),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__}


def pinned() -> bool:
    """Whether this process computes on the pinned AVX2 paths (torch reports AVX2 and MKL was asked
    for its strict AVX2 mode)."""
    d = describe()
    return d["aten"] == "AVX2" and d["mkl_cbwr"] == PINNED["MKL_CBWR"]


def tag() -> str:
    """A short name for this process's numerics, for the toy world's directory: '' when pinned."""
    d = describe()
    if pinned():
        return ""
    mkl = "" if d["mkl_cbwr"] == "-" else "-mkl-" + d["mkl_cbwr"].lower().replace(",", "-")
    return f"-{d['aten'].lower()}{mkl}"
