"""Training configuration: one dataclass per concern, read from TOML with `--section.key value`
overrides.

Each field carries its own check (`setting(default, gt=0)`, `choices=...`): validate() applies them
all, every number must also be finite, and then checks what spans fields. Unknown keys, wrong types
and impossible values are errors that name the key, before any model loads. A setting that can be
switched off is None when off (written "off" in TOML or on the command line).

The defaults are the embedded toy experiment (pbrl/toy.py): `python train.py` runs it with no
download.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pbrl.data import LANGUAGES
from pbrl.files import is_hub_id, read_text

TOY = "toy"  # a model or data path of "toy" means the toy world's artifacts, built on first use


def setting(default, *, gt=None, ge=None, le=None, choices=None):
    """A field whose value validate() checks: > gt, >= ge, <= le, in choices (each item of a
    list)."""
    limits = {op: bound for op, bound in ((">", gt), (">=", ge), ("<=", le)) if bound is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default),
                     metadata={"limits": limits, "choices": choices})
    return field(default=default, metadata={"limits": limits, "choices": choices})


@dataclass
class ModelsConfig:
    policy: str = TOY          # HF directory or hub id of the policy (the actor's initial weights)
    critic: str = ""           # "" = the policy's weights with a fresh value head
    reference: str = ""        # frozen KL reference; "" = the policy's initial weights
    pivot: str = ""            # writes missing pivot references; "" = the policy
    pivot_batch_size: int = setting(64, gt=0)  # problems per batch while it writes them
    embedder: str = TOY        # embedding model of the semantic rewards
    translator: str = TOY      # translator of the MT reward
    enable_thinking: bool = False  # chat templates that read it (Qwen3): reasoning blocks in turns
    # recompute each block in backward: less memory, more compute
    activation_checkpointing: bool = False
    compile: bool = False      # torch.compile each block of the trained and scored models (CUDA)
    # The compute dtype (auto: bfloat16 on CUDA, float32 on CPU); trained weights and optimizer
    # states are fp32 whatever it says; frozen models are stored in it.
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"))


@dataclass
class DataConfig:
    # training problems: MGSM layout (mgsm_{lang}.tsv/jsonl), directory or hub id
    path: str = TOY
    langs: list[str] = setting(["de", "fr", "sw"], choices=tuple(LANGUAGES))  # target languages
    pivot_cache: str = ""      # English references (JSONL); "" = {run.out_dir}/pivot.jsonl
    eval_path: str = TOY       # held-out problems for the periodic eval; "" = no eval
    eval_langs: list[str] = setting(["en", "de", "fr", "sw"], choices=tuple(LANGUAGES))
    eval_limit: int | None = setting(None, gt=0)  # problems per language in each eval; off = all


@dataclass
class RolloutConfig:
    prompts_per_step: int = setting(8, gt=0)    # problems per iteration, over all ranks
    samples_per_prompt: int = setting(8, gt=0)
    max_new_tokens: int = setting(48, gt=0)
    temperature: float = setting(1.5, gt=0)     # the toy warm start is near-deterministic at 1.0
    top_k: int | None = setting(None, ge=1)
    top_p: float | None = setting(None, gt=0, le=1)
    # The decoding step through CUDA graphs (pbrl/graphs.py). Memory: the sampler's state and, under
    # FSDP, a whole copy of the actor stay allocated between rollouts (pbrl.memory counts both).
    compile: bool = False
    # Ranks that decode one batch together, each holding 1/N of the weights and of the KV cache
    # (DTensor tensor parallelism, Megatron's column/row split); 1: each rank its own whole copy
    tensor_parallel: int = setting(1, gt=0)
    # DAPO: drop groups whose samples all score alike and sample more problems, up to this many
    # rounds of rollouts, until the batch is full of informative groups (else: what there is)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = setting(3, gt=0)
    # responses that hit max_new_tokens unfinished: off | filter (out of the loss) | penalty (DAPO's
    # linear length penalty over the last overlong_buffer tokens, added to the score)
    overlong: str = setting("off", choices=("off", "filter", "penalty"))
    overlong_buffer: int = setting(16, gt=0)


@dataclass
class PPOConfig:
    # gae (a critic) | grpo | rloo (baselines from the prompt's other samples) | reinforce_pp |
    # reinforce_pp_baseline (returns whitened over the batch; the latter minus the group mean first)
    advantage: str = setting("gae", choices=("gae", "grpo", "rloo", "reinforce_pp",
                                             "reinforce_pp_baseline"))
    group_std: bool = True         # grpo: divide by the group's std (false: Dr. GRPO)
    # KL to the reference as a k3 loss term (GRPO's) instead of a reward
    kl_in_loss: bool = False
    epochs: int = setting(2, gt=0)           # passes over each iteration's rollouts
    minibatches: int = setting(1, gt=0)      # optimizer steps per epoch
    micro_batch_size: int = setting(16, gt=0)  # sequences per forward/backward on one rank
    # instead: tokens per forward/backward on one rank, the sequences packed into one row
    micro_batch_tokens: int | None = setting(None, gt=0)
    lr: float = setting(1e-4, gt=0)
    critic_lr: float = setting(5e-4, gt=0)
    warmup_steps: int = setting(0, ge=0)
    # cosine: to 10% at run.steps
    schedule: str = setting("constant", choices=("constant", "cosine"))
    weight_decay: float = setting(0.0, ge=0)
    grad_clip: float = setting(1.0, gt=0)
    gamma: float = setting(1.0, ge=0, le=1)
    lam: float = setting(0.95, ge=0, le=1)
    eps_low: float = setting(0.2, gt=0)
    eps_high: float = setting(0.2, gt=0)
    dual_clip: float | None = setting(None, gt=1)
    policy_loss: str = setting("ppo", choices=("ppo", "gspo", "cispo"))  # ppo.POLICY_LOSSES
    loss_agg: str = setting("token_mean", choices=("token_mean", "seq_mean_token_mean",
                                                   "seq_mean_token_sum_norm"))
    # the sampler/trainer mismatch: off | tis | seq_tis (weights truncated at correction_clip) | mis
    # | seq_mis (tokens or responses whose ratio is outside [correction_low, correction_high] drop)
    rollout_correction: str = setting("off", choices=("off", "tis", "seq_tis", "mis", "seq_mis"))
    correction_clip: float = setting(2.0, gt=0)
    correction_low: float = setting(0.5, gt=0)
    correction_high: float = setting(2.0, gt=0)
    value_clip: float | None = setting(0.2, gt=0)
    kl_beta: float = setting(0.1, ge=0)
    # off = fixed beta; else the adaptive controller's
    kl_target: float | None = setting(None, gt=0)
    kl_horizon: int = setting(10_000, gt=0)
    kl_estimator: str = setting("k1", choices=("k1", "k2", "k3"))  # the per-token KL in the reward
    whiten_advantages: bool = True
    entropy_coef: float = setting(0.0, ge=0)

    def uses_reference(self) -> bool:
        """kl_beta 0 (which no adaptive controller moves): no KL, no reference model to load."""
        return self.kl_beta > 0

    def old_from_update(self) -> bool:
        """One optimizer step per batch and nothing that reads the old log-probs before it (no KL,
        no rollout correction): the update's own log-probs, detached, are the old ones (ratio 1,
        as TRL computes it), and no forward pass of its own computes them."""
        return self.epochs == self.minibatches == 1 and not self.uses_reference() \
            and self.rollout_correction == "off"


@dataclass
class RewardConfig:
    # exact_match (the labelled PPO baseline) | agreement | embedding | mt | hybrid
    kind: str = setting("hybrid", choices=("exact_match", "agreement", "embedding", "mt", "hybrid"))
    embedding_weight: float = setting(0.5, ge=0)  # hybrid weights; a weight of 0 is not computed
    agreement_weight: float = setting(0.5, ge=0)
    mt_weight: float = setting(0.0, ge=0)
    format_weight: float = setting(0.0, ge=0)
    language_weight: float = setting(0.0, ge=0)
    # auto: the embedder's 1_Pooling/config.json, else last
    pooling: str = setting("auto", choices=("auto", "last", "mean"))
    translate_max_new_tokens: int = setting(64, gt=0)

    def uses_embedder(self) -> bool:
        hybrid = self.kind == "hybrid" and bool(self.embedding_weight or self.mt_weight)
        return self.kind in ("embedding", "mt") or hybrid

    def uses_translator(self) -> bool:
        return self.kind == "mt" or (self.kind == "hybrid" and bool(self.mt_weight))


@dataclass
class RunConfig:
    out_dir: str = "runs/pbrl"
    steps: int = setting(40, gt=0)
    seed: int = setting(0, ge=0, le=2**31 - 1)
    checkpoint_every: int | None = setting(10, gt=0)  # off = only at the end
    keep_checkpoints: int | None = setting(3, gt=0)   # the newest N checkpoints are kept; off = all
    # the longest any rank may wait in a collective
    timeout_minutes: float = setting(60.0, gt=0)
    eval_every: int | None = setting(10, gt=0)        # off = only at the end
    resume: bool = False
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    # any of jsonl (always on), tensorboard, wandb
    loggers: list[str] = setting(["jsonl"], choices=("jsonl", "tensorboard", "wandb"))
    name: str = ""                 # the run's name in W&B (default: out_dir's name)
    wandb_project: str = "pbrl"
    # offline: `wandb sync` later
    wandb_mode: str = setting("online", choices=("online", "offline"))


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
    """A TOML or command-line value -> the field's type (str from the command line, native from
    TOML)."""
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
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or \
                (kind is int and isinstance(value, float)):
            raise ValueError(f"{where}: expected {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}")
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{where}: expected {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _set(cfg: Config, section: str, key: str, value, where: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ValueError(f"{where}: unknown section [{section}]; sections are "
                         f"{', '.join(sections)}")
    part = getattr(cfg, section)
    hints = typing.get_type_hints(type(part))
    if key not in hints:
        raise ValueError(f"{where}: unknown key {section}.{key}; [{section}] has "
                         f"{', '.join(hints)}")
    setattr(part, key, _coerce(value, hints[key], f"{where}: {section}.{key}"))


def parse_command_line(argv: list[str]) -> tuple[str | None, list[str]]:
    """train.py's arguments -> (the --config file or None, the overrides as `--section.key value`
    pairs); `--config=FILE` and `--section.key=value` are accepted too."""
    args = [part for arg in argv for part in
            (arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg])]
    path = None
    if args[:1] == ["--config"]:
        if len(args) < 2:
            raise ValueError("--config needs a file: --config FILE.toml")
        path, args = args[1], args[2:]
    if "--config" in args:
        raise ValueError("--config comes first, before the --section.key value overrides")
    return path, args


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then `--section.key value` pairs."""
    cfg = Config()
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            table = tomllib.loads(read_text(file))
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


