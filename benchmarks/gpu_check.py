"""The CUDA-only checks, in one command that needs no download and writes a report.

    python benchmarks/gpu_check.py          # one CUDA GPU, ~1B random model: writes docs/gpu.md
    python benchmarks/gpu_check.py --size tiny --device cpu --out /tmp/gpu.md   # the tests' dry run

  1. kernels     each Triton kernel (fwd and bwd) against its fp32 PyTorch reference, fp32 and bf16
  2. attention   which fused kernel each attention form of the model gets (training and prefill:
                 an SDPA backend, never the math one; packed rows: FlexAttention; decoding: the
                 Triton decode-attention kernel)
     decoding    greedy tokens/s at batch 1, 64, 256 with a 1,024-slot cache, eager and compiled
                 (CUDA graphs; identical tokens checked), against the read-bandwidth roofline
                 measured in the same run
  3. precision   one AdamW step with bf16 compute over fp32 masters against the same step in fp32
  4. training    a few PPO iterations through the real Trainer (FSDP2, one GPU, bf16, activation
                 checkpointing, compiled blocks, packed micro-batches) on a random model in
                 Llama-3.2-1B's shapes: seconds per phase, the update's model-FLOPs utilisation
                 over the tokens it computes (also with eager blocks),
                 peak memory against pbrl.memory's plan (on the CPU the peak is the process's RSS)
     checkpoint  the time to save, load and export (bf16, streamed) a DCP checkpoint of its actor
     pipelined   rollout.placement separate modelled on 2 GPUs from its phases (rollout and reward
                 on one side, the rest on the other) and the weights' stream timed here (gathered
                 one tensor at a time into a whole bf16 copy): the step, each side's busy share
     lora        the same PPO run with LoRA adapters (a frozen bf16 base, GAE's critic as adapters
                 on it): its times and peak memory against the full-parameter run's and the plan;
                 decoding through the adapters unmerged against a merged copy (eager, compiled)
     decode_profile  a profiled batch-1 compiled decoding step: wall time against the GPU's busy
                 time, and the top kernels
--checks runs some of these, in its order; --update keeps the report's other sections
(docs/gpu.json). Random weights in real shapes only: throughput and memory are what they would be
for the real model, text is noise.
"""
import argparse
import contextlib
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.timing import best_seconds, read_bandwidth, seconds, sync  # noqa: E402
from pbrl import kernels  # noqa: E402
from pbrl.kernels import reference  # noqa: E402
from pbrl.kernels.dispatch import use_triton  # noqa: E402
from pbrl.kernels.sampling import sample_tokens_ref  # noqa: E402
from pbrl import sampler  # noqa: E402
from pbrl import distributed as dist  # noqa: E402
from pbrl.checkpoint import (export, load_training_checkpoint, save_model,  # noqa: E402
                             save_training_checkpoint)
from pbrl import memory  # noqa: E402
from pbrl.config import load_config  # noqa: E402
from pbrl.cudagraphs import CudaGraphs  # noqa: E402
from pbrl.model import ModelArgs, Transformer  # noqa: E402
from pbrl.tokenizer import chat_tokenizer, save_tokenizer, train_bpe  # noqa: E402
from pbrl.trainer import timed  # noqa: E402

