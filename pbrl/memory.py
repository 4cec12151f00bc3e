"""Per-GPU memory of a training run, planned from config.json files alone (no weights are read):

    python -m pbrl.memory --config FILE --gpus N [--gpu-memory 80] [--prompt-tokens 256] \
        [--section.key value ...]

Every term is in bytes on rank 0, which holds the most (FSDP2 gives each rank ceil(rows / N) rows of
every tensor). Exact: the actor's and the critic's fp32 parameters and AdamW states (exp_avg,
exp_avg_sq and a 4-byte step per tensor), and their gradients during the update (they are freed
after each optimizer step); the reference's shards in the compute dtype; the embedder and
translator, whole in every process. Estimated from the shapes: the activations autograd keeps for
one micro-batch and the block activation checkpointing recomputes; during a rollout, the actor
gathered in the compute dtype (with rollout.tensor_parallel = N, 1/N of it: the twin's shards, and
1/N of the heads of a KV cache for the whole group's rows), the KV cache and the sampling logits
(with rollout.compile the sampler keeps its state between rollouts and, under FSDP, decodes on a
whole copy of the actor (or the TP shards) refreshed one tensor at a time: both count in every phase
but the pivot's); the pivot's weights and KV cache while it writes missing references, before the
rest loads. The peak is the largest phase: pivot, rollout, reward (when an instruct model
translates) or update. docs/scale.md has more.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pbrl.checkpoint import load_args
from pbrl.distributed import shard_rows
from pbrl.cli import positive_float, positive_int
from pbrl.config import Config, load_config, shared_critic, validate
from pbrl.cudagraphs import cache_slots
from pbrl.encoder import ENCODERS, EncoderArgs, dense_configs
from pbrl.files import hub_failure, is_hub_id, read_json, resolve
from pbrl.kernels.logprobs import CHUNK_ELEMENTS
from pbrl.model import ModelArgs, Transformer
from pbrl.translators import LEXICON_FILE, TRANSLATE_BATCH_SIZE

GB = 2**30
BYTES = {"float32": 4, "bfloat16": 2}


def model_args(path: str) -> ModelArgs:
    """A checkpoint's ModelArgs from its config.json alone (a hub id fetches only that file)."""
    if Path(path).exists() or not is_hub_id(path):
        return load_args(resolve(path))
    return ModelArgs.from_hf_config(hf_config(path), where=f"{path}/config.json")


def hf_config(path: str) -> dict:
    """A checkpoint's config.json (a hub id fetches only that file)."""
    if Path(path).exists() or not is_hub_id(path):
        return read_json(resolve(path) / "config.json")
    from huggingface_hub import hf_hub_download
    try:
        config = hf_hub_download(path, "config.json")
    except Exception as e:  # offline, an unknown or gated repository, a network error...
        raise FileNotFoundError(hub_failure(path, "local model directory", e)) from None
    return read_json(config)


def embedder_bytes(path: str, compute: int) -> int:
    """An embedder's weights: a decoder (pbrl's Transformer) or an encoder (pbrl/encoder.py)."""
    config = hf_config(path)
    head = dense_head_parameters(path)  # sentence-transformers' Dense modules (LaBSE's)
    if config.get("model_type") in ENCODERS:
        return (EncoderArgs.from_hf_config(config, f"{path}/config.json").parameter_count() +
                head) * compute
    return full_bytes(parameter_shapes(model_args(path)), compute) + head * compute


def dense_head_parameters(path: str) -> int:
    """The weights of the Dense modules a local sentence-transformers directory applies after its
    pooling (encoder.dense_configs; 0 for a hub id: the plan reads config.json only)."""
    if not Path(path).is_dir():
        return 0
    return sum(cfg["in_features"] * cfg["out_features"] +
               (cfg["out_features"] if cfg.get("bias", True) else 0)
               for _, cfg in dense_configs(path))


def parameter_shapes(args: ModelArgs, value_head: bool = False) -> list[torch.Size]:
    """The shapes of a model's parameters (a tied LM head once), from a model built on the meta
    device."""
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


def kv_cache_bytes(args: ModelArgs, rows: int, tokens: int, itemsize: int, tp: int = 1) -> int:
    """The sampler's preallocated cache: keys and values of every layer for rows x tokens slots,
    of the key/value heads one of `tp` tensor-parallel ranks holds."""
    per_slot = 2 * args.num_hidden_layers * args.num_key_value_heads // tp * args.head_dim
    return per_slot * rows * tokens * itemsize


COLUMNS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias",
           "v_proj.bias", "gate_proj.weight", "up_proj.weight", "lm_head.weight",
           "embed_tokens.weight")  # split by rows (dim 0) under tensor parallelism
ROWS = ("o_proj.weight", "down_proj.weight")  # split by columns (dim 1)