def check_field(where: str, value, meta, optional: bool) -> None:
    """One field's own checks (see `setting`); None is a setting switched off."""
    if value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} must be a finite number, got {item}")
        for op, bound in meta.get("limits", {}).items():
            if not {">": item > bound, ">=": item >= bound, "<=": item <= bound}[op]:
                limits = " and ".join(f"{o} {b}" for o, b in meta["limits"].items())
                raise ValueError(f"{where} must be {limits}{' or off' if optional else ''}, got "
                                 f"{item}")
        if meta.get("choices") and item not in meta["choices"]:
            raise ValueError(f"{where} must be one of {', '.join(meta['choices'])}, got {item!r}")
    if isinstance(value, list) and (not value or len(set(value)) < len(value)):
        raise ValueError(f"{where} must list at least one value, each once; got {','.join(value)}")


def validate(cfg: Config, world_size: int) -> None:
    """Every field's own check, then what spans fields, each error naming its keys. Paths that are
    neither 'toy', a hub id nor an existing local path are errors too."""
    for section in dataclasses.fields(Config):
        part = getattr(cfg, section.name)
        for f in dataclasses.fields(part):
            optional = "None" in str(f.type)
            check_field(f"{section.name}.{f.name}", getattr(part, f.name), f.metadata, optional)
    for ok, message in cross_checks(cfg, world_size):
        if not ok:
            raise ValueError(message)
    for logger in set(cfg.run.loggers) - {"jsonl"}:
        if importlib.util.find_spec(logger) is None:
            raise ValueError(f"run.loggers includes {logger}, which is not installed: pip install "
                             f"{logger}")
    for key in ("models.policy", "models.critic", "models.reference", "models.pivot",
                "models.embedder", "models.translator", "data.path", "data.eval_path"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in ("", TOY) and not Path(value).exists() and not is_hub_id(value):
            raise FileNotFoundError(f"{key} = {value!r}: no such file or directory (and not a hub "
                                    f"id 'org/name')")


def cross_checks(cfg: Config, world_size: int) -> list[tuple[bool, str]]:
    """(holds, message) of each check that reads more than one field."""
    r, p, w = cfg.rollout, cfg.ppo, cfg.reward
    per_rank = r.prompts_per_step // world_size * r.samples_per_prompt
    weights = (w.embedding_weight, w.agreement_weight, w.mt_weight, w.format_weight,
               w.language_weight)
    return [
        (world_size % r.tensor_parallel == 0,
         f"rollout.tensor_parallel={r.tensor_parallel} must divide the world size {world_size} "
         f"(ranks decode in groups of that many)"),
        (r.prompts_per_step % world_size == 0,
         f"rollout.prompts_per_step={r.prompts_per_step} must be "
                                               f"divisible by the world size {world_size}"),
        (per_rank % p.minibatches == 0, f"each rank's {per_rank} sequences must split into "
                                        f"ppo.minibatches={p.minibatches} equal minibatches"),
        (p.advantage not in ("grpo", "rloo", "reinforce_pp_baseline") or r.samples_per_prompt >= 2,
         f"ppo.advantage={p.advantage} compares the samples of a prompt: "
         f"rollout.samples_per_prompt must be >= 2"),
        (not r.dynamic_sampling or r.samples_per_prompt >= 2,
         "rollout.dynamic_sampling keeps prompts whose samples score differently: "
         "rollout.samples_per_prompt must be >= 2"),
        (p.advantage == "gae" or not cfg.models.critic,
         f"ppo.advantage={p.advantage} trains no critic, but models.critic is set"),
        (p.dual_clip is None or p.policy_loss == "ppo",
         f"ppo.dual_clip bounds the ppo loss; ppo.policy_loss={p.policy_loss} has none"),
        (p.correction_low <= 1 <= p.correction_high,
         f"ppo.correction_low <= 1 <= ppo.correction_high must hold (a ratio of 1 is no "
         f"mismatch); got {p.correction_low} and {p.correction_high}"),
        (r.overlong != "penalty" or r.overlong_buffer <= r.max_new_tokens,
         f"rollout.overlong_buffer={r.overlong_buffer} must be at most rollout.max_new_tokens="
         f"{r.max_new_tokens}"),
        (w.kind != "hybrid" or sum(weights) > 0,
         "reward.kind=hybrid needs at least one positive weight"),
        (bool(cfg.models.embedder) or not w.uses_embedder(),
         f"reward.kind={w.kind} compares embeddings: set models.embedder"),
        (bool(cfg.models.translator) or not w.uses_translator(),
         f"reward.kind={w.kind} translates responses: set models.translator"),
        (bool(cfg.run.out_dir.strip()), "run.out_dir must name a directory, got an empty string"),
        (cfg.run.device != "cuda" or torch.cuda.is_available(),
         f"run.device = cuda, but CUDA is not available here (torch {torch.__version__}, "
         f"torch.cuda.is_available() is False); use run.device auto or cpu"),
    ]