# Llama-3.2-1B's shapes (vocab cut to what the test tokenizer needs is not allowed: keep it real)
SIZES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=512, tie_word_embeddings=True),
}
# Dense bf16 tensor-core peak of the GPUs this is likely to meet (vendor datasheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def profiled(fn, top: int = 10) -> dict:
    """fn() under torch.profiler: the GPU's busy seconds (the sum of its kernels' and copies' times)
    and the kernels that take longest, with their share of it. Only the GPU's own events count: a
    CPU-side operation carries the time of the kernels it launched (a compiled graph's call carries
    its whole CUDA graph), so adding those too would count kernels twice. Only GPU times are
    reported: the profiler slows the host down, so a wall time measured under it would mislead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    activities += [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    sync()
    with profile(activities=activities) as prof:
        fn()
        sync()
    events = [e for e in prof.key_averages()
              if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events)
    return {"gpu_busy_s": round(busy / 1e6, 4), "top": [
        {"kernel": e.key[:90], "calls": e.count, "gpu_ms": round(e.self_device_time_total / 1e3, 2),
         "share": round(e.self_device_time_total / busy, 3)}
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]]}


def check_kernels(device: torch.device) -> list[dict]:
    """Max abs error of each kernel (through kernels' dispatch: Triton on CUDA) against the fp32
    reference."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        n, h, v = 64, 256, 32000
        hidden = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g) * 0.05).to(device, dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g).to(device)
        logp, entropy = kernels.linear_token_logprobs(hidden, weight, labels, 0.7)
        (logp.sum() + entropy.sum()).backward()
        ours = (logp.detach(), entropy.detach(), hidden.grad, weight.grad)
        path = "triton" if use_triton(hidden) else "pytorch"
        h32, w32 = (x.detach().float().requires_grad_() for x in (hidden, weight))
        ref_logp, ref_entropy = reference.linear_token_logprobs_ref(h32, w32, labels, 0.7)
        (ref_logp.sum() + ref_entropy.sum()).backward()
        for name, a, b in zip(("logprobs", "entropy", "grad hidden", "grad weight"), ours,
                              (ref_logp.detach(), ref_entropy.detach(), h32.grad, w32.grad)):
            rows.append({"kernel": f"linear_token_logprobs {name}", "dtype": str(dtype)[6:],
                         "path": path, "max_abs_err": float((a.float() - b).abs().max()),
                         "scale": float(b.abs().max())})
        a, b = (torch.randn(300, 1024, generator=g).to(device, dtype) for _ in range(2))
        ours = kernels.cosine_similarity(a, b)
        ref = reference.cosine_similarity_ref(a.float(), b.float())
        rows.append({"kernel": "cosine_similarity", "dtype": str(dtype)[6:], "path": path,
                     "max_abs_err": float((ours - ref).abs().max()), "scale": 1.0})
        q = torch.randn(8, 32, 64, generator=g).to(device, dtype)
        k, v = (torch.randn(8, 8, 1100, 64, generator=g).to(device, dtype) for _ in range(2))
        lengths = torch.tensor([1, 7, 64, 65, 300, 1024, 1100, 513], device=device)
        ref = reference.decode_attention_ref(q.float(), k.float(), v.float(), lengths)
        rows.append({"kernel": "decode_attention", "dtype": str(dtype)[6:], "path": path,
                     "max_abs_err": float((kernels.decode_attention(q, k, v, lengths).float()
                                           - ref).abs().max()), "scale": float(ref.abs().max())})
        logits = (torch.randn(64, 32000, generator=g) * 3).to(device, dtype)
        keys = kernels.row_keys(torch.arange(64, device=device), 5)
        for temperature in (0.0, 1.0):
            tokens, logp = kernels.sample_tokens(logits, temperature, keys)
            ref_tokens, ref_logp = sample_tokens_ref(logits, temperature, keys)
            same = bool(torch.equal(tokens, ref_tokens))
            name = f"sample_tokens T={temperature:g} log-prob" + ("" if same else ", TOKENS DIFFER")
            error = float((logp - ref_logp).abs().max()) if same else float("inf")
            rows.append({"kernel": name, "dtype": str(dtype)[6:], "path": path, "scale": 1.0,
                         "max_abs_err": error})
    # tolerances: bf16 inputs are rounded to 8 bits of mantissa before the fp32 maths
    for row in rows:
        tolerance = 1e-3 if row["dtype"] == "float32" else 3e-2
        row["ok"] = row["max_abs_err"] <= tolerance * max(row["scale"], 1.0)
    return rows


def check_attention(model: Transformer, device: torch.device) -> list[dict]:
    """Run each attention form with SDPA's math backend switched off: a form no fused kernel takes
    raises. Training and prefill see right-padded rows (causal, no mask); packed rows (each prompt
    once, its samples' responses after it) FlexAttention's block mask, compiled; a decoding step
    the Triton decode-attention kernel (SDPA's math would not run either way)."""
    if device.type != "cuda":
        return [{"form": "all", "fused": "n/a (CPU: PyTorch picks its CPU kernels)"}]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pbrl import losses
    from pbrl.model import KVCache
    ids = torch.randint(0, model.args.vocab_size, (2, 256), device=device)
    cache = KVCache(model.args, 2, 300, torch.bfloat16, device)
    tokens = torch.cat([ids[:1].expand(4, -1), ids[1:, :64].expand(4, -1)], dim=1)
    lengths = torch.tensor([320, 300, 290, 257], device=device)
    mask = (torch.arange(319, device=device) >= 255) & (torch.arange(319, device=device)
                                                        < lengths[:, None] - 1)
    rows = []
    for form, run in {"packed rows, each prompt once": lambda: losses.packed_per_token(
            model, tokens, lengths, mask, "logprobs"), "decoding step": lambda: model.decode(
            ids[:, -1], torch.tensor([255, 200], device=device), cache)}.items():
        try:  # not SDPA: FlexAttention (compiled) and the Triton kernel
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                run()
            rows.append({"form": form, "fused": "FlexAttention, compiled" if "packed" in form
                         else "Triton decode attention"})
        except Exception as e:
            rows.append({"form": form, "fused": f"FAILED: {type(e).__name__}: {e}"[:300]})
    form = "training/prefill (right padding, no mask)"
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]), torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                model(ids, output="hidden")
            rows.append({"form": form, "fused": backend.name})
            break
        except RuntimeError:
            continue
    else:
        rows.append({"form": form, "fused": "NONE: the math fallback would run"})
    return rows