def tensor_parallel_bytes(args: ModelArgs, tp: int, itemsize: int) -> int:
    """Bytes of rank 0's shards of distributed.tensor_parallel_twin (a tied LM head counts as a
    weight of its own there): ceil(n / tp) of the split dimension, norms whole."""
    with torch.device("meta"):
        weights = Transformer(args).state_dict()
    total = 0
    for name, w in weights.items():
        dim = 0 if name.endswith(COLUMNS) else 1 if name.endswith(ROWS) else None
        total += w.numel() if dim is None else w.numel() // w.shape[dim] * -(-w.shape[dim] // tp)
    return total * itemsize


def _block_values(args: ModelArgs) -> int:
    """Values autograd keeps per token in one block: the two norms' input, normalised and scaled
    states (3H each), q and k before and after their rotation, q/k/v and the output of attention,
    the output projection's input, and the MLP's gate, its SiLU, up and their product (4I)."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    return 6 * h + 2 * (q + kv) + (q + 2 * kv) + 2 * q + 4 * i


def activation_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool) -> int:
    """What autograd keeps for backward through one micro-batch of `tokens` tokens: every block's
    activations, or with activation checkpointing only each block's input (H per token); plus the
    final norm's states (3H) and the hidden states the fused log-prob kernel keeps (H)."""
    h = args.hidden_size
    per_layer = h if checkpointing else _block_values(args)
    return (args.num_hidden_layers * per_layer + 4 * h) * tokens * itemsize


