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
from pbrl.lora import TARGETS as LORA_TARGETS
from pbrl.ppo import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
from pbrl.rewards import REWARDS
from pbrl.rollout import OVERLONG

TOY = "toy"  # a model or data path of "toy" means the toy world's artifacts, built on first use


def setting(default, help: str, *, gt=None, ge=None, le=None, choices=None):
    """A field with its one-line meaning (train.py --help prints it) and the checks validate()
    applies: > gt, >= ge, <= le, in choices (each item of a list)."""
    limits = {op: bound for op, bound in ((">", gt), (">=", ge), ("<=", le)) if bound is not None}
    meta = {"help": help, "limits": limits, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelsConfig:
    policy: str = setting(TOY, "HF directory or hub id of the policy (the actor's first weights)")
    critic: str = setting("", "HF directory or hub id of the critic; '' = the policy's weights "
                              "with a fresh value head")
    reference: str = setting("", "the frozen KL reference; '' = the policy's first weights")
    pivot: str = setting("", "the English pivot that writes missing references; '' = the policy")
    pivot_batch_size: int = setting(64, "problems per batch while the pivot writes", gt=0)
    embedder: str = setting(TOY, "the embedding model of the semantic rewards")
    translator: str = setting(TOY, "the MT reward's translator: an instruct model or a lexicon")
    enable_thinking: bool = setting(False, "chat templates that read it (Qwen3): reasoning blocks "
                                           "in turns")
    activation_checkpointing: bool = setting(False, "recompute each block in backward: less "
                                                    "memory, more compute")
    compile: bool = setting(False, "torch.compile each block of the trained and scored models "
                                   "(CUDA)")
    # trained weights and optimizer states are fp32 whatever it says; frozen models are stored in it
    dtype: str = setting("auto", "the compute dtype (auto: bfloat16 on CUDA, float32 on CPU)",
                         choices=("auto", "float32", "bfloat16"))


@dataclass
class DataConfig:
    path: str = setting(TOY, "training problems in MGSM's layout (mgsm_{lang}.tsv/jsonl): a "
                             "directory or hub id")
    langs: list[str] = setting(["de", "fr", "sw"], "the target languages", choices=LANGUAGES)
    pivot_cache: str = setting("", "the English references (JSONL); '' = {run.out_dir}/pivot.jsonl")
    eval_path: str = setting(TOY, "held-out problems for the periodic eval; '' = no eval")
    eval_langs: list[str] = setting(["en", "de", "fr", "sw"], "the languages evaluated",
                                    choices=LANGUAGES)
    eval_limit: int | None = setting(None, "problems per language in each eval; off = all", gt=0)


@dataclass
class RolloutConfig:
    prompts_per_step: int = setting(8, "problems per iteration, over all ranks", gt=0)
    samples_per_prompt: int = setting(8, "responses sampled per problem", gt=0)
    max_new_tokens: int = setting(48, "the longest response, in tokens", gt=0)
    # the toy warm start is near-deterministic at 1.0
    temperature: float = setting(1.5, "sampling temperature", gt=0)
    top_k: int | None = setting(None, "sample among the k likeliest tokens; off = all", ge=1)
    top_p: float | None = setting(None, "nucleus sampling's mass; off = all", gt=0, le=1)
    # Memory: the sampler's state and, under FSDP, a whole copy of the actor stay allocated between
    # rollouts (pbrl.memory counts both).
    compile: bool = setting(False, "decode through CUDA graphs (pbrl/cudagraphs.py)")
    # DTensor tensor parallelism, Megatron's column/row split; 1: each rank its own whole copy
    tensor_parallel: int = setting(1, "ranks that decode one batch together, each holding 1/N of "
                                      "the weights and KV cache (placement separate: rollout "
                                      "ranks)", gt=0)
    # until the batch is full of informative groups (else: what there is)
    dynamic_sampling: bool = setting(False, "DAPO: drop groups whose samples all score alike and "
                                            "sample more problems")
    max_sampling_rounds: int = setting(3, "dynamic sampling's most rounds of rollouts per step",
                                       gt=0, le=100)
    # penalty: DAPO's linear length penalty over the last overlong_buffer tokens, added to the score
    overlong: str = setting("off", "what becomes of responses cut at max_new_tokens (filter: "
                                   "out of the loss)", choices=OVERLONG)
    overlong_buffer: int = setting(16, "the overlong penalty's ramp, in tokens", gt=0)
    # separate: the last `ranks` ranks decode and score, the others train (pbrl/pipeline.py)
    placement: str = setting("colocated", "where rollouts run: on the training ranks between "
                                          "updates, or on rollout ranks of their own, one step "
                                          "off-policy", choices=("colocated", "separate"))
    ranks: int = setting(1, "placement separate: the rollout ranks (the last ones), each serving "
                            "(world - ranks) / ranks training ranks", gt=0)


@dataclass
class PPOConfig:
    # grpo | rloo: baselines from the prompt's other samples; reinforce_pp(_baseline): returns
    # whitened over the batch, the latter minus the group mean first
    advantage: str = setting("gae", "the advantage estimator (gae trains a critic)",
                             choices=ADVANTAGES)
    group_std: bool = setting(True, "grpo: divide by the group's std (false: Dr. GRPO)")
    kl_in_loss: bool = setting(False, "KL to the reference as a k3 loss term (GRPO's) instead of "
                                      "a reward")
    epochs: int = setting(2, "passes over each iteration's rollouts", gt=0)
    minibatches: int = setting(1, "optimizer steps per epoch", gt=0)
    micro_batch_size: int = setting(16, "sequences per forward/backward on one rank", gt=0)
    micro_batch_tokens: int | None = setting(
        None, "instead: tokens per forward/backward on one rank, packed into one row", gt=0)
    lr: float = setting(1e-4, "the actor's learning rate", gt=0)
    critic_lr: float = setting(5e-4, "the critic's learning rate", gt=0)
    warmup_steps: int = setting(0, "iterations of linear learning-rate warmup", ge=0)
    schedule: str = setting("constant", "the learning rate after warmup (cosine: to 10% at "
                                        "run.steps)", choices=("constant", "cosine"))
    weight_decay: float = setting(0.0, "AdamW's weight decay", ge=0)
    grad_clip: float = setting(1.0, "the gradient norm clipped to", gt=0)
    gamma: float = setting(1.0, "GAE's discount", ge=0, le=1)
    lam: float = setting(0.95, "GAE's lambda", ge=0, le=1)
    eps_low: float = setting(0.2, "the ratio's clip below 1", gt=0)
    eps_high: float = setting(0.2, "the ratio's clip above 1 (DAPO's clip-higher: 0.28)", gt=0)
    dual_clip: float | None = setting(None, "the ppo loss's dual clip c > 1 on negative "
                                            "advantages; off = none", gt=1)
    policy_loss: str = setting("ppo", "the per-token policy loss", choices=POLICY_LOSSES)
    loss_agg: str = setting("token_mean", "how token losses add up to the batch's loss",
                            choices=AGGREGATIONS)
    # tis | seq_tis: weights truncated at correction_clip; mis | seq_mis: tokens or responses whose
    # ratio is outside [correction_low, correction_high] drop
    rollout_correction: str = setting("off", "the sampler/trainer mismatch's correction",
                                      choices=CORRECTIONS)
    # below 1 it would truncate every token's weight, not just the outliers'
    correction_clip: float = setting(2.0, "TIS's truncation of the importance weight", ge=1)
    correction_low: float = setting(0.5, "MIS's lowest kept ratio", gt=0)
    correction_high: float = setting(2.0, "MIS's highest kept ratio", gt=0)
    value_clip: float | None = setting(0.2, "the value loss's clip around the old values; off = "
                                            "none", gt=0)
    kl_beta: float = setting(0.1, "the KL coefficient; 0 = no KL and no reference model", ge=0)
    kl_target: float | None = setting(None, "the adaptive KL controller's target; off = fixed "
                                            "beta", gt=0)
    kl_horizon: int = setting(10_000, "the adaptive KL controller's horizon, in sequences", gt=0)
    kl_estimator: str = setting("k1", "the per-token KL estimate in the reward",
                                choices=KL_ESTIMATORS)
    whiten_advantages: bool = setting(True, "gae: whiten the advantages over the batch")
    entropy_coef: float = setting(0.0, "the entropy bonus's weight in the actor's loss", ge=0)

    def uses_critic(self) -> bool:
        """The estimator reads a critic's values (ppo.ADVANTAGES): one is built and trained."""
        return ADVANTAGES[self.advantage].critic

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
    # exact_match is the labelled PPO baseline; the others need no label
    kind: str = setting("hybrid", "the reward", choices=REWARDS)
    embedding_weight: float = setting(0.5, "hybrid: the embedding cosine's weight (0: not "
                                           "computed)", ge=0)
    agreement_weight: float = setting(0.5, "hybrid: final-answer agreement's weight", ge=0)
    mt_weight: float = setting(0.0, "hybrid: the MT reward's weight", ge=0)
    format_weight: float = setting(0.0, "hybrid: the answer phrase's weight", ge=0)
    language_weight: float = setting(0.0, "hybrid: language consistency's weight", ge=0)
    language_gate: float | None = setting(None, "the semantic rewards (embedding, mt) count only "
                                                "for responses at least this share in the "
                                                "prompt's language; off = no gate", gt=0, le=1)
    language_gate_mode: str = setting("zero", "below the gate: zero the reward, or scale it by "
                                              "share / gate", choices=("zero", "scale"))
    pooling: str = setting("auto", "the embedder's pooling (auto: its 1_Pooling/config.json, "
                                   "else last)", choices=("auto", "last", "mean", "cls"))
    embedder_prefix: str = setting("", "text the embedder's model card puts before every text "
                                       "(multilingual-e5: 'query: ')")
    reference_prefix: str | None = setting(None, "the embedder's prefix for the pivot's references "
                                                 "(e5's 'passage: '); off = embedder_prefix")
    translate_max_new_tokens: int = setting(64, "the MT reward's longest translation", gt=0)

    def uses_embedder(self) -> bool:
        return "embedder" in REWARDS[self.kind].uses(self)

    def uses_translator(self) -> bool:
        return "translator" in REWARDS[self.kind].uses(self)


@dataclass
class RunConfig:
    out_dir: str = setting("runs/pbrl", "the run's directory: metrics, checkpoints, final policy")
    steps: int = setting(40, "training iterations", gt=0)
    seed: int = setting(0, "the run's seed (sampling, problem order)", ge=0, le=2**31 - 1)
    checkpoint_every: int | None = setting(10, "iterations between checkpoints; off = only at "
                                               "the end", gt=0)
    keep_checkpoints: int | None = setting(3, "the newest N checkpoints are kept; off = all", gt=0)
    # a process group takes 3 seconds to a week (shorter ones fail in its store, longer overflow)
    timeout_minutes: float = setting(60.0, "the longest any rank may wait in a collective",
                                     ge=0.05, le=10080)
    eval_every: int | None = setting(10, "iterations between evals; off = only at the end", gt=0)
    eval_temperature: float = setting(0.0, "the eval's sampling temperature (0 = greedy)", ge=0)
    eval_samples: int = setting(1, "answers per eval problem; above 1 the eval also reports "
                                   "pass@k and majority-vote accuracy (k = this)", gt=0)
    eval_max_new_tokens: int | None = setting(None, "the eval's longest answer; off = "
                                                    "rollout.max_new_tokens", gt=0)
    resume: bool = setting(False, "continue the run in run.out_dir from its last checkpoint")
    device: str = setting("auto", "where the run computes", choices=("auto", "cpu", "cuda"))
    loggers: list[str] = setting(["jsonl"], "metrics sinks (jsonl is always on)",
                                 choices=("jsonl", "tensorboard", "wandb"))
    name: str = setting("", "the run's name in W&B (default: out_dir's name)")
    wandb_project: str = setting("pbrl", "the W&B project")
    wandb_mode: str = setting("online", "W&B's mode (offline: `wandb sync` later)",
                              choices=("online", "offline"))


@dataclass
class LoraConfig:
    # pbrl/lora.py: a frozen base in the compute dtype, fp32 adapters, the reference = adapters off
    rank: int = setting(0, "the adapters' rank; 0 = off (full-parameter training)", ge=0)
    alpha: float = setting(16.0, "the adapters' scale is alpha / rank", gt=0)
    targets: list[str] = setting(list(LORA_TARGETS), "the projections that get adapters",
                                 choices=LORA_TARGETS)


@dataclass
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

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


def _written(value) -> str:
    """A setting's value as TOML or the command line would write it."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return repr(value) if value == "" else str(value)


def settings_help() -> str:
    """Every setting, section by section: `--section.key`, its default, its choices or limits and
    its meaning, read from the dataclasses (train.py --help prints it)."""
    lines, defaults = [], Config()
    for section in dataclasses.fields(Config):
        lines.append(f"\n[{section.name}]")
        for f in dataclasses.fields(getattr(defaults, section.name)):
            meta = f.metadata
            allowed = [" | ".join(meta["choices"])] if meta["choices"] else []
            allowed += [" and ".join(f"{op} {b}" for op, b in meta["limits"].items())] \
                if meta["limits"] else []
            allowed += ["or off"] if "None" in str(f.type) else []
            shown = "; ".join([_written(getattr(getattr(defaults, section.name), f.name)),
                               *filter(None, [" ".join(allowed)])])
            lines += [f"  --{section.name}.{f.name} (default {shown})", f"      {meta['help']}"]
    return "\n".join(lines)


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


def shared_critic(cfg: Config) -> bool:
    """GAE's critic is a second set of adapters and a value head on the LoRA actor's base (no model
    of its own): a LoRA run that names no models.critic apart."""
    return bool(cfg.lora.rank) and cfg.ppo.uses_critic() and not cfg.models.critic


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


def pipeline_checks(cfg: Config, world_size: int) -> list[tuple[bool, str]]:
    """rollout.placement = separate: what it does (pbrl/pipeline.py)."""
    r, separate = cfg.rollout, "rollout.placement = separate"
    trainers = world_size - r.ranks
    return [(trainers > 0 and trainers % r.ranks == 0,
             f"{separate}: rollout.ranks = {r.ranks} of {world_size} ranks leaves {trainers} "
             f"to train; each rollout rank serves the same number of training ranks, so "
             f"rollout.ranks must divide that number (and leave at least one)"),
            (r.ranks % r.tensor_parallel == 0,
             f"{separate}: rollout.tensor_parallel = {r.tensor_parallel} must divide rollout.ranks "
             f"= {r.ranks} (rollout ranks decode in groups of that many)")]


def cross_checks(cfg: Config, world_size: int) -> list[tuple[bool, str]]:
    """(holds, message) of each check that reads more than one field; world_size counts the
    training ranks (rollout.placement separate: the others decode)."""
    r, p, w = cfg.rollout, cfg.ppo, cfg.reward
    pipeline = pipeline_checks(cfg, world_size) if r.placement == "separate" else []
    # (none left to train: the pipeline's check says so first)
    world_size = max(world_size - r.ranks, 1) if r.placement == "separate" else world_size
    per_rank = r.prompts_per_step // max(world_size, 1) * r.samples_per_prompt
    weights = (w.embedding_weight, w.agreement_weight, w.mt_weight, w.format_weight,
               w.language_weight)
    return pipeline + [
        (world_size % r.tensor_parallel == 0 or r.placement == "separate",
         f"rollout.tensor_parallel={r.tensor_parallel} must divide the world size {world_size} "
         f"(ranks decode in groups of that many)"),
        (r.prompts_per_step % world_size == 0,
         f"rollout.prompts_per_step={r.prompts_per_step} must be "
                                               f"divisible by the world size {world_size}"),
        (per_rank % p.minibatches == 0, f"each rank's {per_rank} sequences must split into "
                                        f"ppo.minibatches={p.minibatches} equal minibatches"),
        (not ADVANTAGES[p.advantage].grouped or r.samples_per_prompt >= 2,
         f"ppo.advantage={p.advantage} compares the samples of a prompt: "
         f"rollout.samples_per_prompt must be >= 2"),
        (not r.dynamic_sampling or r.samples_per_prompt >= 2,
         "rollout.dynamic_sampling keeps prompts whose samples score differently: "
         "rollout.samples_per_prompt must be >= 2"),
        (p.uses_critic() or not cfg.models.critic,
         f"ppo.advantage={p.advantage} trains no critic, but models.critic is set"),
        (p.dual_clip is None or p.policy_loss == "ppo",
         f"ppo.dual_clip bounds the ppo loss; ppo.policy_loss={p.policy_loss} has none"),
        (p.correction_low < 1 < p.correction_high,
         f"ppo.correction_low < 1 < ppo.correction_high must hold (a ratio of 1 is no mismatch, "
         f"and a window without room around it drops every token); got {p.correction_low} and "
         f"{p.correction_high}"),
        (p.kl_beta > 0 or p.kl_target is None,
         "ppo.kl_target adapts ppo.kl_beta, which is 0 (no KL, no reference model) and stays 0: "
         "set ppo.kl_beta > 0 or ppo.kl_target off"),
        (p.kl_beta > 0 or not p.kl_in_loss,
         "ppo.kl_in_loss puts the KL in the loss, but ppo.kl_beta is 0 (no KL, no reference "
         "model): set ppo.kl_beta > 0 or ppo.kl_in_loss false"),
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
