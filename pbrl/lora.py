"""LoRA (Hu et al. 2021), hand-written: a frozen base and, beside each target projection, a low-rank
update B A scaled by alpha / rank that alone trains.

    y = W x + (alpha / r) B (A x)      W [out, in] frozen, A [r, in] random, B [out, r] zero

A starts as PEFT initialises it (Kaiming uniform) and B at zero, so the model starts as the base.
The base stays in the compute dtype with no gradient and no optimizer state; A and B are fp32 and
trained by AdamW; under FSDP2 both are sharded in the same units, each gathered in its own dtype.
With the adapters switched off the model *is* the base: the KL reference without a second model
(`AdaptersOff`). Decoding copies (rollout.compile's, rollout.tensor_parallel's twin) hold the
merged weights (`whole_weight`). A checkpoint holds the adapters, their optimizer state and what
identifies the base (`settings`); from it the merged model is exported as a Hugging Face directory
(W + (alpha / r) B A), streamed from the base's files, and the adapters alone in PEFT's layout
(adapter_config.json, adapter_model.safetensors), which `peft` loads onto the base: at the end of a
run, or by `python -m pbrl.checkpoint export`.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pbrl.checkpoint import (EXPORT_MARK, TRAINER_FILE, check_export_target, hf_name, load_args,
                             load_state, matching_model, read_checkpoint_tensors, read_tensors,
                             weight_files, write_hf_model)
from pbrl.files import write_atomic
from pbrl.pivot import weights_sha256

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
def adapter_dir(out: Path) -> Path:
    """Where an export to `out` puts the adapters alone: OUT-adapter beside it (a run's final/:
    final-adapter/)."""
    return out.with_name(out.name + "-adapter")


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


def whole_weight(model: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """model's parameter `name` by its plain name (as a copy of the architecture without adapters
    calls it: a decoding copy, a tensor-parallel twin), whole (each FSDP shard gathered) in dtype;
    an adapted projection's weight merged, W + (alpha / r) B A, as merged_weight."""
    def whole(t, dtype=None):
        t = t if dtype is None else t.to(dtype)  # cast first: fewer bytes on the wire
        return t.full_tensor() if isinstance(t, DTensor) else t
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if not isinstance(module, LoRALinear):
        return whole(model.get_parameter(name), dtype)
    if leaf != "weight":
        return whole(getattr(module.base, leaf), dtype)
    w = whole(module.base.weight)
    update = whole(module.lora_B) @ whole(module.lora_A)
    return (w.float() + module.scale * update).to(w.dtype).to(dtype)


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


def settings(rank: int, alpha: float, targets, base: Path) -> dict:
    """What a LoRA checkpoint records beside its adapters, to merge and export them later: the
    adapters' shape and scale, and the base they were trained on (where it was, and its hash)."""
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "base": str(base),
            "base_sha256": weights_sha256(Path(base))}


def export_checkpoint(ckpt: Path, out: Path, base=None, dtype: torch.dtype | None = None,
                      overwrite: bool = False) -> tuple[Path, Path]:
    """A LoRA checkpoint's actor as the merged model, a HF directory at `out` (W + (alpha / r) B A
    with W read from the base and cast to `dtype` first, as the run computed it; None: as the base
    stores it), streamed one block at a time from the base's files and the checkpoint's adapters;
    and the adapters alone in PEFT's layout beside it (adapter_dir), which
    `peft.PeftModel.from_pretrained(base, that directory)` loads. `base` (default: where the run
    read it) must hold the weights the adapters were trained on (by hash)."""
    ckpt, out = Path(ckpt), Path(out)
    lora = load_state(ckpt / TRAINER_FILE).get("lora")
    if lora is None:
        raise ValueError(f"{ckpt}: a LoRA checkpoint without its LoRA settings (written before "
                         f"pbrl recorded them); export it from the run that wrote it")
    base = Path(base or lora["base"])
    if not base.is_dir() or weights_sha256(base) != lora["base_sha256"]:
        found = "another model" if base.is_dir() else "missing"
        raise ValueError(f"{ckpt}'s adapters were trained on the base at {lora['base']} (weights "
                         f"hash {lora['base_sha256']}); {base} is {found}: pass the base it was "
                         f"trained on (--base)")
    for target in (out, adapter_dir(out)):
        check_export_target(target, overwrite)
    args, files = load_args(base), weight_files(base)
    _, expected, _ = matching_model(base, args, files, False)
    adapters = read_checkpoint_tensors(ckpt, "actor")  # rank r: about 2 r / hidden of the model
    scale = lora["alpha"] / lora["rank"]

    def merged(names):
        mine = {n: f for n, f in files.items() if n.removeprefix("model.") in names}
        state = read_tensors(mine, {n: expected[n] for n in names}, dtype, "cpu", None)
        for name, w in state.items():
            owner = name.removesuffix(".weight")
            if f"{owner}.lora_A" in adapters:
                update = adapters[f"{owner}.lora_B"] @ adapters[f"{owner}.lora_A"]
                state[name] = (w.float() + scale * update).to(w.dtype)
        return state
    names = list(expected)
    blocks = [[n for n in names if n.startswith(f"layers.{i}.")]
              for i in range(args.num_hidden_layers)]
    rest = [n for n in names if not n.startswith("layers.")]
    write_hf_model(out, args, False, [*blocks, rest], merged, dtype, source_dir=base)
    (out / EXPORT_MARK).write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "lora": lora}))
    return out, write_peft_adapters(adapter_dir(out), adapters, args, lora)


def write_peft_adapters(directory: Path, adapters: dict, args, lora: dict) -> Path:
    """The adapters in PEFT's layout: adapter_model.safetensors (fp32, PEFT's tensor names) and
    adapter_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EXPORT_MARK).write_text(json.dumps({"lora": lora}))
    tensors = {}
    for name, tensor in adapters.items():
        owner, which = name.rsplit(".", 1)  # which: lora_A or lora_B
        where = "base_model.model." + hf_name(f"{owner}.weight", args).removesuffix(".weight")
        tensors[f"{where}.{which}.weight"] = tensor.float().contiguous()
    from safetensors.torch import save_file
    with write_atomic(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"],
              "lora_alpha": lora["alpha"], "target_modules": sorted(lora["targets"]),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
              "modules_to_save": None, "base_model_name_or_path": lora["base"]}
    with write_atomic(directory / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory
