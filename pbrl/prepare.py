"""Everything a run needs before its first iteration, built in the order that fails fastest.

    trainer = prepare(cfg)   # then trainer.run()

Settings, the run directory, the data and the checkpoints' headers come first: a mistake in any of
them is found in seconds, before a weight is read. Then the pivot writes the references the cache
lacks, and last the models load: the actor and (for GAE) the critic with their optimizers, the
frozen reference and the reward models. Precision: trained models keep fp32 parameters and optimizer
states and compute in the compute dtype through FSDP2's mixed precision, in one process too (a
one-rank process group); frozen models are stored in the compute dtype.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pbrl import distributed as dist
from pbrl import lora
from pbrl import memory, ppo
from pbrl.checkpoint import (
    TRAINER_FILE,
    check_pretrained,
    claim_run_dir_on_rank0,
    latest_checkpoint,
    load_args,
    load_model,
    load_pretrained,
    load_rank_state,
    rank_state_file,
    load_state,
    load_training_checkpoint,
    read_checkpoint_names,
)
from pbrl.cli import DTYPES
from pbrl.config import Config, shared_critic, validate
from pbrl.cudagraphs import CudaGraphs, cache_slots
from pbrl.files import weights_sha256
from pbrl.data import Problem, encode_prompt, load_mgsm, load_problems
from pbrl.pivot import (
    check_questions,
    check_writer,
    match_references,
    pivot_writer,
    read_references,
    write_references,
)
from pbrl.rewards import build_reward
from pbrl.sampler import Sampling
from pbrl.tokenizer import Tokenizer
from pbrl.trainer import Trained, Trainer


def prepare(cfg: Config, log=print) -> Trainer:
    """A Trainer for cfg, resumed from its newest checkpoint when cfg.run.resume says so."""
    cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
    dtype = DTYPES.get(cfg.models.dtype, torch.bfloat16 if cuda else torch.float32)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world, device = dist.init(one_rank_group=dtype != torch.float32,
                                    timeout_minutes=cfg.run.timeout_minutes)
    device = device if cfg.run.device == "auto" else torch.device(cfg.run.device)
    log = log if rank == 0 else (lambda *a, **k: None)
    out = Path(cfg.run.out_dir)
    pivot_cache = Path(cfg.data.pivot_cache or out / "pivot.jsonl")
    lock = claim_run_dir_on_rank0(out, cfg.run.resume, allowed=(pivot_cache,))
    train, english, held_out = load_data(cfg)
    policy_dir, tokenizer = check_checkpoints(cfg)
    prompts = render_prompts(cfg, tokenizer, train, load_args(policy_dir).max_position_embeddings)
    longest = max(map(len, prompts.values()))
    separate = cfg.rollout.placement == "separate"
    if device.type == "cuda":  # a plan that cannot fit is refused now, not by an OOM minutes later
        rollout_rank = separate and rank >= world - cfg.rollout.ranks
        memory.check_fits(memory.rollout_rank_plan(cfg, longest) if rollout_rank else
                          memory.plan(cfg, world - cfg.rollout.ranks * separate, longest),
                          torch.cuda.get_device_properties(device).total_memory)
    references = pivot_references(cfg, pivot_cache, english, dtype, device, log)
    common = dict(cfg=cfg, log=log, device=device, dtype=dtype, out=out, lock=lock,
                  tokenizer=tokenizer, policy_dir=policy_dir, train_problems=train,
                  prompts=prompts, eval_problems=held_out, references=references,
                  kl=ppo.AdaptiveKLController(cfg.ppo.kl_beta, cfg.ppo.kl_target,
                                              cfg.ppo.kl_horizon),
                  sampling=rollout_sampling(cfg, tokenizer, device))
    if separate:
        return separate_ranks(cfg, common, longest)
    actor, critic, reference = trained_models(cfg, dtype, device)
    trainer = Trainer(**common, rank=rank, world=world, actor=actor, critic=critic,
                      reference=reference, reward=build_reward(cfg.reward, cfg.models.embedder,
                                                               cfg.models.translator, dtype,
                                                               device))
    if cfg.rollout.tensor_parallel > 1:
        trainer.tp_group = dist.tensor_parallel_group(cfg.rollout.tensor_parallel, device)
        trainer.tp_twin = dist.tensor_parallel_twin(actor.model, trainer.tp_group, dtype, device)
    if cfg.rollout.compile:  # under FSDP, rollouts decode on a copy whose parameters never move;
        # under LoRA, on a copy with the adapters merged
        copy = actor.model if (dist.is_distributed() or cfg.lora.rank) and \
            trainer.tp_twin is None else None
        trainer.graphs = CudaGraphs(copy, dtype, device)
        trainer.slots = cache_slots(longest, cfg.rollout.max_new_tokens)
    if cfg.run.resume:
        resume(trainer)
    return trainer


def trained_models(cfg: Config, dtype, device) -> tuple[Trained, Trained | None, object]:
    """(the actor, the critic (None: a critic-free estimator), the frozen KL reference (None: a
    KL-free run; under LoRA the actor with its adapters off, no second model))."""
    compute = None if dtype == torch.float32 else dtype
    actor, critic = lora_models(cfg, dtype, device) if cfg.lora.rank else \
        (trained(cfg, load(cfg, cfg.models.policy, torch.float32, device, compute), cfg.ppo.lr),
         None)
    if cfg.ppo.uses_critic() and critic is None:
        model = load(cfg, cfg.models.critic or cfg.models.policy, torch.float32, device, compute,
                     True)
        critic = trained(cfg, model, cfg.ppo.critic_lr)
    reference = None
    if cfg.ppo.uses_reference():
        path = cfg.models.reference or cfg.models.policy
        reference = lora.AdaptersOff(actor.model) if cfg.lora.rank else \
            load(cfg, path, dtype, device).requires_grad_(False)
    return actor, critic, reference


def separate_ranks(cfg: Config, common: dict, longest: int) -> Trainer:
    """rollout.placement separate (pbrl/pipeline.py): the training ranks build the trained models
    (FSDP2 among themselves) and get their batches from their rollout ranks; a rollout rank holds a
    whole copy of the actor in the compute dtype, which the training ranks' weights refresh (in
    place: rollout.compile's graphs read it), and the reward. Training ranks evaluate eagerly."""
    from pbrl.pipeline import PipelinedTrainer, RolloutWorker
    device, dtype = common["device"], common["dtype"]
    trains, rank, world, stream, pairs, tp = dist.split(cfg.rollout.ranks, device,
                                                       cfg.rollout.tensor_parallel)
    if trains:
        actor, critic, reference = trained_models(cfg, dtype, device)
        trainer = PipelinedTrainer(**common, rank=rank, world=world, actor=actor, critic=critic,
                                   reference=reference, reward=None, stream=stream,
                                   pair=pairs[0])
    else:  # a whole copy of the actor, or (rollout.tensor_parallel) only this rank's shards
        copy = tensor_parallel_shards(common["policy_dir"], tp, dtype, device) if tp else \
            load_model(cfg.models.policy, dtype=dtype, device=device).requires_grad_(False)
        trainer = RolloutWorker(**common, rank=rank, world=world, actor=Trained(copy, None, 0.0),
                                critic=None, reference=None, stream=stream, pairs=pairs,
                                reward=build_reward(cfg.reward, cfg.models.embedder,
                                                    cfg.models.translator, dtype, device),
                                tp_group=tp, tp_twin=copy if tp else None)
        if cfg.rollout.compile:  # the streamed weights land in place: graphs read the copy itself
            trainer.graphs = CudaGraphs(None, dtype, device)
            trainer.slots = cache_slots(longest, cfg.rollout.max_new_tokens)
    if cfg.run.resume:
        resume(trainer)
    return trainer


def tensor_parallel_shards(policy_dir: Path, mesh, dtype, device):
    """A rollout rank's tensor-parallel twin of the policy (distributed.tensor_parallel_twin), its
    shards allocated once, for the streamed weights to land in."""
    from pbrl.model import Transformer
    with torch.device("meta"):
        plain = Transformer(load_args(policy_dir))
    return dist.allocate(dist.tensor_parallel_twin(plain, mesh, dtype, device), device)


def rollout_sampling(cfg: Config, tokenizer: Tokenizer, device) -> Sampling:
    r = cfg.rollout
    stop = torch.tensor(sorted(set(tokenizer.stop_ids)), dtype=torch.long, device=device)
    return Sampling(r.max_new_tokens, r.samples_per_prompt, r.temperature, r.top_k, r.top_p, stop,
                    tokenizer.pad_id or 0)


def load_data(cfg: Config) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(the training problems, their English originals, the held-out problems). English is read
    with the target languages, in one call: their files must line up row by row."""
    data = cfg.data
    by_lang = load_mgsm(data.path, list(dict.fromkeys(["en", *data.langs])))
    held_out = []
    if data.eval_path:
        held_out = load_problems("mgsm", data.eval_path, data.eval_langs, data.eval_limit)
    return [p for lang in data.langs for p in by_lang[lang]], by_lang["en"], held_out


def check_checkpoints(cfg: Config) -> tuple[Path, Tokenizer]:
    """The policy's directory and tokenizer, checked without reading weights; the critic and the
    reference read the policy's token ids, so its tokenizer must fit them too."""
    models = cfg.models
    policy_dir, tokenizer = check_pretrained(models.policy)
    tokenizer.template_args["enable_thinking"] = models.enable_thinking
    critic = (models.critic or models.policy) if cfg.ppo.uses_critic() else None
    reference = (models.reference or models.policy) if cfg.ppo.uses_reference() else None
    for path in filter(None, (critic, reference)):
        check_pretrained(path, tokenizer)
    args, tp = load_args(policy_dir), cfg.rollout.tensor_parallel
    if args.num_attention_heads % tp or args.num_key_value_heads % tp:
        raise ValueError(f"rollout.tensor_parallel={tp} must divide the policy's attention heads "
                         f"({args.num_attention_heads}) and key/value heads "
                         f"({args.num_key_value_heads}): each rank decodes whole heads")
    return policy_dir, tokenizer


