"""Kernels against their PyTorch references (pbrl/kernels/reference.py) and an fp32 reference, on
both backends: 'triton' runs the real Triton kernels (in interpreter mode on the CPU,
TRITON_INTERPRET=1 set by conftest), 'torch' the chunked PyTorch path the CPU uses without the
interpreter."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pbrl import kernels
from pbrl.kernels.logprobs import _backward, _forward
from pbrl.kernels.reference import (cosine_similarity_ref, linear_token_logprobs_ref,
                                    token_logprobs_ref)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    assert kernels.dispatch.triton is not None, "triton must be installed for the kernel tests"
    use = request.param == "triton"
    for module in (kernels.logprobs, kernels.cosine):
        monkeypatch.setattr(module, "use_triton", lambda t: use)
    return request.param


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def row_logprobs(logits, labels, temperature=1.0):
    """The row kernels alone, as linear_token_logprobs runs them on each block of logits."""
    logp, entropy, _, _ = _forward(logits, labels, 1.0 / temperature)
    return logp, entropy


def row_gradient(logits, labels, temperature, grad_logp, grad_entropy):
    """The row kernels' gradient of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. the
    logits."""
    logp, entropy, m, log_s = _forward(logits, labels, 1.0 / temperature)
    return _backward(logits, labels, m, log_s, entropy, grad_logp, grad_entropy, 1.0 / temperature,
                     out=torch.empty_like(logits))


# Tolerances: fp32 kernels agree with the fp32 reference to float rounding over a log-sum-exp of up
# to ~150K terms.
LOGP_ATOL = 2e-5


@pytest.mark.parametrize("n,v", [(1, 7), (5, 1000), (3, 4097), (2, 151_936), (2, 128_256)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_row_kernels_match_reference(backend, n, v, temperature):
    logits = torch.randn(n, v, generator=gen(v)) * 4
    labels = torch.randint(0, v, (n,), generator=gen(n))
    logp, entropy = row_logprobs(logits, labels, temperature)
    ref_logp, ref_entropy = token_logprobs_ref(logits.double(), labels, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert torch.allclose(logp.double(), ref_logp, atol=LOGP_ATOL, rtol=0)
    assert torch.allclose(entropy.double(), ref_entropy, atol=LOGP_ATOL, rtol=1e-5)
    assert (logp <= 0).all() and (entropy >= 0).all()


def test_row_kernels_bf16_input_accumulates_in_fp32(backend):
    """bf16 logits: the kernel must be as accurate as the fp32 reference run on the same
    (bf16-rounded) values."""
    logits = (torch.randn(4, 50_000, generator=gen(1)) * 3).bfloat16()
    labels = torch.randint(0, 50_000, (4,), generator=gen(2))
    logp, entropy = row_logprobs(logits, labels, 0.8)
    ref_logp, ref_entropy = token_logprobs_ref(logits.double(), labels, 0.8)
    assert torch.allclose(logp.double(), ref_logp, atol=LOGP_ATOL)
    assert torch.allclose(entropy.double(), ref_entropy, atol=LOGP_ATOL)


EXTREMES = {
    "all -1e4": torch.full((2, 3000), -1e4),
    "all +1e4": torch.full((2, 3000), 1e4),
    "one huge logit": torch.zeros(2, 3000).index_fill_(1, torch.tensor([17]), 1e4),
    "ties at the max": torch.zeros(2, 3000).index_fill_(1, torch.tensor([5, 2999]), 50.0),
    "huge spread": torch.linspace(-1e4, 1e4, 6000).reshape(2, 3000),
}


@pytest.mark.parametrize("case", EXTREMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, case, dtype):
    logits = EXTREMES[case].to(dtype)
    labels = torch.tensor([17, 5])
    logp, entropy = row_logprobs(logits, labels, 1.0)
    ref_logp, ref_entropy = token_logprobs_ref(logits.double(), labels)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all() and (entropy >= 0).all()
    assert torch.allclose(logp.double(), ref_logp, atol=1e-4)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_kernels_gradient(backend, temperature, with_entropy):
    logits = (torch.randn(6, 3001, generator=gen(3)) * 2).requires_grad_()
    labels = torch.randint(0, 3001, (6,), generator=gen(4))
    w_logp, w_ent = torch.randn(6, generator=gen(5)), torch.randn(6, generator=gen(6))
    logp, entropy = token_logprobs_ref(logits, labels, temperature)
    loss = (w_logp * logp).sum() + ((w_ent * entropy).sum() if with_entropy else 0)
    ref, = torch.autograd.grad(loss, logits)
    grad = row_gradient(logits.detach(), labels, temperature, w_logp,
                        w_ent if with_entropy else None)
    # fp32 throughout; per-element gradients are ~1e-4
    assert torch.allclose(grad, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("n,h,v", [(1, 16, 11), (37, 24, 1000), (5, 8, 151_936)])
def test_linear_token_logprobs_forward_and_gradients(backend, monkeypatch, n, h, v):
    # several token chunks even at small N
    monkeypatch.setattr(kernels.logprobs, "CHUNK_ELEMENTS", 4 * v)
    hidden = torch.randn(n, h, generator=gen(7)).requires_grad_()
    weight = (torch.randn(v, h, generator=gen(8)) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen(9))
    w_logp, w_ent = torch.randn(n, generator=gen(10)), torch.randn(n, generator=gen(11))
    logp, entropy = kernels.linear_token_logprobs(hidden, weight, labels, 0.9)
    ref_logp, ref_entropy = linear_token_logprobs_ref(hidden, weight, labels, 0.9)
    assert (torch.allclose(logp, ref_logp, atol=LOGP_ATOL)
            and torch.allclose(entropy, ref_entropy, atol=LOGP_ATOL))
    grads = torch.autograd.grad((w_logp * logp).sum() + (w_ent * entropy).sum(), (hidden, weight))
    refs = torch.autograd.grad((w_logp * ref_logp).sum() + (w_ent * ref_entropy).sum(),
                               (hidden, weight))
    for g, r in zip(grads, refs):  # fp32; sums over up to N or V terms
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)


def test_linear_token_logprobs_bf16_is_as_accurate_as_the_bf16_reference(backend):
    """Liger's criterion: |kernel - fp32 ref| is no worse than |reference in bf16 - fp32 ref| (plus
    slack)."""
    hidden = torch.randn(16, 64, generator=gen(12))
    weight = torch.randn(5000, 64, generator=gen(13)) * 0.2
    labels = torch.randint(0, 5000, (16,), generator=gen(14))
    exact = linear_token_logprobs_ref(hidden.double(), weight.double(), labels)[0]
    kernel = kernels.linear_token_logprobs(hidden.bfloat16(), weight.bfloat16(), labels)[0].double()
    ref_bf16 = linear_token_logprobs_ref(hidden.bfloat16(), weight.bfloat16(), labels)[0].double()
    assert (kernel - exact).abs().max() <= (ref_bf16 - exact).abs().max() + 1e-3


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any operation produces (the Triton
    interpreter's host copies are byte tensors, hence bytes rather than elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_linear_token_logprobs_never_holds_all_logits(backend, monkeypatch):
    n, h, v = 64, 8, 1000
    monkeypatch.setattr(kernels.logprobs, "CHUNK_ELEMENTS", 8 * v)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    with LargestTensor() as probe:
        logp, entropy = kernels.linear_token_logprobs(hidden, weight, torch.randint(0, v, (n,)))
        (logp.sum() + entropy.sum()).backward()
    assert probe.largest <= 8 * v * 4 < n * v * 4  # one fp32 chunk of 8 tokens' logits, not all 64


def test_bad_inputs_are_clear_errors():
    eye = torch.eye(10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got values in \[0, 10\]"):
        kernels.linear_token_logprobs(torch.zeros(2, 10), eye, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[2\]"):
        kernels.linear_token_logprobs(torch.zeros(2, 10), eye, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kernels.linear_token_logprobs(torch.zeros(2, 10), eye, torch.tensor([0, 1]),
                                      temperature=0.0)
    with pytest.raises(ValueError, match=r"need hidden \[N, H\] and weight \[V, H\]"):
        kernels.linear_token_logprobs(torch.zeros(2, 4), torch.zeros(10, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cosine similarity needs \[N, D\] and \[N, D\]"):
        kernels.cosine_similarity(torch.zeros(2, 4), torch.zeros(3, 4))


# --------------------------------------------------------------------------------------------------
# Cosine similarity
# --------------------------------------------------------------------------------------------------
def fp64_cosine(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("n,d", [(1, 3), (7, 1000), (33, 1024), (5, 2500)])
def test_cosine_rowwise(backend, n, d):
    a = torch.randn(n, d, generator=gen(n))
    b = torch.randn(n, d, generator=gen(d))
    assert torch.allclose(kernels.cosine_similarity(a, b).double(), fp64_cosine(a, b), atol=1e-6)


def test_cosine_zero_vectors_and_extreme_norms(backend):
    """Zero rows give 0 (not NaN); scale never matters, from 1e-38 to 1e38 entries."""
    base_a, base_b = torch.randn(6, 64, generator=gen(2)), torch.randn(6, 64, generator=gen(3))
    exact = fp64_cosine(base_a, base_b)
    a, b = base_a.clone(), base_b.clone()
    a[0] = 0                      # zero vs random
    a[1], b[1] = 0, 0             # zero vs zero
    a[2] *= 1e30                  # squares overflow fp32 without scaling
    b[3] *= 1e-30                 # squares underflow fp32 without scaling
    a[4], b[4] = base_a[4] * 1e-38, base_b[4] * 1e37  # subnormal-adjacent vs near max
    for got in (kernels.cosine_similarity(a, b), cosine_similarity_ref(a, b)):
        assert torch.isfinite(got).all()
        assert got[0] == 0 and got[1] == 0
        assert torch.allclose(got[2:].double(), exact[2:], atol=1e-5)


def test_cosine_bf16_input(backend):
    a = torch.randn(9, 300, generator=gen(4)).bfloat16()
    b = torch.randn(9, 300, generator=gen(5)).bfloat16()
    got = kernels.cosine_similarity(a, b)
    assert got.dtype == torch.float32
    # exact on the bf16 values: fp32 accumulation
    assert torch.allclose(got.double(), fp64_cosine(a, b), atol=1e-6)


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    """The interpreter is lenient; ptxas is not. Each kernel is compiled for real (PTX and cubin, no
    GPU needed) with fp32 and bf16 inputs, at the largest blocks the wrappers launch; cuobjdump must
    show no local memory (where spilled registers go) and at most 255 registers. (The bf16-logits
    forward kernel gets an 8-byte stack frame at sm_90 from Triton's ptxas call; ptxas -v on its PTX
    reports 0 spill stores and loads.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "compile_kernels.py")],
                          cwd=root,
                          env={**env, "PYTHONPATH": str(root), "TRITON_DEFAULT_FP_FUSION": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    kernels_compiled = {(r["kernel"], r["arch"], r["dtype"]) for r in rows}
    for name in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_cosine_rows_kernel",
                 "_sample_kernel", "_decode_split_kernel", "_decode_merge_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert {(name, arch, "fp32"), (name, arch, "bf16")} <= kernels_compiled
    for r in rows:
        assert r["local"] == 0 and 0 < r["reg"] <= 255, r
        assert r["stack"] == 0 or not r["kernel"].startswith("_decode"), r


# --------------------------------------------------------------------------------------------------
# Sampling: the Triton kernel (interpreter) against its PyTorch specification, and the specification
# against softmax
# --------------------------------------------------------------------------------------------------
@pytest.mark.triton_sampling
@pytest.mark.parametrize("vocab", [7, 4099, 50_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_sampling_kernel_equals_its_reference(vocab, dtype, temperature):
    from pbrl.kernels.sampling import row_keys, sample_tokens, sample_tokens_ref
    assert kernels.sampling.use_triton(torch.empty(1))  # the interpreter runs the kernel here
    logits = (torch.randn(6, vocab, generator=gen(vocab)) * 3).to(dtype)
    keys = row_keys(torch.tensor([0, 1, 2, -5, 2**40 + 3, 123456789]), 17)
    tokens, logp = sample_tokens(logits, temperature, keys)
    ref_tokens, ref_logp = sample_tokens_ref(logits, temperature, keys)
    assert torch.equal(tokens, ref_tokens)
    # the fp32 reference's own log_softmax is off by ~1.1e-5 at 50,000 tokens (AVX2 kernels,
    # against fp64); the kernel's online log-sum-exp, by < 1e-6: it is held to fp64
    assert torch.allclose(logp, ref_logp, atol=3e-5, rtol=0)
    exact = (logits.double() / (temperature or 1.0)).log_softmax(-1)
    exact = exact.gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logp.double(), exact, atol=2e-6, rtol=0)  # and against fp64
    if temperature == 0:
        assert torch.equal(tokens, logits.float().argmax(-1))


@pytest.mark.triton_sampling
# the interpreter's numpy on -inf - -inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_sampling_kernel_ignores_masked_tokens():
    from pbrl.kernels.sampling import row_keys, sample_tokens, sample_tokens_ref
    logits = torch.full((3, 5000), float("-inf"))
    logits[:, 4500] = 1.0
    logits[1, 10] = 0.0   # the first block holds one finite logit, the others none
    tokens, logp = sample_tokens(logits, 1.0, row_keys(torch.arange(3), 0))
    assert set(tokens.tolist()) <= {10, 4500} and torch.equal(tokens, sample_tokens_ref(
        logits, 1.0, row_keys(torch.arange(3), 0))[0])
    assert torch.isfinite(logp).all() and logp[0] == 0 and logp[2] == 0


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * len(tokens)
    observed = torch.bincount(tokens, minlength=len(probs)).double()
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.triton_sampling
def test_counter_based_noise_draws_from_softmax():
    """Pearson's chi-square of 60,000 draws on a 6-token vocabulary, over rows (seeds) and over
    decoding steps of one seed: 5 degrees of freedom, below 20.5 with probability 0.999 for an exact
    sampler. The kernel takes the same draws (first 300 rows)."""
    from pbrl.kernels.sampling import row_keys, sample_tokens, sample_tokens_ref
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
    n = 60_000
    for temperature in (1.0, 0.6):
        probs = (logits.double() / temperature).softmax(-1)
        by_seed = row_keys(torch.arange(n) * 2654435761, 0)
        by_step = row_keys(torch.full((n,), 42), torch.arange(n))
        for keys in (by_seed, by_step):
            tokens, _ = sample_tokens_ref(logits.expand(n, 6), temperature, keys)
            assert chi_square(tokens, probs) < 20.5
        assert torch.equal(sample_tokens(logits.expand(300, 6), temperature, by_seed[:300])[0],
                           sample_tokens_ref(logits.expand(300, 6), temperature, by_seed[:300])[0])


def test_noise_hash_equals_a_plain_python_uint32_hash():
    """The int32 emulation of the uint32 hash (wrapping multiplies, masked shifts) against Python
    integers."""
    import math

    from pbrl.kernels.sampling import gumbel_noise, row_keys

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    seeds = [0, 1, -1, 2**40 + 3, -(2**62) + 12345, 2**63 - 1]
    keys = row_keys(torch.tensor(seeds), 77)
    for seed, key in zip(seeds, keys.tolist()):
        expected = mix(mix((seed & 0xFFFFFFFF) ^ mix(77)) ^ ((seed >> 32) & 0xFFFFFFFF))
        assert key & 0xFFFFFFFF == expected
    noise = gumbel_noise(keys, 5000)
    for row, key in enumerate(keys.tolist()):
        for token in (0, 1, 777, 4999):
            u = ((mix(token ^ (key & 0xFFFFFFFF)) >> 8) + 0.5) / 2**24
            # fp32 logs
            assert noise[row, token].item() == pytest.approx(-math.log(-math.log(u)), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Decode attention: the Triton kernel (interpreter) against its PyTorch specification, and the
# specification against attention written out per row in fp64
# --------------------------------------------------------------------------------------------------
def per_row_attention(q, k, v, lengths):
    """Each row and head alone: softmax over its first lengths[b] slots, in fp64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for b, n in enumerate(lengths.tolist()):
        for h in range(q.shape[1]):
            keys, values = k[b, h // group, :n].double(), v[b, h // group, :n].double()
            weights = (keys @ q[b, h].double() / q.shape[-1] ** 0.5).softmax(0)
            out[b, h] = weights @ values
    return out


@pytest.mark.parametrize("heads, kv_heads, dim, slots, dtype", [
    (4, 4, 8, 40, torch.float32), (8, 2, 64, 300, torch.bfloat16),
    (6, 1, 16, 129, torch.float32), (32, 8, 128, 70, torch.bfloat16)])
def test_decode_attention_kernel_reads_each_rows_filled_slots(heads, kv_heads, dim, slots, dtype,
                                                              monkeypatch):
    """Rows of length 1, of every slot, and in between; GQA ratios 1-6; head widths that are and
    are not powers of 2; many splits (PROGRAMS high) and one. Slots past a row's length hold NaN:
    the kernel must never read them."""
    from pbrl.kernels.decode import decode_attention
    from pbrl.kernels.reference import decode_attention_ref
    rows = 5
    g = gen(slots)
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads, slots, dim, generator=g).to(dtype) for _ in range(2))
    lengths = torch.tensor([1, slots, slots // 2, 65, 2]).clamp(max=slots)
    expected = per_row_attention(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    reference = decode_attention_ref(q, k.nan_to_num(), v.nan_to_num(), lengths)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else \
        {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(reference.double(), expected, **tolerance)
    for programs in (1, 10_000):  # one split per row and head; as many as there are blocks
        monkeypatch.setattr(kernels.decode, "PROGRAMS", programs)
        out = decode_attention(q, k, v, lengths)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), expected, **tolerance)


def test_decode_attention_refuses_mismatched_shapes():
    from pbrl.kernels.decode import decode_attention
    q, k = torch.zeros(2, 6, 8), torch.zeros(2, 4, 10, 8)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        decode_attention(q, k, k, torch.ones(2, dtype=torch.long))


def test_decoding_through_the_kernel_samples_what_sdpa_samples(monkeypatch):
    """The model's decoding step with the kernel (as on CUDA; here the interpreter) against SDPA
    over the slots up to the furthest row's: the same tokens at temperature 1 and log-probs to fp32
    rounding, prompts of different lengths, a cache of 100 slots (two splits of 64)."""
    import pbrl.model
    from pbrl.model import random_llama
    from pbrl.sampler import generate
    model = random_llama(64, 32, 2, seed=3)
    prompts = [[1, 5, 9], [2] * 11]
    runs = []
    for kernel in (False, True):
        monkeypatch.setattr(pbrl.model, "triton_decoding", lambda q: kernel)
        runs.append(generate(model, prompts, 6, temperature=1.0, n=2, seed=5, slots=100))
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[1].logprobs, runs[0].logprobs, rtol=1e-5, atol=1e-5)
