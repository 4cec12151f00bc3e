"""LoRA (Hu et al. 2021), hand-written: a frozen base and, beside each target projection, a low-rank
update B A scaled by alpha / rank that alone trains.

    y = W x + (alpha / r) B (A x)      W [out, in] frozen, A [r, in] random, B [out, r] zero

A starts as PEFT initialises it (Kaiming uniform) and B at zero, so the model starts as the base.
The base stays in the compute dtype with no gradient and no optimizer state; A and B are fp32 and
trained by AdamW. With the adapters switched off the model *is* the base: the KL reference without
a second model (`AdaptersOff`). At the end of a run the merged model is exported as a Hugging Face
directory (W + (alpha / r) B A, one file) and the adapters alone in PEFT's layout
(adapter_config.json, adapter_model.safetensors), which `peft` loads onto the base.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pbrl.checkpoint import EXPORT_MARK, check_export_target, hf_name, write_hf_model
from pbrl.files import write_atomic

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "final-adapter"  # beside the run's final/: the adapters in PEFT's layout


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus the trained low-rank update; `enabled` False is the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        a = torch.empty(rank, base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's default
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        update = F.linear(F.linear(x.float(), self.lora_A), self.lora_B)
        return y + (self.scale * update).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + scale B A, in W's dtype."""
        w = self.base.weight
        return (w.float() + self.scale * self.lora_B @ self.lora_A).to(w.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS,
             seed: int = 0) -> list[nn.Parameter]:
    """Freeze the model and put a LoRALinear around every nn.Linear named in `targets`; returns the
    adapters' parameters (what the optimizer gets)."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, g))
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    if not adapters:
        raise ValueError(f"lora.targets {list(targets)}: the model has no such projection")
    return adapters


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model: nn.Module):
    """The base model for the duration: every adapter switched off, then back on."""
    modules = lora_modules(model).values()
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


class AdaptersOff:
    """The KL reference of a LoRA run: the actor with its adapters switched off, called as a
    model is (no second copy of the weights)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by their plain names, each adapted projection's weight merged."""
    lora = lora_modules(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".base.", 1)[0] if ".base." in name else None
        if ".lora_" in name:
            continue
        if owner in lora and name.endswith(".base.weight"):
            state[f"{owner}.weight"] = lora[owner].merged_weight().detach()
        else:
            state[name.replace(".base.", ".")] = tensor.detach()
    return state


def export(model, out: Path, source_dir, dtype: torch.dtype, rank: int, alpha: float,
           targets) -> tuple[Path, Path]:
    """The merged model as a HF directory at `out`, and the adapters in PEFT's layout beside it
    (ADAPTER_DIR): what `peft.PeftModel.from_pretrained(base, that directory)` loads."""
    out = Path(out)
    check_export_target(out, overwrite=True)
    state = merged_state(model)
    write_hf_model(out, model.args, False, [list(state)],
                   lambda names: {n: state[n] for n in names}, dtype, source_dir=source_dir)
    (out / EXPORT_MARK).write_text(json.dumps({"lora": {"rank": rank, "alpha": alpha}}))
    adapters = out.with_name(ADAPTER_DIR)
    adapters.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model).items():
        where = "base_model.model." + hf_name(f"{name}.weight", model.args).removesuffix(".weight")
        tensors[f"{where}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[f"{where}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    from safetensors.torch import save_file
    with write_atomic(adapters / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": str(source_dir)}
    with write_atomic(adapters / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return out, adapters
