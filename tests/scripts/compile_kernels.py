"""Compile every Triton kernel of pbrl/kernels/ for real GPUs (no GPU needed: Triton lowers to PTX
and ptxas assembles a cubin), at sm_80 and sm_90 with fp32 and bf16 inputs, and print one JSON
line per kernel with cuobjdump's register and local-memory (spill) counts. Run by
tests/test_kernels.py in a process without TRITON_INTERPRET."""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pbrl.kernels import cosine, decode, logprobs, sampling

assert os.environ.get("TRITON_INTERPRET") != "1", \
    "the interpreter replaces @triton.jit functions: unset it"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def cases(dtype: str):
    """(kernel, signature, constexprs) as the wrappers launch them at their largest blocks (a real
    vocabulary or embedding width), inputs of `dtype`."""
    x = f"*{dtype}"
    yield logprobs._logprobs_fwd_kernel, {
        "logits_ptr": x, "stride": "i64", "labels_ptr": "*i64", "logp_ptr": "*fp32",
                                          "max_ptr": "*fp32",
        "logsum_ptr": "*fp32", "entropy_ptr": "*fp32", "V": "i32", "inv_temp": "fp32",
                                          "BLOCK_V": "constexpr"}, \
        {"BLOCK_V": 4096}
    for with_entropy in (True, False):
        yield logprobs._logprobs_bwd_kernel, {
            "logits_ptr": x, "stride": "i64", "labels_ptr": "*i64", "max_ptr": "*fp32",
                                              "logsum_ptr": "*fp32",
            "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32",
                                              "grad_ptr": x,
            "grad_stride": "i64", "V": "i32", "inv_temp": "fp32", "WITH_ENTROPY": "constexpr",
            "BLOCK_V": "constexpr"}, {"WITH_ENTROPY": with_entropy, "BLOCK_V": 4096}
    for sample in (True, False):
        yield sampling._sample_kernel, {
            "logits_ptr": x, "stride": "i64", "keys_ptr": "*i32", "tokens_ptr": "*i64",
                                        "logp_ptr": "*fp32",
            "V": "i32", "inv_temp": "fp32", "SAMPLE": "constexpr", "BLOCK_V": "constexpr"}, \
            {"SAMPLE": sample, "BLOCK_V": 4096}
    for group in (4, 8):  # Llama-3.1-8B's GQA ratio, Qwen3-32B's
        yield decode._decode_split_kernel, {
            "q_ptr": x, "k_ptr": x, "v_ptr": x, "lengths_ptr": "*i64", "o_ptr": "*fp32",
            "lse_ptr": "*fp32", **{s: "i32" for s in (
                "sq_b", "sq_h", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s", "split_slots",
                "D")},
            "scale": "fp32", "GROUP": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_D": "constexpr", "UPCAST": "constexpr"}, \
            {"GROUP": group, "BLOCK_G": 16, "BLOCK_N": decode.block_n(dtype), "BLOCK_D": 128,
             "UPCAST": False}
    yield decode._decode_merge_kernel, {
        "o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": x, "so_b": "i32", "so_h": "i32",
        "splits": "i32", "D": "i32", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}, \
        {"BLOCK_S": 128, "BLOCK_D": 128}
    yield cosine._cosine_rows_kernel, {
        "a_ptr": x, "a_stride": "i64", "b_ptr": x, "b_stride": "i64", "out_ptr": "*fp32",
        "D": "i32", "BLOCK_D": "constexpr"}, {"BLOCK_D": 1024}


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    return {key.lower(): int(value) for key, value in found.items()}


for arch in (80, 90):
    for dtype in ("fp32", "bf16"):
        for fn, signature, constexprs in cases(dtype):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            print(json.dumps({"kernel": fn.__name__, "arch": f"sm_{arch}", "dtype": dtype,
                              "constexprs": {k: v for k, v in constexprs.items()},
                              "ptx_bytes": len(compiled.asm["ptx"]),
                              **resources(compiled.asm["cubin"])}))
            sys.stdout.flush()
