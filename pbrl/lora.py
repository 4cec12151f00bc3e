"""LoRA (Hu et al. 2021), hand-written: a frozen base and, beside each target projection, a low-rank
update B A scaled by alpha / rank that alone trains.

    y = W x + (alpha / r) B (A x)      W [out, in] frozen, A [r, in] random, B [out, r] zero

A starts as PEFT initialises it (Kaiming uniform) and B at zero, so the model starts as the base.
The base stays in the compute dtype with no gradient and no optimizer state; A and B are fp32 and
trained by AdamW; under FSDP2 both are sharded in the same units, each gathered in its own dtype.
With the adapters switched off the model *is* the base: the KL reference without a second model
(`AdaptersOff`); and GAE's critic can be a second set of adapters with the value head on the same
base, selected per pass (`selected`): actor, critic and reference hold one copy of the weights.
Decoding copies (rollout.compile's, rollout.tensor_parallel's twin) hold the merged weights
(`whole_weight`). Checkpoints of what trains, and the exports (the merged model, and the adapters
alone in PEFT's layout), are pbrl/checkpoint.py's (`lora_settings`, `export_lora`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pbrl.distributed import shard_rows, whole_parameter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale B A, summed in fp32, in W's dtype: the weight an adapted projection computes."""
    return (w.float() + scale * (b @ a)).to(w.dtype)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus trained low-rank updates: the actor's (lora_A, lora_B) and,
    for a critic on the same base, the critic's (critic_A, critic_B). `active` says which one a
    pass adds: "actor" (the default), "critic", or None (the base alone). Built uninitialised:
    `init_adapters` draws them."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A, self.lora_B = self.new_pair(rank)
        self.scale, self.active = alpha / rank, "actor"

    def new_pair(self, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
        """A [rank, in] and B [out, rank], fp32, on the base's device (meta when built to shard)."""
        device = self.base.weight.device
        return (nn.Parameter(torch.empty(rank, self.base.in_features, device=device)),
                nn.Parameter(torch.empty(self.base.out_features, rank, device=device)))

    def forward(self, x):
        y = self.base(x)
        if self.active is None:
            return y
        a, b = (self.lora_A, self.lora_B) if self.active == "actor" else \
            (self.critic_A, self.critic_B)
        update = F.linear(F.linear(x.float(), a), b)
        return y + (self.scale * update).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + scale B A (the actor's), in W's dtype."""
        return merge(self.base.weight, self.lora_A, self.lora_B, self.scale)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS, seed: int = 0,
             critic: bool = False) -> list[nn.Parameter]:
    """Freeze the model and put a LoRALinear around every nn.Linear named in `targets`; returns the
    actor's adapters (what its optimizer gets). critic: a second set of adapters beside them, and
    the model's value head trained (in fp32), for a critic on the same base
    (`trained_parameters`). The adapters are drawn (init_adapters) unless the model is on the
    meta device, to be sharded first: then init_adapters draws them after loading."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    if not adapters:
        raise ValueError(f"lora.targets {list(targets)}: the model has no such projection")
    if critic:
        if model.value_head is None:
            raise ValueError("a critic on the LoRA base needs the model's value head")
        for m in lora_modules(model).values():
            m.critic_A, m.critic_B = m.new_pair(rank)
        model.value_head.float().requires_grad_(True)
    if not adapters[0].is_meta:
        init_adapters(model, seed)
    return adapters


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Every A as PEFT initialises it (Kaiming uniform, drawn whole from one generator seeded by
    `seed`, in module order: the actor's, then the critic's), every B zero, so the model starts as
    its base: on any number of ranks the same, each FSDP shard taking its own rows."""
    g = torch.Generator().manual_seed(seed)
    modules = list(lora_modules(model).values())
    pairs = [(m.lora_A, m.lora_B) for m in modules]
    pairs += [(m.critic_A, m.critic_B) for m in modules if hasattr(m, "critic_A")]
    for a, b in pairs:
        whole = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=g)  # PEFT's default
        local = a.to_local() if isinstance(a, DTensor) else a
        start, stop = shard_rows(a.shape[0], a.device_mesh) if isinstance(a, DTensor) else \
            (0, a.shape[0])
        local.copy_(whole[start:stop])
        (b.to_local() if isinstance(b, DTensor) else b).zero_()


def trained_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """What the actor ("actor": its adapters) or the critic on the same base ("critic": its
    adapters and the value head) trains of a LoRA model."""
    if which == "actor":
        return [p for n, p in model.named_parameters() if ".lora_" in n]
    return [p for n, p in model.named_parameters() if ".critic_" in n or n.startswith("value_head")]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def whole_weight(model: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """model's parameter `name` by its plain name (as a copy of the architecture without adapters
    calls it: a decoding copy, a tensor-parallel twin), whole (each FSDP shard gathered) in dtype;
    an adapted projection's weight merged, W + (alpha / r) B A, as merged_weight."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if not isinstance(module, LoRALinear):
        return whole_parameter(model, name, dtype)
    if leaf != "weight":
        return whole_parameter(module.base, leaf, dtype)
    a, b = (whole_parameter(module, n, torch.float32) for n in ("lora_A", "lora_B"))
    w = whole_parameter(module.base, "weight", module.base.weight.dtype)
    return merge(w, a, b, module.scale).to(dtype)


@contextmanager
def selected(model: nn.Module, which: str | None):
    """Every adapted projection adds `which` adapters for the duration ("actor", "critic", or None:
    the base), then the actor's again. A backward pass that recomputes blocks (activation
    checkpointing) must run inside it too."""
    modules = lora_modules(model).values()
    for m in modules:
        m.active = which
    try:
        yield model
    finally:
        for m in modules:
            m.active = "actor"


class Selected:
    """A LoRA model called as a model is, with `which` adapters selected for each call: the critic
    on the actor's base, or (AdaptersOff) the base itself."""

    def __init__(self, model: nn.Module, which: str | None):
        self.model, self.which = model, which

    def __call__(self, *args, **kwargs):
        with selected(self.model, self.which):
            return self.model(*args, **kwargs)


class AdaptersOff(Selected):
    """The KL reference of a LoRA run: the actor with its adapters switched off (no second copy of
    the weights)."""

    def __init__(self, model: nn.Module):
        super().__init__(model, None)
