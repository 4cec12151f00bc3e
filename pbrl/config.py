"""Training configuration: one dataclass per concern, read from TOML (stdlib tomllib) with `--section.key value`
overrides. Unknown keys, wrong types and impossible values are errors that name the key, before any model loads.
A setting that can be switched off is `None` when off (written `"off"` in TOML or on the command line), so code that
reads it never needs to know a sentinel such as 0.

The defaults are the embedded toy experiment (pbrl/toy.py): `python train.py` runs it with no download.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pbrl.files import is_hub_id

TOY = "toy"  # a model or data path of "toy" means the toy world's artifacts, built on first use


@dataclass
class ModelsConfig:
    policy: str = TOY          # HF directory or hub id of the policy (the actor's initial weights)
    critic: str = ""           # "" = the policy's weights with a fresh value head
    reference: str = ""        # frozen KL reference; "" = the policy's initial weights
    pivot: str = ""            # writes missing pivot references; "" = the policy
    embedder: str = TOY        # embedding model of the semantic rewards
    translator: str = TOY      # translator of the MT reward
    enable_thinking: bool = False  # chat templates that read it (Qwen3): reasoning blocks in policy and pivot turns
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    compile: bool = False      # torch.compile each block of the trained and scored models (fused kernels; CUDA)
    dtype: str = "auto"        # compute dtype (auto: bfloat16 on CUDA, float32 on CPU); trainable weights and
    #                            optimizer states are fp32 whatever it says; frozen models are stored in it


@dataclass
class DataConfig:
    path: str = TOY            # training problems: MGSM layout (mgsm_{lang}.tsv/jsonl), directory or hub id
    langs: list[str] = field(default_factory=lambda: ["de", "fr", "sw"])  # target languages trained on
    pivot_cache: str = ""      # English references (JSONL); "" = {run.out_dir}/pivot.jsonl; generated if absent
    eval_path: str = TOY       # held-out problems for the periodic eval; "" = no eval
    eval_langs: list[str] = field(default_factory=lambda: ["en", "de", "fr", "sw"])
    eval_limit: int | None = None  # problems per language in each eval; off = all


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8      # problems per iteration, over all ranks
    samples_per_prompt: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.5       # the toy warm start is near-deterministic at 1.0: explore more
    top_k: int | None = None
    top_p: float | None = None
    # The decoding step through torch.compile (CUDA graphs on CUDA: see gpu_check). Memory: the sampler's state and,
    # under FSDP, a whole copy of the actor stay allocated between rollouts (pbrl.memory counts both).
    compile: bool = False


@dataclass
class PPOConfig:
    advantage: str = "gae"         # gae (a critic) | grpo | rloo (critic-free: baselines from the prompt's samples)
    group_std: bool = True         # grpo: divide by the group's std (false: Dr. GRPO)
    kl_in_loss: bool = False       # KL to the reference as a k3 loss term (as GRPO) instead of a per-token reward
    epochs: int = 2                # passes over each iteration's rollouts
    minibatches: int = 1           # optimizer steps per epoch
    micro_batch_size: int = 16     # sequences per forward/backward on one rank
    lr: float = 1e-4
    critic_lr: float = 5e-4
    warmup_steps: int = 0
    schedule: str = "constant"     # constant | cosine (after warmup, to 10% of lr at run.steps)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None  # > 1
    value_clip: float | None = 0.2
    kl_beta: float = 0.1
    kl_target: float | None = None  # off = fixed beta; else the adaptive controller's target KL
    kl_horizon: int = 10_000
    kl_estimator: str = "k1"       # k1 | k2 | k3, per-token KL in the reward
    whiten_advantages: bool = True
    entropy_coef: float = 0.0


@dataclass
class RewardConfig:
    # exact_match (the labelled PPO baseline) | agreement | embedding | mt | hybrid
    kind: str = "hybrid"
    embedding_weight: float = 0.5  # hybrid weights; components with weight 0 are not computed
    agreement_weight: float = 0.5
    mt_weight: float = 0.0
    format_weight: float = 0.0
    language_weight: float = 0.0
    pooling: str = "auto"          # auto (the embedder's 1_Pooling/config.json, else last) | last | mean
    translate_max_new_tokens: int = 64

    def uses_embedder(self) -> bool:
        return self.kind in ("embedding", "mt") or (self.kind == "hybrid" and bool(self.embedding_weight
                                                                                   or self.mt_weight))

    def uses_translator(self) -> bool:
        return self.kind == "mt" or (self.kind == "hybrid" and bool(self.mt_weight))


@dataclass
class RunConfig:
    out_dir: str = "runs/pbrl"
    steps: int = 40
    seed: int = 0
    checkpoint_every: int | None = 10  # off = only at the end
    keep_checkpoints: int | None = 3   # the newest N checkpoints are kept; off = all
    timeout_minutes: float = 60.0      # process-group timeout: the longest any rank may wait in a collective
    eval_every: int | None = 10        # off = only at the end
    resume: bool = False
    device: str = "auto"           # auto | cpu | cuda
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # any of jsonl (always on), tensorboard, wandb
    name: str = ""                 # the run's name in W&B (default: out_dir's name)
    wandb_project: str = "pbrl"
    wandb_mode: str = "online"     # online | offline (no network: `wandb sync` later)


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, kind, where: str):
    """TOML or command-line value -> the field's type (str from the command line, native from TOML)."""
    origin = typing.get_origin(kind)
    if origin is types.UnionType:  # `X | None`: "off" (or "none") switches the setting off
        if isinstance(value, str) and value.lower() in ("off", "none"):
            return None
        inner = next(k for k in typing.get_args(kind) if k is not type(None))
        return _coerce(value, inner, f"{where} (or off)")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: expected a list of strings, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _set(cfg: Config, section: str, key: str, value, where: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ValueError(f"{where}: unknown section [{section}]; sections are {', '.join(sections)}")
    part = getattr(cfg, section)
    hints = typing.get_type_hints(type(part))
    if key not in hints:
        raise ValueError(f"{where}: unknown key {section}.{key}; [{section}] has {', '.join(hints)}")
    setattr(part, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then `--section.key value` pairs."""
    cfg = Config()
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            table = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        for section, values in table.items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in values.items():
                _set(cfg, section, key, value, str(path))
    args = list(overrides)
    if len(args) % 2:
        raise ValueError(f"overrides come in pairs '--section.key value'; got {args}")
    for flag, value in zip(args[::2], args[1::2]):
        if not flag.startswith("--") or flag.count(".") != 1:
            raise ValueError(f"expected an override '--section.key', got {flag!r}")
        section, key = flag[2:].split(".")
        _set(cfg, section, key, value, "command line")
    return cfg


def validate(cfg: Config, world_size: int) -> None:
    """Impossible values, with the key that holds each. Paths that are neither 'toy', a hub id nor an existing
    local path are errors too."""
    r, p, w, run = cfg.rollout, cfg.ppo, cfg.reward, cfg.run
    checks = [
        (r.prompts_per_step > 0, "rollout.prompts_per_step must be > 0"),
        (r.prompts_per_step % world_size == 0,
         f"rollout.prompts_per_step={r.prompts_per_step} must be divisible by the world size {world_size}"),
        (r.samples_per_prompt > 0 and r.max_new_tokens > 0,
         "rollout.samples_per_prompt and rollout.max_new_tokens must be > 0"),
        (r.temperature > 0, f"rollout.temperature must be > 0 for PPO rollouts, got {r.temperature}"),
        (r.top_k is None or r.top_k >= 1, f"rollout.top_k must be >= 1 or off, got {r.top_k}"),
        (r.top_p is None or 0 < r.top_p <= 1, f"rollout.top_p must lie in (0, 1] or be off, got {r.top_p}"),
        (p.lr > 0 and p.critic_lr > 0, f"ppo.lr and ppo.critic_lr must be > 0, got {p.lr} and {p.critic_lr}"),
        (p.epochs > 0 and p.minibatches > 0 and p.micro_batch_size > 0,
         "ppo.epochs, ppo.minibatches and ppo.micro_batch_size must be > 0"),
        ((r.prompts_per_step // world_size * r.samples_per_prompt) % p.minibatches == 0,
         f"each rank's {r.prompts_per_step // world_size * r.samples_per_prompt} sequences must split into "
         f"ppo.minibatches={p.minibatches} equal minibatches"),
        (p.schedule in ("constant", "cosine"), f"ppo.schedule must be 'constant' or 'cosine', got {p.schedule!r}"),
        (p.warmup_steps >= 0 and p.weight_decay >= 0 and p.grad_clip > 0,
         "ppo.warmup_steps and weight_decay must be >= 0 and ppo.grad_clip > 0"),
        (0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must lie in [0, 1]"),
        (p.eps_low > 0 and p.eps_high > 0, "ppo.eps_low and ppo.eps_high must be > 0"),
        (p.value_clip is None or p.value_clip > 0, f"ppo.value_clip must be > 0 or off, got {p.value_clip}"),
        (p.dual_clip is None or p.dual_clip > 1, f"ppo.dual_clip must be > 1 or off, got {p.dual_clip}"),
        (p.kl_beta >= 0, f"ppo.kl_beta must be >= 0, got {p.kl_beta}"),
        (p.kl_target is None or p.kl_target > 0, f"ppo.kl_target must be > 0 or off, got {p.kl_target}"),
        (p.kl_estimator in ("k1", "k2", "k3"), f"ppo.kl_estimator must be k1, k2 or k3, got {p.kl_estimator!r}"),
        (p.advantage in ("gae", "grpo", "rloo"), f"ppo.advantage must be gae, grpo or rloo, got {p.advantage!r}"),
        (p.advantage == "gae" or r.samples_per_prompt >= 2,
         f"ppo.advantage={p.advantage} compares the samples of a prompt: rollout.samples_per_prompt must be >= 2"),
        (p.advantage == "gae" or not cfg.models.critic,
         f"ppo.advantage={p.advantage} trains no critic, but models.critic is set"),
        (w.kind in ("exact_match", "agreement", "embedding", "mt", "hybrid"),
         f"reward.kind must be exact_match, agreement, embedding, mt or hybrid, got {w.kind!r}"),
        (min(w.embedding_weight, w.agreement_weight, w.mt_weight, w.format_weight, w.language_weight) >= 0,
         "reward weights must be >= 0"),
        (w.kind != "hybrid" or w.embedding_weight + w.agreement_weight + w.mt_weight + w.format_weight
         + w.language_weight > 0, "reward.kind=hybrid needs at least one positive weight"),
        (w.pooling in ("auto", "last", "mean"), f"reward.pooling must be auto, last or mean, got {w.pooling!r}"),
        (bool(cfg.models.embedder) or not w.uses_embedder(),
         f"reward.kind={w.kind} compares embeddings: set models.embedder"),
        (bool(cfg.models.translator) or not w.uses_translator(),
         f"reward.kind={w.kind} translates responses: set models.translator"),
        (run.steps > 0, f"run.steps must be > 0, got {run.steps}"),
        (run.checkpoint_every is None or run.checkpoint_every > 0,
         f"run.checkpoint_every must be > 0 or off, got {run.checkpoint_every}"),
        (run.keep_checkpoints is None or run.keep_checkpoints > 0,
         f"run.keep_checkpoints must be > 0 or off (keep all), got {run.keep_checkpoints}"),
        (run.timeout_minutes > 0, f"run.timeout_minutes must be > 0, got {run.timeout_minutes}"),
        (set(run.loggers) <= {"jsonl", "tensorboard", "wandb"},
         f"run.loggers may hold jsonl, tensorboard and wandb, got {','.join(run.loggers)}"),
        (run.wandb_mode in ("online", "offline"), f"run.wandb_mode must be online or offline, got {run.wandb_mode!r}"),
        (run.eval_every is None or run.eval_every > 0, f"run.eval_every must be > 0 or off, got {run.eval_every}"),
        (run.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {run.device!r}"),
        (run.device != "cuda" or torch.cuda.is_available(),
         f"run.device = cuda, but CUDA is not available here (torch {torch.__version__}, "
         f"torch.cuda.is_available() is False); use run.device auto or cpu"),
        (cfg.data.eval_limit is None or cfg.data.eval_limit > 0,
         f"data.eval_limit must be > 0 or off (every problem), got {cfg.data.eval_limit}"),
        (cfg.models.dtype in ("auto", "float32", "bfloat16"),
         f"models.dtype must be auto, float32 or bfloat16, got {cfg.models.dtype!r}"),
        (bool(cfg.data.langs), "data.langs must name at least one language"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    import importlib.util
    for logger, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if logger in run.loggers and importlib.util.find_spec(package) is None:
            raise ValueError(f"run.loggers includes {logger}, which is not installed: pip install {package}")
    from pbrl.data import language
    for code in cfg.data.langs + cfg.data.eval_langs:
        language(code)
    for key, value in [("models.policy", cfg.models.policy), ("models.critic", cfg.models.critic),
                       ("models.reference", cfg.models.reference), ("models.pivot", cfg.models.pivot),
                       ("models.embedder", cfg.models.embedder), ("models.translator", cfg.models.translator),
                       ("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)]:
        _check_path(key, value)


def _check_path(key: str, value: str) -> None:
    if value in ("", TOY) or Path(value).exists():
        return
    if not is_hub_id(value):
        raise FileNotFoundError(f"{key} = {value!r}: no such file or directory (and not a hub id 'org/name')")