@contextlib.contextmanager
def graphs_recorded():
    """A list that gets one entry per CUDA graph recorded inside: a graph recorded again because its
    inputs moved costs a recording each time, and torch 2.13 stops graphing a function after 128 of
    them. Counted through torch's private CUDAGraphTreeManager.record_function (a diagnostic of this
    check, nothing else touches it)."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    record, recorded = CUDAGraphTreeManager.record_function, []

    def counted(self, *args, **kwargs):
        recorded.append(1)
        return record(self, *args, **kwargs)
    CUDAGraphTreeManager.record_function = counted
    try:
        yield recorded
    finally:
        CUDAGraphTreeManager.record_function = record


def check_decoding(args: ModelArgs, device: torch.device, batches: list[int],
                   new_tokens: int = 128, slots: int = 1024) -> list[dict]:
    """Greedy decoding of the random model in bf16, eager and compiled (CUDA graphs), a cache of
    `slots` slots as training's (room for a long answer; the Triton kernel reads only the filled
    ones): tokens/s per batch size, the compiled tokens checked against the eager ones, the
    decoding steps/s against the read-bandwidth roofline (the weights read once per step / the read
    bandwidth, the fastest of a reduction and a GEMV over 1 GiB, measured here), and the CUDA
    graphs recorded by the timed calls (0: they replay the first call's graphs)."""
    torch.manual_seed(0)
    model = Transformer(args).to(device, torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                       # a tied LM head reads the embeddings
                       if "embed" not in name or args.tie_word_embeddings)

    # a buffer far larger than any cache (1 GiB); 64 MiB for the dry run's tiny model
    bandwidth = read_bandwidth(device, side=2**14 if weight_bytes > 2**24 else 2**12)
    roofline = bandwidth / weight_bytes
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, args.vocab_size, (int(n),), generator=g).tolist()
                   for n in torch.randint(32, 64, (batch,), generator=g)]
        eager = None
        # CUDA graphs: CUDA only
        for mode in ("eager", "compiled") if device.type == "cuda" else ("eager",):
            graphs = CudaGraphs() if mode == "compiled" else None

            def run(graphs=graphs):
                return sampler.generate(model, prompts, new_tokens, graphs=graphs,
                                        slots=min(slots, args.max_position_embeddings)).tokens
            skips = counters["inductor"]["cudagraph_skips"]
            with graphs_recorded() as recorded:
                warmup, _ = seconds(run)
                first = len(recorded)
                t, tokens = min((seconds(run) for _ in range(3)), key=lambda r: r[0])
            eager = tokens if mode == "eager" else eager
            rows.append({"batch": batch, "mode": mode, "tok_s": round(batch * new_tokens / t, 1),
                         "of_roofline": round(new_tokens / t / roofline, 3),
                         "warmup_s": round(warmup, 1),
                         "identical_to_eager": bool(torch.equal(tokens, eager)),
                         "cuda_graph_skips": counters["inductor"]["cudagraph_skips"] - skips,
                         "graphs_recorded_later": len(recorded) - first})
            print(f"decoding: {rows[-1]}", flush=True)
    for row in rows:
        row["bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
        row["weights_gb"] = round(weight_bytes / 1e9, 2)
    return rows


def check_decode_profile(args: ModelArgs, device: torch.device, new_tokens: int = 64) -> dict:
    """Batch-1 greedy decoding through the compiled step (CUDA graphs): wall seconds per step
    against the GPU's busy seconds per step (profiled): how much of a step the host leaves the GPU
    idle, and what the GPU spends it on."""
    torch.manual_seed(0)
    model = Transformer(args).to(device, torch.bfloat16).eval()
    prompt = [torch.randint(0, args.vocab_size, (48,)).tolist()]
    graphs = CudaGraphs() if device.type == "cuda" else None
    run = lambda: sampler.generate(model, prompt, new_tokens, graphs=graphs)  # noqa: E731
    run()
    wall = min(seconds(run)[0] for _ in range(3))
    prof = profiled(run)
    return {"new_tokens": new_tokens, "wall_ms_per_step": round(wall / new_tokens * 1e3, 3),
            "gpu_busy_ms_per_step": round(prof["gpu_busy_s"] / new_tokens * 1e3, 3),
            "gpu_busy_fraction": round(prof["gpu_busy_s"] / wall, 3), "top": prof["top"]}


def check_precision(args: ModelArgs, device: torch.device) -> dict:
    """One AdamW step of a mean log-prob loss, fp32 vs bf16 compute over fp32 masters (FSDP2 mixed
    precision in a one-rank process group, as the trainer runs it): the two updates should point the
    same way, with similar size."""
    dist.init(one_rank_group=True)
    torch.manual_seed(0)
    base = Transformer(args).to(device)
    ids = torch.randint(0, args.vocab_size, (4, 128), device=device)
    updates = {}
    for name, compute in (("fp32", None), ("bf16", torch.bfloat16)):
        model = Transformer(args).to(device)
        model.load_state_dict(base.state_dict())
        dist.shard(model, compute)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        logp = model(ids[:, :-1], output="logprobs", labels=ids[:, 1:])[0]
        (-logp.mean()).backward()
        opt.step()
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        start = base.state_dict()
        updates[name] = torch.cat([(state[k].float().cpu() - start[k].float().cpu()).flatten()
                                   for k in state])
    a, b = updates["fp32"], updates["bf16"]
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    ratio = float(b.norm() / a.norm())
    return {"update_cosine": cosine, "update_norm_ratio": ratio,
            "ok": cosine > 0.9 and 0.8 < ratio < 1.25}


def check_training(args: ModelArgs, device: torch.device, steps: int,
                   work: Path, extra: dict | None = None,
                   profile: bool = True) -> tuple[dict, object]:
    """A few PPO iterations of the real Trainer on a random model in these shapes (agreement reward:
    no other model needed; the pivot cache is written from the problems' own answers), its blocks
    compiled (models.compile, on CUDA); then one more under the profiler, and one with the blocks
    run eagerly, for the compiler's gain."""
    from pbrl import toy
    from pbrl.prepare import prepare
    problems = toy.make_problems(64, __import__("random").Random(0))
    texts = [toy.render(p, lang) for p in problems for lang in toy.LANGS]
    tokenizer = chat_tokenizer(train_bpe(texts, 400))
    torch.manual_seed(0)
    ids = {"bos_token_id": tokenizer.token_id("<|begin_of_text|>"),
           "eos_token_id": tokenizer.eos_id}
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU time
        model = Transformer(ModelArgs(**{**args.__dict__, **ids}))
    save_model(model, work / "model", dtype=torch.bfloat16)
    save_tokenizer(tokenizer, work / "model")
    del model
    (work / "data").mkdir()
    for lang in ("en", "de"):
        rows = "".join(f"{toy.render(p, lang)}\t{toy.answer(p)}\n" for p in problems)
        (work / "data" / f"mgsm_{lang}.tsv").write_text(rows, encoding="utf-8")
    references = [{"id": f"mgsm-{i}", "question": toy.render(p, "en"),
                   "reference": f"The answer is {toy.answer(p)}."} for i, p in enumerate(problems)]
    (work / "pivot.jsonl").write_text("".join(json.dumps(r) + "\n" for r in references))
    small = args.hidden_size < 1024
    cuda = device.type == "cuda"
    settings = {"models.policy": work / "model", "models.dtype": "bfloat16" if cuda else "float32",
                "models.activation_checkpointing": "true", "models.compile": str(cuda).lower(),
                "data.path": work / "data", "data.langs": "de",
                "data.pivot_cache": work / "pivot.jsonl",
                "data.eval_path": "", "reward.kind": "agreement",
                "rollout.prompts_per_step": 4 if small else 16,
                "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 16 if small else 256,
                "ppo.micro_batch_tokens": 512 if small else 8192, "run.steps": steps + 2,
                "run.out_dir": work / "run",
                "run.checkpoint_every": "off", **(extra or {})}
    cfg = load_config(None,
                      [x for key, value in settings.items() for x in (f"--{key}", str(value))])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = prepare(cfg, log=lambda *a: None)
    longest = max(map(len, trainer.prompts.values()))
    predicted = memory.plan(cfg, 1, longest)
    # then one profiled and one eager iteration: run.steps = steps + 2
    last = trainer.run(steps)[-1]
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    # Update FLOPs per computed token (packed: no padding, each prompt once per micro-batch): 6
    # per parameter that multiplies (forward + backward) plus 2 for the forward that activation
    # checkpointing recomputes, per PPO epoch; the actor's tied embedding counts once (its LM
    # head), the critic's not at all (a lookup; its head is one column). Attention's own FLOPs are
    # left out.
    params = sum(p.numel() for p in trainer.actor.model.parameters())
    matmul_params = params + params - trainer.critic.model.embed_tokens.weight.numel()

    def throughput(metrics):
        """One iteration's metrics -> seconds per phase, and the update's speed."""
        real = metrics["update_tokens"] * (1 - metrics["padding"])
        flops = 8 * matmul_params * real * cfg.ppo.epochs
        speed = flops / metrics["time/update"]
        return {"phases": {k[5:]: round(v, 3) for k, v in metrics.items() if k.startswith("time/")},
                "update_s": round(metrics["time/update"], 3),
                "update_tflops": round(speed / 1e12, 1),
                "update_mfu": None if peak is None else round(speed / peak, 3)}
    sequences = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    result = {"params": params, "steps": steps,
              "micro_batch": f"up to {cfg.ppo.micro_batch_tokens} tokens packed, sequences of "
              f"{last['sequence_tokens'] / sequences:.0f} tokens on average, "
              f"{last['update_tokens']:.0f} computed per pass",
              "seconds_per_step": round(last["seconds"], 3),
              "peak_memory_gb": round(last["peak_memory_mb"] / 1024, 2),
              "planned_peak_gb": round(predicted.peak[1] / memory.GB, 2),
              "planned_peak_phase": predicted.peak[0],
              "compiled_blocks": cuda, **throughput(last), "reward": last["reward"], "device": name}
    print(f"training (the checks that follow may still fail): {result}", flush=True)
    try:  # what these add is not worth losing what was measured above
        if profile:
            result["one_iteration_profiled"] = profiled(lambda: trainer.run(1))
        if cuda:  # the same run, one more iteration with every block eager
            for model in (trainer.actor.model, trainer.critic.model, trainer.reference):
                for layer in getattr(model, "layers", []):  # (a LoRA reference: the actor)
                    layer.compiled_forward = None
            result["eager_blocks"] = throughput(trainer.run(1)[-1])
    except Exception:
        result["failed"] = traceback.format_exc(limit=-6)
    return result, trainer


def check_lora(args: ModelArgs, device: torch.device, steps: int, work: Path,
               full: dict | None, new_tokens: int, free: dict, batches: list[int]) -> dict:
    """The training check's run with LoRA (rank 16 on every projection, a frozen bf16 base; GAE's
    critic as adapters on that base, the KL reference the base with the adapters off): seconds per
    step and per update, and peak memory against the plan and against the full-parameter run of
    the same command (when it ran); then greedy decoding through the adapters
    unmerged (the actor, eager) against a copy with them merged (eager, and compiled on CUDA), at
    the decoding check's batch sizes: the choice docs/scale.md leaves to this measurement."""
    from pbrl import lora
    from pbrl.model import empty_like
    free.clear()  # the full-parameter trainer: its memory is not the LoRA run's peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    (work / "lora").mkdir()
    result, trainer = check_training(args, device, steps, work / "lora",
                                     {"lora.rank": 16, "lora.alpha": 32.0}, profile=False)
    for key in ("update_tflops", "update_mfu", "eager_blocks"):  # full-parameter FLOPs: not these
        result.pop(key, None)
    if full and not isinstance(full, str):
        result["update_s_vs_full"] = round(result["update_s"] / full["update_s"], 3)
        result["peak_vs_full"] = round(result["peak_memory_gb"] / full["peak_memory_gb"], 3)
    actor = trainer.actor.model
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if ".lora_B" in name:  # adapters away from zero, as after training
                p.normal_(std=0.01)
        merged = empty_like(actor, trainer.dtype, device)
        for name, p in merged.named_parameters():
            p.copy_(lora.whole_weight(actor, name, p.dtype))
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(0, args.vocab_size, (48,), generator=g).tolist()
                   for _ in range(batch)]
        cuda = device.type == "cuda"
        modes = [("unmerged, eager", actor, None), ("merged, eager", merged, None)] + \
            ([("merged, compiled", merged, CudaGraphs())] if cuda else [])
        for mode, model, graphs in modes:
            def run(model=model, graphs=graphs):
                return sampler.generate(model, prompts, new_tokens, graphs=graphs).tokens
            seconds(run)  # warm-up (compiles)
            t = min(seconds(run)[0] for _ in range(3))
            rows.append({"batch": batch, "mode": mode, "tok_s": round(batch * new_tokens / t, 1)})
            print(f"lora decoding: {rows[-1]}", flush=True)
    result["decoding"] = rows
    return result