def transient_update_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool) -> int:
    """Alive only for a moment of the update: the one block that activation checkpointing recomputes
    in backward, and the fused log-prob kernel's [C, V] block of logits."""
    logits_block = min(tokens, max(1, CHUNK_ELEMENTS // args.vocab_size)) * args.vocab_size
    recomputed = _block_values(args) * tokens if checkpointing else 0
    return (recomputed + logits_block) * itemsize


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
        lines += [f"{'phase ' + phase:<40} {self.phase_bytes(phase) / GB:8.2f} GB"
                  for phase in self.phases]
        phase, peak = self.peak
        lines.append(f"{'peak (' + phase + ')':<40} {peak / GB:8.2f} GB"
                     + (f" of {gpu_bytes / GB:.0f} GB" if gpu_bytes else ""))
        return "\n".join(lines)


def plan(cfg: Config, gpus: int, prompt_tokens: int) -> Plan:
    """The memory of cfg's run on `gpus` ranks, with prompts of up to prompt_tokens tokens."""
    m, r, p = cfg.models, cfg.rollout, cfg.ppo
    compute = compute_bytes(cfg)
    actor = model_args(m.policy)
    out = Plan()
    actor_shapes = parameter_shapes(actor)
    trained = {"actor": actor_shapes}
    if cfg.lora.rank:  # the base in the compute dtype, frozen; the adapters train (pbrl/lora.py)
        out.terms["actor base, frozen"] = shard_bytes(actor_shapes, gpus, compute)
        trained = {"actor adapters": lora_shapes(actor, cfg.lora.rank, cfg.lora.targets)}
    if shared_critic(cfg):  # its adapters and its value head (these terms count both) on the base
        trained["critic adapters"] = \
            lora_shapes(actor, cfg.lora.rank, cfg.lora.targets) + \
            [torch.Size([1, actor.hidden_size]), torch.Size([1])]
    elif p.uses_critic():
        trained["critic"] = parameter_shapes(model_args(m.critic or m.policy), value_head=True)
    for name, shapes in trained.items():
        out.terms[f"{name} parameters (fp32)"] = shard_bytes(shapes, gpus, 4)
        # freed after each optimizer step: the update's alone
        out.terms[f"update: {name} gradients (fp32)"] = shard_bytes(shapes, gpus, 4)
        out.terms[f"{name} AdamW states"] = shard_bytes(shapes, gpus, 8) + 4 * len(shapes)
    if p.uses_reference() and not cfg.lora.rank:  # KL-free: none; LoRA: the base, adapters off
        reference = parameter_shapes(model_args(m.reference or m.policy))
        out.terms["reference (shards)"] = shard_bytes(reference, gpus, compute)
    separate = r.placement == "separate"  # the rollout ranks decode and score: rollout_rank_plan
    rewards = [] if separate else reward_terms(cfg, out, compute)
    if separate:  # the weights streamed after each update, one tensor gathered at a time
        out.terms["rollout: largest actor tensor gathered (streamed)"] = \
            max(math.prod(s) for s in actor_shapes) * compute
    if not separate or cfg.data.eval_path:  # (separate: the evaluation decodes here, counted as
        rollout_terms(cfg, out, actor, actor_shapes, gpus, prompt_tokens, compute)  # a rollout)
    tokens = p.micro_batch_tokens or p.micro_batch_size * (prompt_tokens + r.max_new_tokens)
    recompute = m.activation_checkpointing
    out.terms["update: activations kept, one micro-batch"] = \
        activation_bytes(actor, tokens, compute, recompute)
    out.terms["update: recomputed block, logits block"] = \
        transient_update_bytes(actor, tokens, compute, recompute)
    pivot_and_phases(cfg, out, rewards, prompt_tokens, compute, ("rollout", "update"))
    return out


def rollout_rank_plan(cfg: Config, prompt_tokens: int) -> Plan:
    """A rollout rank of rollout.placement separate (pbrl/pipeline.py): the actor whole in the
    compute dtype (the streamed weights land in it; compiled rollouts read it in place), its KV
    cache (kept, under rollout.compile) and sampling logits for its share of a step (its training
    ranks' shares), the reward's models, and the pivot's phase (every rank); under
    rollout.tensor_parallel its shards instead of the whole actor, and its heads of the KV cache
    of the group's rows, which it decodes together."""
    r, compute, tp = cfg.rollout, compute_bytes(cfg), cfg.rollout.tensor_parallel
    actor, out = model_args(cfg.models.policy), Plan()
    if tp == 1:
        out.terms["actor, whole (streamed weights)"] = full_bytes(parameter_shapes(actor), compute)
    else:  # the streamed tensors received whole one at a time, this rank's shard of each kept
        out.terms["actor TP shards (streamed weights)"] = tensor_parallel_bytes(actor, tp, compute)
        out.terms["rollout: largest actor tensor received"] = \
            max(math.prod(s) for s in parameter_shapes(actor)) * compute
    rewards = reward_terms(cfg, out, compute)
    rows = r.prompts_per_step // r.ranks * r.samples_per_prompt * tp  # (TP: the group's, together)
    if r.compile:  # the sampler's state kept between rollouts, one cache length for the run
        out.terms["KV cache, kept (rollout.compile)"] = kv_cache_bytes(
            actor, rows, cache_slots(prompt_tokens, r.max_new_tokens), compute, tp)
    else:
        out.terms["rollout: KV cache"] = kv_cache_bytes(
            actor, rows, prompt_tokens + r.max_new_tokens, compute, tp)
    out.terms["rollout: sampling logits (fp32)"] = 3 * rows * actor.vocab_size * 4
    pivot_and_phases(cfg, out, rewards, prompt_tokens, compute, ("rollout",))
    return out


def compute_bytes(cfg: Config) -> int:
    """Bytes per element of the compute dtype (auto: bf16, as on a GPU)."""
    return BYTES["bfloat16" if cfg.models.dtype in ("auto", "bfloat16") else "float32"]


def pivot_and_phases(cfg: Config, out: Plan, rewards: list[str], prompt_tokens: int,
                     compute: int, kinds: tuple[str, ...]) -> None:
    """The pivot's terms (it writes the missing references on every rank before the rest loads),
    then `out`'s phases: the pivot's alone; each of `kinds` (rollout, update): what stays resident
    plus the terms named after it; the translator's batch when the reward translates."""
    m, r = cfg.models, cfg.rollout
    pivot = model_args(m.pivot or m.policy)
    out.terms["pivot, whole on every rank"] = full_bytes(parameter_shapes(pivot), compute)
    out.terms["pivot KV cache"] = kv_cache_bytes(pivot, m.pivot_batch_size,
                                                 prompt_tokens + r.max_new_tokens, compute)
    resident = [t for t in out.terms if t.startswith(("actor", "critic", "reference", "KV cache"))]
    resident += [t for t in rewards if not t.startswith("reward:")]
    out.phases = {"pivot": ["pivot, whole on every rank", "pivot KV cache"],
                  **{k: resident + [t for t in out.terms if t.startswith(k)] for k in kinds}}
    if "reward: translator KV cache" in rewards:
        out.phases["reward"] = resident + ["reward: translator KV cache"]


def lora_shapes(args: ModelArgs, rank: int, targets) -> list[torch.Size]:
    """The adapters' shapes: A [rank, in] and B [out, rank] for each target projection of each
    block."""
    with torch.device("meta"):
        block = Transformer(dataclasses.replace(args, num_hidden_layers=1), lm_head=False).layers[0]
    shapes = []
    for module in block.modules():
        for name in targets:
            linear = getattr(module, name, None)
            if isinstance(linear, torch.nn.Linear):
                shapes += [torch.Size([rank, linear.in_features]),
                           torch.Size([linear.out_features, rank])]
    return shapes * args.num_hidden_layers


def reward_terms(cfg: Config, out: Plan, compute: int) -> list[str]:
    """The reward models' terms (whole in every process), added to `out`; returns their names."""
    m, added = cfg.models, []
    if cfg.reward.uses_embedder():
        out.terms["embedder (whole)"] = embedder_bytes(m.embedder, compute)
        added.append("embedder (whole)")
    if cfg.reward.uses_translator() and not (Path(m.translator) / LEXICON_FILE).is_file():
        translator = model_args(m.translator)
        out.terms["translator (whole)"] = full_bytes(parameter_shapes(translator), compute)
        # One batch of translations: the instruction (~64 tokens), the response, the translation.
        tokens = 64 + cfg.rollout.max_new_tokens + cfg.reward.translate_max_new_tokens
        out.terms["reward: translator KV cache"] = kv_cache_bytes(translator, TRANSLATE_BATCH_SIZE,
                                                                  tokens, compute)
        added += ["translator (whole)", "reward: translator KV cache"]
    return added


def rollout_terms(cfg: Config, out: Plan, actor: ModelArgs, actor_shapes, gpus: int,
                  prompt_tokens: int, compute: int) -> None:
    """The rollout's terms, added to `out`: the actor as it decodes, the KV cache, sampling
    logits."""
    r, tp = cfg.rollout, cfg.rollout.tensor_parallel
    rows = r.prompts_per_step // gpus * r.samples_per_prompt * tp  # a TP group decodes together
    largest = max(math.prod(s) for s in actor_shapes)
    if tp > 1:  # the twin's shards, refreshed tensor by tensor; kept between compiled rollouts
        kept = "actor TP shards, kept (rollout.compile)"
        out.terms[kept if r.compile else "rollout: actor TP shards"] = \
            tensor_parallel_bytes(actor, tp, compute)
        out.terms["rollout: largest actor tensor gathered"] = largest * compute
    elif r.compile and (gpus > 1 or compute < 4 or cfg.lora.rank):
        # FSDP and LoRA runs: CudaGraphs' whole copy of the actor (adapters merged), kept
        # throughout, refreshed tensor by tensor
        out.terms["actor copy for compiled rollouts"] = full_bytes(actor_shapes, compute)
        out.terms["rollout: largest actor tensor gathered"] = largest * compute
    elif not cfg.lora.rank or gpus > 1:  # (one process: a LoRA base is whole, resident already)
        adapters = lora_shapes(actor, cfg.lora.rank, cfg.lora.targets) if cfg.lora.rank else []
        out.terms["rollout: actor gathered"] = full_bytes(actor_shapes, compute) + \
            full_bytes(adapters, 4)
    if r.compile:
        slots = cache_slots(prompt_tokens, r.max_new_tokens)
        out.terms["KV cache, kept (rollout.compile)"] = kv_cache_bytes(actor, rows, slots, compute,
                                                                       tp)
    else:
        slots = prompt_tokens + r.max_new_tokens
        out.terms["rollout: KV cache"] = kv_cache_bytes(actor, rows, slots, compute, tp)
    out.terms["rollout: sampling logits (fp32)"] = 3 * rows * actor.vocab_size * 4


def check_fits(memory_plan: Plan, capacity: int) -> None:
    """A plan whose peak exceeds a GPU's memory is refused, with the breakdown that says what to
    change."""
    phase, peak = memory_plan.peak
    if peak > capacity:
        raise ValueError(f"the run does not fit: its peak ({phase}) is {peak / GB:.1f} GB per GPU, "
                         f"the GPU has {capacity / GB:.1f} GB. Per "
                         f"GPU:\n{memory_plan.table(capacity)}\nUse more GPUs, or lower "
                         f"rollout.prompts_per_step, rollout.max_new_tokens or "
                         f"ppo.micro_batch_size, or set models.activation_checkpointing true "
                         f"(python -m pbrl.memory tries plans)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a training config (TOML); default: the toy's")
    ap.add_argument("--gpus", type=positive_int, required=True)
    ap.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GB per GPU")
    ap.add_argument("--prompt-tokens", type=positive_int, default=256,
                    help="the longest prompt, in tokens")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    validate(cfg, args.gpus)
    capacity = int(args.gpu_memory * GB)
    if cfg.rollout.placement == "separate":  # two kinds of rank, each with its own plan
        training = args.gpus - cfg.rollout.ranks
        plans = {f"per training GPU, {training} of {args.gpus} GPUs, prompts <= "
                 f"{args.prompt_tokens} tokens:": plan(cfg, training, args.prompt_tokens),
                 f"per rollout GPU, {cfg.rollout.ranks} of {args.gpus}:":
                 rollout_rank_plan(cfg, args.prompt_tokens)}
        for title, result in plans.items():
            print(title)
            print(result.table(capacity))
        for result in plans.values():
            check_fits(result, capacity)
        return
    result = plan(cfg, args.gpus, args.prompt_tokens)
    print(f"per GPU, {args.gpus} GPUs, prompts <= {args.prompt_tokens} tokens:")
    print(result.table(capacity))
    check_fits(result, capacity)


if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main)