def render_prompts(cfg: Config, tokenizer: Tokenizer, problems: list[Problem],
                   context: int) -> dict[Problem, list[int]]:
    """Every training problem's prompt as token ids, rendered once through the chat template. A
    prompt that leaves no room for rollout.max_new_tokens in the policy's context is refused now."""
    prompts = {problem: encode_prompt(tokenizer, problem) for problem in problems}
    problem, ids = max(prompts.items(), key=lambda item: len(item[1]))
    if len(ids) + cfg.rollout.max_new_tokens > context:
        raise ValueError(f"training problem {problem.id} ({problem.lang}, {cfg.data.path}) has a "
                         f"prompt of {len(ids)} tokens; with "
                         f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} it exceeds the "
                         f"policy's context of {context} tokens (max_position_embeddings)")
    budget = cfg.ppo.micro_batch_tokens
    if budget and len(ids) + cfg.rollout.max_new_tokens - 1 > budget:
        raise ValueError(f"training problem {problem.id} ({problem.lang}, {cfg.data.path}) has a "
                         f"prompt of {len(ids)} tokens; with up to rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens} its sequence does not fit "
                         f"ppo.micro_batch_tokens={budget}")
    return prompts


def pivot_references(cfg: Config, cache: Path, english: list[Problem], dtype, device, log):
    """problem id -> the pivot's English reference; the pivot (the policy when models.pivot is
    empty) first answers, on every rank, the problems the cache lacks: a run interrupted while its
    pivot wrote continues where it stopped. A cache begun by another pivot is refused."""
    done = read_references(cache)
    check_questions(done, english, cache)
    path, m = cfg.models.pivot or cfg.models.policy, cfg.models
    missing = any(p.id not in done for p in english)
    try:
        writer = pivot_writer(path, cfg.rollout.max_new_tokens, m.enable_thinking)
    except FileNotFoundError:
        if missing:
            raise
        writer = None
        log(f"pivot cache {cache}: complete; its writer is not checked ({path} is not here)")
    if writer is not None:
        check_writer(done, writer, cache, completing=missing)  # before the pivot loads
    if missing:
        pivot, tokenizer = load_pretrained(path, dtype, device)
        tokenizer.template_args["enable_thinking"] = m.enable_thinking
        write_references(pivot, tokenizer, english, cache, writer, batch_size=m.pivot_batch_size,
                         max_new_tokens=cfg.rollout.max_new_tokens, log=log)
        del pivot
    return match_references(cache, english)


def load(cfg: Config, path: str, dtype, device, compute_dtype=None, value_head: bool = False):
    """Stored in dtype, computed in compute_dtype; under several ranks (or mixed precision) built
    sharded, each rank reading only its part of the checkpoint."""
    shard = (lambda model: dist.shard(model, compute_dtype)) if dist.is_distributed() else None
    model = load_model(path, dtype=dtype, device=device, value_head=value_head, shard=shard)
    model.activation_checkpointing = cfg.models.activation_checkpointing
    if cfg.models.compile:
        model.compile_blocks()
    return model


