"""Per-GPU memory of a training run, planned from config.json files alone (no weights are read):

    python -m pbrl.memory --config FILE --gpus N [--gpu-memory 80] [--prompt-tokens 256] [--section.key value ...]

Every term is in bytes on rank 0, which holds the most: FSDP2 gives each rank ceil(rows / N) rows of every tensor.
  exact      actor and critic parameters (fp32 masters), their gradients (fp32, kept between steps) and AdamW
             states (exp_avg, exp_avg_sq and a 4-byte step per tensor); the reference's shards in the compute
             dtype; the embedder and translator, whole in every process (reward models are not sharded)
  estimated  activations of one micro-batch (what autograd keeps, per token and layer, from the shapes) and the
             block that activation checkpointing recomputes;
             the actor gathered in the compute dtype, the KV cache and the sampling logits during rollout (with
             rollout.compile the sampler keeps its state, the KV cache included, between rollouts, and under FSDP
             the rollouts decode on a whole copy of the actor, refreshed one tensor at a time, gathered in the
             compute dtype: the cache and the copy count in every phase but the pivot's); the pivot's weights and
             KV cache on every rank while they write missing references (before the rest loads)
The peak is the largest of the phases: pivot, rollout, reward (when an instruct model translates), update.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels.logprobs import CHUNK_ELEMENTS
from pbrl.checkpoint import load_args, shard_rows
from pbrl.config import Config, load_config, validate
from pbrl.files import is_hub_id, read_json, resolve
from pbrl.model import ModelArgs, Transformer
from pbrl.pivot import PIVOT_BATCH_SIZE
from pbrl.graphs import cache_slots
from pbrl.translators import LEXICON_FILE, TRANSLATE_BATCH_SIZE

GB = 2**30
BYTES = {"float32": 4, "bfloat16": 2}


def model_args(path: str) -> ModelArgs:
    """A checkpoint's ModelArgs from its config.json alone (a hub id fetches only that file)."""
    if Path(path).exists() or not is_hub_id(path):
        return load_args(resolve(path))
    from huggingface_hub import hf_hub_download
    return ModelArgs.from_hf_config(read_json(hf_hub_download(path, "config.json")), where=f"{path}/config.json")


def parameter_shapes(args: ModelArgs, value_head: bool = False) -> list[torch.Size]:
    """The shapes of a model's parameters (a tied LM head once), from a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(args, lm_head=True, value_head=value_head)
    return [p.shape for p in model.parameters()]


def shard_bytes(shapes: list[torch.Size], world: int, itemsize: int) -> int:
    """Bytes of rank 0's shards: ceil(rows / world) rows of each tensor."""
    total = 0
    for shape in shapes:
        start, stop = shard_rows(shape[0], world=world)
        total += (stop - start) * math.prod(shape[1:])
    return total * itemsize


def full_bytes(shapes: list[torch.Size], itemsize: int) -> int:
    return sum(math.prod(s) for s in shapes) * itemsize


def kv_cache_bytes(args: ModelArgs, rows: int, tokens: int, itemsize: int) -> int:
    """The sampler's preallocated cache: keys and values of every layer for rows x tokens slots."""
    return 2 * args.num_hidden_layers * rows * tokens * args.num_key_value_heads * args.head_dim * itemsize