def check_checkpoint(trainer, work: Path) -> dict:
    """Save, load and export (bf16, streamed) a DCP checkpoint of the trainer's actor and its AdamW
    state (fp32: 16 bytes per parameter; the critic's would double what the GPU machine's disk must
    hold)."""
    models, optimizers = {"actor": trainer.actor.model}, {"actor": trainer.actor.optimizer}
    step = trainer.step + 1
    timings = {}
    with timed(timings, "save_s"):
        ckpt = save_training_checkpoint(work / "run", step, models, optimizers, {"step": step})
    with timed(timings, "load_s"):
        load_training_checkpoint(ckpt, models, optimizers, step)
    with timed(timings, "export_bf16_s"):
        export(ckpt, work / "export", "actor", torch.bfloat16)
    return {"gb": round(sum(f.stat().st_size for f in ckpt.glob("*.distcp")) / 1e9, 2),
            **{k: round(v, 2) for k, v in timings.items()}}


ROLLOUT_SIDE = ("rollout", "reward")  # the phases a rollout rank runs; the rest are the update's


def check_pipelined(trainer, training: dict) -> dict:
    """rollout.placement separate on this one device, modelled from measurements: the training
    check's last iteration split into the rollout ranks' phases (ROLLOUT_SIDE) and the training
    ranks' (the rest), and the weights' stream timed here (each actor tensor gathered in the
    compute dtype and copied into a whole copy, one at a time: on one device a lower bound on the
    broadcast to another GPU). Two GPUs modelled: colocated, each decodes half the rows (about as
    long: decoding reads the weights) and updates on half the batch; separate (1 + 1), a step takes
    max(rollout side, training side) + stream, and each side is busy its share of that."""
    from pbrl.lora import whole_weight
    from pbrl.model import empty_like
    if isinstance(training, str):
        raise RuntimeError("the training check failed: nothing to model")
    model = trainer.actor.model
    copy = empty_like(model, trainer.dtype, trainer.device).requires_grad_(False)
    # pipeline.stream_weights' gathers, in its order, a local copy in place of its broadcast
    stream_s = best_seconds(lambda: dist.refresh(copy, model, whole_weight), 3)[0]
    phases = training["phases"]
    side = {"rollout": sum(v for k, v in phases.items() if k in ROLLOUT_SIDE),
            "training": sum(v for k, v in phases.items()
                            if k not in ROLLOUT_SIDE and k not in ("eval", "checkpoint"))}
    step = max(side["rollout"], side["training"]) + stream_s  # both sides take part in it
    return {"phases_s": phases, "rollout_side_s": round(side["rollout"], 3),
            "training_side_s": round(side["training"], 3), "stream_s": round(stream_s, 4),
            "stream_mb": round(sum(t.nbytes for t in copy.state_dict().values()) / 1e6, 2),
            "modelled_2_gpus": {"colocated_s": round(side["rollout"] + side["training"] / 2, 3),
                                "separate_s": round(step, 3),
                                "rollout_busy": round(side["rollout"] / step, 3),
                                "training_busy": round(side["training"] / step, 3)}}