def lora_models(cfg: Config, dtype, device) -> tuple[Trained, Trained | None]:
    """The policy as LoRA trains it (pbrl/lora.py): the base in the compute dtype, frozen, with
    fp32 adapters that alone the actor's optimizer holds; and for GAE without a models.critic of its
    own, the critic on the same base (its own adapters and the value head, config.shared_critic).
    Under FSDP2 the adapted model is built on the meta device and sharded (base and adapters in the
    same units, each computed in its own dtype), each rank reads only its rows of the base, and
    init_adapters draws the adapters whole from the seed and keeps each rank's rows: no rank holds
    the whole base."""
    shared, c = shared_critic(cfg), cfg.lora

    def adapt(model):  # on the meta device when sharded: init_adapters draws them after the load
        lora.add_lora(model, c.rank, c.alpha, c.targets, seed=cfg.run.seed, critic=shared)
        return model
    sharded = dist.is_distributed()
    model = load_model(cfg.models.policy, dtype=dtype, device=device, value_head=shared,
                       shard=(lambda m: dist.shard(adapt(m))) if sharded else None)
    if sharded:
        lora.init_adapters(model, cfg.run.seed)
    else:
        adapt(model)
    model.activation_checkpointing = cfg.models.activation_checkpointing
    if cfg.models.compile:
        model.compile_blocks()
    actor = trained(cfg, model, cfg.ppo.lr, lora.trained_parameters(model, "actor"))
    critic = trained(cfg, model, cfg.ppo.critic_lr, lora.trained_parameters(model, "critic"),
                     adapters="critic") if shared else None
    return actor, critic


def check_lora_resume(trainer: Trainer, ckpt: Path) -> None:
    """A LoRA checkpoint resumes only as LoRA, onto the base it was trained on (it holds the
    adapters only, and the base is reloaded from models.policy: another one would take them
    silently); a full one only without."""
    adapted = any(".lora_" in n for n in read_checkpoint_names(ckpt, "actor"))
    if adapted != bool(trainer.cfg.lora.rank):
        raise ValueError(f"--run.resume: {ckpt} holds a {'LoRA' if adapted else 'full-parameter'} "
                         f"actor, and lora.rank is {trainer.cfg.lora.rank}: resume it as it was "
                         f"trained")
    base = (load_state(ckpt / TRAINER_FILE).get("lora") or {}).get("base_sha256")
    if base is not None and base != weights_sha256(trainer.policy_dir):
        raise ValueError(f"--run.resume: {ckpt}'s adapters were trained on another base than "
                         f"models.policy = {trainer.cfg.models.policy} (its weights differ); "
                         f"resume with the base it was trained on")


def trained(cfg: Config, model, lr: float, params=None, adapters: str | None = None) -> Trained:
    """The model with AdamW over what of it trains: all of it, or (LoRA) `params`, the adapters
    its passes select (`adapters`)."""
    params = list(model.parameters()) if params is None else params
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.ppo.weight_decay)
    return Trained(model, optimizer, lr, adapters)


def resume(trainer: Trainer) -> None:
    """The newest checkpoint of the run directory into the trainer: models, optimizers, step, RNG
    state, and the KL coefficient the adaptive controller reached (a fixed ppo.kl_beta is the
    config's; docs/scale.md says what a resume takes from where)."""
    ckpt = latest_checkpoint(trainer.out)
    if ckpt is None:
        trainer.log(f"resume: no checkpoint under {trainer.out / 'checkpoints'}; starting from "
                    f"step 0")
        return
    from pbrl.pipeline import RolloutWorker
    if isinstance(trainer, RolloutWorker):  # its weights come streamed from the training ranks
        trainer.step = load_state(ckpt / TRAINER_FILE)["step"]
        # a pipelined run's checkpoint: its training ranks hold batch `step`, drawn before it
        trainer.resumed = rank_state_file(ckpt, 0).is_file()
        return
    check_lora_resume(trainer, ckpt)
    trained = trainer.trained
    state = load_training_checkpoint(ckpt, {k: t.model for k, t in trained.items()},
                                     {k: t.optimizer for k, t in trained.items()},
                                     trainer.cfg.run.steps)
    trainer.step = state["step"]
    if trainer.cfg.ppo.kl_target is not None:  # the controller's state, not a setting
        trainer.kl.beta = state["kl_beta"]
    elif state["kl_beta"] != trainer.kl.beta:
        trainer.log(f"resume: ppo.kl_beta = {trainer.kl.beta} as configured (the checkpoint's "
                    f"run had {state['kl_beta']})")
    torch.set_rng_state(state["torch_rng"])
    mine = load_rank_state(ckpt)  # what this rank alone had (a pipelined run's batch in flight)
    if mine is not None:
        trainer.restore_rank_state(mine)
    done = trainer.step == trainer.cfg.run.steps
    trainer.log(f"resumed from {ckpt} at step {trainer.step}"
                + (" (the run is complete: nothing to train)" if done else ""))