def _block_values(args: ModelArgs) -> int:
    """Values autograd keeps per token in one block: the two norms' input, normalised and scaled states (3H each),
    q and k before and after their rotation, q/k/v and the output of attention, the output projection's input, and
    the MLP's gate, its SiLU, up and their product (4I)."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    return 6 * h + 2 * (q + kv) + (q + 2 * kv) + 2 * q + 4 * i


def activation_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool) -> int:
    """What autograd keeps for backward through one micro-batch of `tokens` tokens: every block's activations, or
    with activation checkpointing only each block's input (H per token); plus the final norm's states (3H) and the
    hidden states the fused log-prob kernel keeps (H)."""
    h = args.hidden_size
    per_layer = h if checkpointing else _block_values(args)
    return (args.num_hidden_layers * per_layer + 4 * h) * tokens * itemsize


def transient_update_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool) -> int:
    """Alive only for a moment of the update: the one block that activation checkpointing recomputes in backward,
    and the fused log-prob kernel's [C, V] block of logits."""
    logits_block = min(tokens, max(1, CHUNK_ELEMENTS // args.vocab_size)) * args.vocab_size
    return ((_block_values(args) * tokens) if checkpointing else 0) * itemsize + logits_block * itemsize


@dataclass
class Plan:
    terms: dict[str, int] = field(default_factory=dict)     # name -> bytes on rank 0
    phases: dict[str, list[str]] = field(default_factory=dict)  # phase -> the terms alive in it

    def phase_bytes(self, phase: str) -> int:
        return sum(self.terms[t] for t in self.phases[phase])

    @property
    def peak(self) -> tuple[str, int]:
        return max(((p, self.phase_bytes(p)) for p in self.phases), key=lambda x: x[1])

    def table(self, gpu_bytes: int | None = None) -> str:
        lines = [f"{name:<40} {value / GB:8.2f} GB" for name, value in self.terms.items()]
        lines += [f"{'phase ' + phase:<40} {self.phase_bytes(phase) / GB:8.2f} GB" for phase in self.phases]
        phase, peak = self.peak
        lines.append(f"{'peak (' + phase + ')':<40} {peak / GB:8.2f} GB"
                     + (f" of {gpu_bytes / GB:.0f} GB" if gpu_bytes else ""))
        return "\n".join(lines)


def plan(cfg: Config, gpus: int, prompt_tokens: int) -> Plan:
    """The memory of cfg's run on `gpus` ranks, with prompts of up to prompt_tokens tokens."""
    m, r, p = cfg.models, cfg.rollout, cfg.ppo
    compute = BYTES["bfloat16" if m.dtype in ("auto", "bfloat16") else "float32"]
    actor = model_args(m.policy)
    actor_shapes = parameter_shapes(actor)
    out = Plan()
    trained = [("actor", actor_shapes)]
    if p.advantage == "gae":
        trained.append(("critic", parameter_shapes(model_args(m.critic or m.policy), value_head=True)))
    for name, shapes in trained:
        out.terms[f"{name} parameters (fp32)"] = shard_bytes(shapes, gpus, 4)
        out.terms[f"{name} gradients (fp32)"] = shard_bytes(shapes, gpus, 4)
        out.terms[f"{name} AdamW states"] = shard_bytes(shapes, gpus, 8) + 4 * len(shapes)
    out.terms["reference (shards)"] = shard_bytes(parameter_shapes(model_args(m.reference or m.policy)), gpus,
                                                  compute)
    rewards = []
    if cfg.reward.uses_embedder():
        out.terms["embedder (whole)"] = full_bytes(parameter_shapes(model_args(m.embedder)), compute)
        rewards.append("embedder (whole)")
    translating = cfg.reward.uses_translator() and not (Path(m.translator) / LEXICON_FILE).is_file()
    if translating:
        translator = model_args(m.translator)
        out.terms["translator (whole)"] = full_bytes(parameter_shapes(translator), compute)
        rewards.append("translator (whole)")
        # One batch of translations: the instruction (~64 tokens), the response, the translation.
        out.terms["reward: translator KV cache"] = kv_cache_bytes(
            translator, TRANSLATE_BATCH_SIZE, 64 + r.max_new_tokens + cfg.reward.translate_max_new_tokens, compute)
    rows = r.prompts_per_step // gpus * r.samples_per_prompt
    length = prompt_tokens + r.max_new_tokens
    if r.compile and (gpus > 1 or compute < 4):
        # FSDP runs: the Trainer's decoder, a whole copy of the actor kept throughout, refreshed tensor by tensor
        out.terms["actor copy for compiled rollouts"] = full_bytes(actor_shapes, compute)
        out.terms["rollout: largest actor tensor gathered"] = max(math.prod(s) for s in actor_shapes) * compute
    else:
        out.terms["rollout: actor gathered"] = full_bytes(actor_shapes, compute)
    slots = cache_slots(prompt_tokens, r.max_new_tokens) if r.compile else prompt_tokens + r.max_new_tokens
    cache = kv_cache_bytes(actor, rows, slots, compute)
    out.terms["KV cache, kept (rollout.compile)" if r.compile else "rollout: KV cache"] = cache
    out.terms["rollout: sampling logits (fp32)"] = 3 * rows * actor.vocab_size * 4
    tokens = p.micro_batch_size * length
    out.terms["update: activations kept, one micro-batch"] = activation_bytes(actor, tokens, compute,
                                                                              m.activation_checkpointing)
    out.terms["update: recomputed block, logits block"] = transient_update_bytes(actor, tokens, compute,
                                                                                 m.activation_checkpointing)
    pivot = model_args(m.pivot or m.policy)
    out.terms["pivot, whole on every rank"] = full_bytes(parameter_shapes(pivot), compute)
    out.terms["pivot KV cache"] = kv_cache_bytes(pivot, PIVOT_BATCH_SIZE, length, compute)
    resident = [t for t in out.terms if t.startswith(("actor", "critic", "reference", "KV cache"))] + rewards
    out.phases = {"pivot": ["pivot, whole on every rank", "pivot KV cache"],
                  "rollout": resident + [t for t in out.terms if t.startswith("rollout")],
                  "update": resident + [t for t in out.terms if t.startswith("update")]}
    if translating:
        out.phases["reward"] = resident + ["reward: translator KV cache"]
    return out


def check_fits(memory_plan: Plan, capacity: int) -> None:
    """A plan whose peak exceeds a GPU's memory is refused, with the breakdown that says what to change."""
    phase, peak = memory_plan.peak
    if peak > capacity:
        raise ValueError(f"the run does not fit: its peak ({phase}) is {peak / GB:.1f} GB per GPU, the GPU has "
                         f"{capacity / GB:.1f} GB. Per GPU:\n{memory_plan.table(capacity)}\nUse more GPUs, or lower "
                         f"rollout.prompts_per_step, rollout.max_new_tokens or ppo.micro_batch_size, or set "
                         f"models.activation_checkpointing true (python -m pbrl.memory tries plans)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a training config (TOML); default: the toy's")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="the longest prompt, in tokens")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    validate(cfg, args.gpus)
    result = plan(cfg, args.gpus, args.prompt_tokens)
    print(f"per GPU, {args.gpus} GPUs, prompts <= {args.prompt_tokens} tokens:")
    print(result.table(int(args.gpu_memory * GB)))
    check_fits(result, int(args.gpu_memory * GB))


if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main)