SECTIONS = {  # key: (title, how its result renders)
    "kernels": ("Kernels vs fp32 references", lambda rows: [
        "| kernel | dtype | ran | max abs error | ok |", "|---|---|---|---|---|",
        *(f"| {r['kernel']} | {r['dtype']} | {r['path']} | {r['max_abs_err']:.2e} | {r['ok']} "
          f"|" for r in rows)]),
    "attention": ("Attention backend (math fallback switched off)", lambda rows: [
        "| form | fused kernel |", "|---|---|", *(f"| {r['form']} | {r['fused']} "
                                                  f"|" for r in rows)]),
    "precision": ("bf16 compute over fp32 masters vs fp32, one AdamW step", lambda r: [
        f"update cosine {r['update_cosine']:.4f}, norm ratio {r['update_norm_ratio']:.3f}, ok "
        f"{r['ok']}"]),
    "training": ("PPO iterations (Trainer, FSDP2, one device)",
                 lambda r: ["```json", json.dumps(r, indent=1), "```"]),
    "decoding": ("Greedy decoding, bf16, eager vs compiled (CUDA graphs)", lambda rows: [
        "| batch | mode | tokens/s | of roofline | first call (s) | identical to eager | "
        "CUDA-graph skips | graphs recorded by the 3 timed calls |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['batch']} | {r['mode']} | {r['tok_s']} | {r['of_roofline']} | {r['warmup_s']} | "
          f"{r['identical_to_eager']} | {r.get('cuda_graph_skips', '-')} | "
          f"{r.get('graphs_recorded_later', '-')} |"
          for r in rows),
        *(["", f"Roofline: {rows[0]['weights_gb']} GB of weights per step at a measured "
               f"{rows[0]['bandwidth_gb_s']} GB/s."] if rows else [])]),
    "decode_profile": ("Where a batch-1 compiled decoding step's time goes", lambda r: [
        "```json", json.dumps(r, indent=1), "```"]),
    "checkpoint": ("Training checkpoint (DCP: actor and its AdamW state) of the PPO run",
                   lambda r: [
        "```json", json.dumps(r, indent=1), "```"]),
    "pipelined": ("Separate rollout ranks, modelled from this device's phases and stream",
                  lambda r: ["```json", json.dumps(r, indent=1), "```"]),
    "lora": ("LoRA: the PPO run with adapters (rank 16), and decoding merged vs unmerged",
             lambda r: ["```json", json.dumps(r, indent=1), "```"]),
}


def report(sections: dict) -> str:
    """The markdown report: each section with the run that measured it; a failure shows its
    error."""
    lines = ["# GPU check", "",
             "Written by `benchmarks/gpu_check.py`; each section names the run that measured it.",
             ""]
    for key, (title, render) in SECTIONS.items():
        lines.extend([f"## {title}", ""])
        if key not in sections:
            lines.extend(["not run yet", ""])
            continue
        env, result = sections[key]["env"], sections[key]["result"]
        took = f"; this check took {env['seconds']:.0f} s" if env.get("seconds") is not None else ""
        lines.extend([f"`{env['command']}` on {env['device']} (torch {env['torch']}, triton "
                      f"{env['triton']}), {env['date']}{took}.", ""])
        failed = isinstance(result, str)
        lines.extend(["FAILED:", "```", result, "```"] if failed else render(result))
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-batches", default="1,64,256",
                    help="batch sizes of the decoding check")
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="tokens each decoding check generates (the profiled one half of them)")
    ap.add_argument("--checks", default=",".join(SECTIONS),
                    help="which checks to run, in this order (checkpoint and pipelined need "
                    "training, and run before lora, which frees it)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "gpu.md"),
                    help="the report; its results are kept beside it as JSON, and a later run with "
                         "--update replaces only the sections it runs")
    ap.add_argument("--update", action="store_true")
    args = ap.parse_args(argv)
    checks = args.checks.split(",")
    unknown = set(checks) - set(SECTIONS)
    after_training = [c for c in ("checkpoint", "pipelined") if c in checks]
    late = "lora" in checks and any(checks.index("lora") < checks.index(c) for c in after_training)
    if unknown or late or (after_training and "training" not in checks):
        ap.error(f"--checks takes some of {', '.join(SECTIONS)} (checkpoint and pipelined with "
                 f"training, before lora); got {args.checks}")
    import triton
    device = dist.resolve_device(args.device)
    model_args = ModelArgs(**SIZES[args.size])
    batches = [int(b) for b in args.decode_batches.split(",")]
    given = argv if argv is not None else sys.argv[1:]
    cuda = device.type == "cuda"
    env = {"command": "python benchmarks/gpu_check.py " + " ".join(given),
           "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d")}
    out, store = Path(args.out), Path(args.out).with_suffix(".json")
    sections = json.loads(store.read_text()) if args.update and store.exists() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    trained = {}

    def training():
        result, trained["trainer"] = check_training(model_args, device, args.steps, work)
        return result
    run_check = {
        "kernels": lambda: check_kernels(device),
        "attention": lambda: check_attention(Transformer(model_args).to(device).eval(), device),
        "precision": lambda: check_precision(ModelArgs(**SIZES["tiny"]), device),
        "training": training,
        "decoding": lambda: check_decoding(model_args, device, batches, args.new_tokens),
        "decode_profile": lambda: check_decode_profile(model_args, device, args.new_tokens // 2),
        "checkpoint": lambda: check_checkpoint(trained["trainer"], work),
        "pipelined": lambda: check_pipelined(trained["trainer"],
                                             sections.get("training", {}).get("result")),
        "lora": lambda: check_lora(model_args, device, args.steps, work,
                                   sections.get("training", {}).get("result"),
                                   args.new_tokens, free=trained, batches=batches),
    }
    failed = False
    try:
        for key in checks:
            # A failure is reported and the next check still runs; the report is rewritten after
            # each check, so a run cut short still leaves what it measured.
            t0 = time.perf_counter()
            try:
                result = run_check[key]()
            # the report shows the error; the checks after it are still worth running
            except Exception:
                result, failed = traceback.format_exc(limit=-6), True
            print(f"{key}: {result}", flush=True)
            sections[key] = {"env": {**env, "seconds": time.perf_counter() - t0}, "result": result}
            store.write_text(json.dumps(sections, indent=1))
            out.write_text(report(sections))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")
    dist.shutdown()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
