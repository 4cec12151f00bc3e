"""The PB-RLSVR training loop: PPO with GAE on target-language prompts, rewarded against an English pivot.

One iteration (`Trainer.train_step`), each phase named and timed as verl does:
  1. sample      this rank's share of the step's problems (a seeded function of the step: no loader state to save)
  2. rollout     n samples per problem with the KV-cached sampler, the actor's parameters gathered once
  3. reward      the configured reward, against the pivot's English reference of the same problem id
  4. forward     old log-probs (actor), reference log-probs and values (critic) over prompt + response
  5. advantages  per-token rewards (the score on the last token, -beta KL on every token), GAE, whitening; or,
                 without a critic (ppo.advantage grpo | rloo), each response against the other samples of its prompt
  6. update      PPO epochs over minibatches of micro-batches: actor, then critic; AdamW, clipping, LR schedule
  7. metrics     one line on stdout, one JSON line in {out_dir}/metrics.jsonl (rank 0)

Sampling noise is seeded per sequence by (seed, step, problem id, sample index), so a run gives the same rollouts
whatever the number of ranks or the batch layout, and a resumed run continues exactly. The pure pieces live in
pbrl/rollout.py, the maths in pbrl/ppo.py, checkpoints in pbrl/checkpoint.py.
"""
from __future__ import annotations

import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pbrl import distributed as dist
from pbrl import memory, ppo, rollout
from pbrl.checkpoint import (check_pretrained, claim_run_dir_on_rank0, export, latest_checkpoint, load_args,
                             load_model, load_pretrained, load_training_checkpoint, save_training_checkpoint)
from pbrl.cli import Progress
from pbrl.config import Config, validate
from pbrl.data import encode_prompt, load_problems
from pbrl.evaluate import accuracy_by_language, evaluate
from pbrl.files import read_text
from pbrl.loggers import Loggers
from pbrl.model import empty_like
from pbrl.pivot import PIVOT_BATCH_SIZE, match_references, write_references
from pbrl.rewards import build_reward
from pbrl.sampler import cache_slots, generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


class Trainer:
    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        # Precision: trainable models (actor, critic) keep fp32 parameters and optimizer states; forward and
        # backward run in the compute dtype through FSDP2's mixed precision, in a single process too (a
        # one-rank process group). Frozen models are stored in the compute dtype.
        cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
        self.dtype = DTYPES.get(cfg.models.dtype, torch.bfloat16 if cuda else torch.float32)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.rank, self.world, device = dist.init(one_rank_group=self.dtype != torch.float32,
                                                  timeout_minutes=cfg.run.timeout_minutes)
        self.device = device if cfg.run.device == "auto" else torch.device(cfg.run.device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.out = Path(cfg.run.out_dir)
        pivot_cache = Path(cfg.data.pivot_cache or self.out / "pivot.jsonl")
        self.lock = claim_run_dir_on_rank0(self.out, cfg.run.resume, allowed=(pivot_cache,))

        # Data, pivot references and checkpoint headers come before any weights: mistakes surface in seconds.
        data, models = cfg.data, cfg.models
        self.train_problems = load_problems("mgsm", data.path, data.langs)
        self.eval_problems = load_problems("mgsm", data.eval_path, data.eval_langs, data.eval_limit) \
            if data.eval_path else []
        english = load_problems("mgsm", data.path, ["en"])
        self.references = match_references(pivot_cache, english) if pivot_cache.is_file() else None
        critic = (models.critic or models.policy) if cfg.ppo.advantage == "gae" else None
        reference = models.reference or models.policy
        self.policy_dir, self.tokenizer = check_pretrained(models.policy)
        self.tokenizer.template_args["enable_thinking"] = models.enable_thinking
        for path in filter(None, (critic, reference)):  # they read the policy's token ids
            check_pretrained(path, self.tokenizer)
        # The longest training prompt: one that leaves no room for the response is refused now, not at the step
        # that samples it; it sizes the KV cache and the memory plan.
        lengths = [len(encode_prompt(self.tokenizer, problem)) for problem in self.train_problems]
        r, longest = cfg.rollout, max(lengths)
        context = load_args(self.policy_dir).max_position_embeddings
        if longest + r.max_new_tokens > context:
            problem = self.train_problems[lengths.index(longest)]
            raise ValueError(f"training problem {problem.id} ({problem.lang}, {data.path}) has a prompt of {longest} "
                             f"tokens; with rollout.max_new_tokens={r.max_new_tokens} it exceeds the policy's "
                             f"context of {context} tokens (max_position_embeddings)")
        # Compiled rollouts all get one cache length, so that they replay one set of CUDA graphs (None: each its own).
        self.rollout_slots = cache_slots(longest, r.max_new_tokens, compile=True) if r.compile else None
        if self.device.type == "cuda":  # a plan that cannot fit is refused now, not by an OOM minutes later
            memory.check_fits(memory.plan(cfg, self.world, longest),
                              torch.cuda.get_device_properties(self.device).total_memory)

        if self.references is None:  # the pivot (the policy when models.pivot is empty) answers once, every rank
            pivot, pivot_tokenizer = load_pretrained(models.pivot or models.policy, self.dtype, self.device)
            pivot_tokenizer.template_args["enable_thinking"] = models.enable_thinking
            write_references(pivot, pivot_tokenizer, english, pivot_cache, batch_size=PIVOT_BATCH_SIZE,
                             max_new_tokens=cfg.rollout.max_new_tokens, log=self.log)
            del pivot
            self.references = match_references(pivot_cache, english)
        compute = None if self.dtype == torch.float32 else self.dtype
        self.actor = self.load(models.policy, torch.float32, compute)
        self.critic = self.load(critic, torch.float32, compute, value_head=True) if critic else None
        self.reference = self.load(reference, self.dtype).requires_grad_(False).eval()
        # Compiled rollouts under FSDP decode on a whole copy of the actor in the compute dtype, refreshed from the
        # actor before each rollout: FSDP's gathered parameters land at new addresses at every all-gather, and a
        # CUDA graph reads its inputs where they were when it was recorded (each move would record it again).
        self.decoder = empty_like(self.actor, self.dtype, self.device).requires_grad_(False) \
            if cfg.rollout.compile and dist.is_distributed() else None
        self.reward_fn = build_reward(cfg.reward, models.embedder, models.translator, self.dtype, self.device)
        p = cfg.ppo
        # The trained models, each with its optimizer and learning rate: what the update steps and checkpoints hold.
        self.trained = {"actor": (self.actor, torch.optim.AdamW(self.actor.parameters(), lr=p.lr,
                                                                weight_decay=p.weight_decay), p.lr)}
        if self.critic is not None:
            self.trained["critic"] = (self.critic, torch.optim.AdamW(self.critic.parameters(), lr=p.critic_lr,
                                                                     weight_decay=p.weight_decay), p.critic_lr)
        self.kl = ppo.AdaptiveKLController(p.kl_beta, p.kl_target, p.kl_horizon)
        self.step = 0
        self.loggers = None  # opened by run(), on rank 0
        self.eval_records: dict[int, list[dict]] = {}  # step -> every held-out problem's eval record
        if cfg.run.resume:
            self.resume()

    def load(self, path: str, dtype: torch.dtype, compute_dtype: torch.dtype | None = None, value_head: bool = False):
        """Stored in dtype, computed in compute_dtype; with several ranks (or mixed precision) built sharded, each
        rank reading only its part of the checkpoint."""
        shard = (lambda model: dist.shard(model, compute_dtype)) if dist.is_distributed() else None
        model = load_model(path, dtype=dtype, device=self.device, value_head=value_head, shard=shard).train()
        model.activation_checkpointing = self.cfg.models.activation_checkpointing
        if self.cfg.models.compile:
            model.compile_blocks()
        return model

    @contextmanager
    def sampling_policy(self):
        """The model a rollout samples from: the actor with every FSDP unit gathered, or the decoder (see __init__)
        with the actor's parameters copied in."""
        self.actor.eval()
        try:
            if self.decoder is None:
                with dist.gathered(self.actor):
                    yield self.actor
            else:
                # One tensor gathered at a time (never the whole actor next to its copy), its shards cast to the
                # compute dtype first, as FSDP casts them before its own all-gathers: half the bytes of fp32.
                with torch.no_grad():
                    for mine, theirs in zip(self.decoder.parameters(), self.actor.parameters(), strict=True):
                        mine.copy_(theirs.to(mine.dtype).full_tensor())
                yield self.decoder
        finally:
            self.actor.train()

    # ------------------------------------------------------------------------------------------ one iteration
    def train_step(self) -> dict:
        cfg, r, p = self.cfg, self.cfg.rollout, self.cfg.ppo
        timings: dict[str, float] = {}
        start = time.perf_counter()
        for _, opt, lr in self.trained.values():
            for group in opt.param_groups:
                group["lr"] = lr * ppo.lr_factor(self.step, p.warmup_steps, p.schedule, cfg.run.steps)
        # 1. sample
        problems = rollout.problems_for_step(self.train_problems, self.step, r.prompts_per_step, cfg.run.seed,
                                             self.rank, self.world)
        # 2. rollout
        with timed(timings, "rollout"):
            prompts = [encode_prompt(self.tokenizer, problem) for problem in problems]
            seeds = [rollout.sequence_seed(cfg.run.seed, self.step, problem, j)
                     for problem in problems for j in range(r.samples_per_prompt)]
            with self.sampling_policy() as policy:
                completions = generate(policy, prompts, r.max_new_tokens, temperature=r.temperature,
                                       top_k=r.top_k, top_p=r.top_p, n=r.samples_per_prompt,
                                       stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id or 0,
                                       seeds=seeds, return_logprobs=True, compile=r.compile,
                                       slots=self.rollout_slots)
        with torch.no_grad():
            # 3. reward
            with timed(timings, "reward"):
                texts = [self.tokenizer.decode(ids) for ids in completions.as_lists()]
                samples, rewards = rollout.score(self.reward_fn, problems, texts, self.references,
                                                 r.samples_per_prompt)
                scores = rewards["reward"].to(self.device)
            # 4. forward: old and reference log-probs, values
            rows = [prompt for prompt in prompts for _ in range(r.samples_per_prompt)]
            ids, mask, response_mask = (t.to(self.device) for t in rollout.pack(rows, completions))
            seqs = (ids, mask, response_mask)
            with timed(timings, "old_logprobs"):
                old = self.in_micro_batches(lambda *x: rollout.response_logprobs(self.actor, *x, r.temperature)[0],
                                            *seqs)
            with timed(timings, "ref_logprobs"):
                ref = self.in_micro_batches(
                    lambda *x: rollout.response_logprobs(self.reference, *x, r.temperature)[0], *seqs)
            values = torch.zeros_like(old)
            if self.critic is not None:
                with timed(timings, "values"):
                    values = self.in_micro_batches(lambda *x: rollout.response_values(self.critic, *x), *seqs)
            # 5. advantages
            with timed(timings, "advantages"):
                kl = ppo.kl_estimate(old, ref, p.kl_estimator)
                groups = torch.arange(len(problems), device=self.device).repeat_interleave(r.samples_per_prompt)
                advantages, returns = rollout.advantages(p, scores, kl, values, response_mask, groups, self.kl.beta,
                                                         dist.all_reduce_sum)
        exp = rollout.Experience(ids, mask, response_mask, completions.logprobs.to(self.device), old, ref, values,
                                 kl, advantages, returns)
        # 6. update
        with timed(timings, "update"):
            stats = self.update(exp)
        # 7. metrics
        kl_sum, tokens = dist.all_reduce_sum(torch.stack([ppo.masked_sum(kl, response_mask),
                                                          response_mask.sum().float()])).tolist()
        self.kl.update(kl_sum / max(tokens, 1.0), r.prompts_per_step * r.samples_per_prompt)
        metrics = {"step": self.step + 1, "kl": kl_sum / max(tokens, 1.0), **stats,
                   **rollout.rollout_metrics(samples, rewards, exp, dist.all_reduce_sum, dist.all_gather_objects,
                                             critic=self.critic is not None)}
        metrics["seconds"] = time.perf_counter() - start
        metrics["tokens_per_s"] = metrics["response_tokens"] / metrics["seconds"]
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["peak_memory_mb"] = (torch.cuda.max_memory_allocated() if self.device.type == "cuda" else
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        metrics["lr"], metrics["kl_beta"] = self.trained["actor"][1].param_groups[0]["lr"], self.kl.beta
        return metrics

    def in_micro_batches(self, forward, *tensors) -> torch.Tensor:
        """forward(*rows of tensors) -> [rows, T], run micro_batch_size rows at a time, concatenated."""
        size = self.cfg.ppo.micro_batch_size
        return torch.cat([forward(*(t[i:i + size] for t in tensors)) for i in range(0, len(tensors[0]), size)])

    def update(self, exp: rollout.Experience) -> dict[str, float]:
        """PPO epochs over minibatches; each minibatch's loss is normalised by its token count over all ranks."""
        p = self.cfg.ppo
        losses = {"actor": rollout.actor_loss, "critic": rollout.critic_loss}
        sums: dict[str, torch.Tensor] = {}
        grad_norms = []
        for _ in range(p.epochs):
            for rows in torch.arange(len(exp.input_ids), device=self.device).chunk(p.minibatches):
                num_tokens = dist.all_reduce_sum(exp.response_mask[rows].sum().float())
                for name, (model, optimizer, _) in self.trained.items():
                    norm = self.optimize(model, optimizer, losses[name], exp, rows, num_tokens, sums)
                    grad_norms += [norm] if name == "actor" else []
        s = dict(zip(sums, dist.all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        passes, tokens = p.epochs * p.minibatches, max(s["tokens"], 1.0)
        return {**{k: s[k] / passes for k in ("policy_loss", "value_loss") if k in s},
                **{k: s[k] / tokens for k in ("entropy", "clipfrac", "approx_kl", "value_clipfrac", "kl_loss")
                   if k in s}, "grad_norm": sum(grad_norms) / len(grad_norms)}

    def optimize(self, model, optimizer, loss_fn, exp, rows, num_tokens, sums) -> float:
        """One optimizer step on a minibatch, accumulating micro-batch gradients; returns the gradient norm."""
        optimizer.zero_grad(set_to_none=True)
        size = self.cfg.ppo.micro_batch_size
        for i in range(0, len(rows), size):
            loss, stats = loss_fn(model, exp.rows(rows[i:i + size]), num_tokens, self.cfg.ppo,
                                  self.cfg.rollout.temperature, self.kl.beta)
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad],
                                              self.cfg.ppo.grad_clip)
        optimizer.step()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ------------------------------------------------------------------------------------------ eval, run, resume
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy per language on the held-out problems; each rank takes every world-th problem. Records
        already in eval_records for this step are reused (runs that share a warm start share its eval)."""
        if self.step not in self.eval_records:
            self.actor.eval()
            with dist.gathered(self.actor):
                records = evaluate(self.actor, self.tokenizer, self.eval_problems[self.rank::self.world],
                                   batch_size=64, max_new_tokens=self.cfg.rollout.max_new_tokens, progress=False)
            self.actor.train()
            self.eval_records[self.step] = [r for part in dist.all_gather_objects(records) for r in part]
        return {f"acc/{k}": v for k, v in accuracy_by_language(self.eval_records[self.step]).items()}

    def resume(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.log(f"resume: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
            return
        state = load_training_checkpoint(ckpt, {k: m for k, (m, _, _) in self.trained.items()},
                                         {k: opt for k, (_, opt, _) in self.trained.items()}, self.cfg.run.steps)
        self.step, self.kl.beta = state["step"], state["kl_beta"]
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {ckpt} at step {self.step}" + (" (the run is complete: nothing to train)"
                                                               if self.step == self.cfg.run.steps else ""))

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until run.steps (or `steps` more iterations); returns this call's metrics. The run directory's
        lock is released when it returns or fails."""
        try:
            return self._run(steps)
        finally:
            if self.loggers is not None:
                self.loggers.close()
            if self.lock is not None:
                self.lock.close()

    def _run(self, steps: int | None) -> list[dict]:
        cfg = self.cfg
        end = min(cfg.run.steps, self.step + steps) if steps else cfg.run.steps
        metrics_file = self.out / "metrics.jsonl"
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            if metrics_file.is_file():  # only when resuming: the steps after the checkpoint are redone
                kept = [line for line in read_text(metrics_file).splitlines() if json.loads(line)["step"] <= self.step]
                metrics_file.write_text("".join(line + "\n" for line in kept))
            r = cfg.run
            self.loggers = Loggers(self.out, r.loggers, r.name or self.out.name, cfg.to_dict(), r.wandb_project,
                                   r.wandb_mode)
        history = []
        if self.step == 0 and self.eval_problems:
            history.append(self.log_metrics({"step": 0, **self.evaluate()}))
        bar = Progress(end - self.step, "train", " steps", enabled=self.rank == 0)
        while self.step < end:
            metrics = self.train_step()
            self.step += 1
            bar.update()
            last = self.step == cfg.run.steps
            if self.eval_problems and (last or (cfg.run.eval_every and self.step % cfg.run.eval_every == 0)):
                metrics.update(self.evaluate())
            history.append(self.log_metrics(metrics))
            if last or (cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0):
                save_training_checkpoint(self.out, self.step, {k: m for k, (m, _, _) in self.trained.items()},
                                         {k: opt for k, (_, opt, _) in self.trained.items()},
                                         {"step": self.step, "kl_beta": self.kl.beta,
                                          "torch_rng": torch.get_rng_state()}, source_dir=self.policy_dir,
                                         keep=cfg.run.keep_checkpoints)
        bar.close()
        if self.step == cfg.run.steps:  # the last step's checkpoint, streamed into a HF directory
            if self.rank == 0:
                ckpt = latest_checkpoint(self.out)
                self.log(f"final policy: exporting {ckpt} on rank 0 (the other ranks wait)")
                export(ckpt, self.out / "final", "actor", self.dtype)
                self.log(f"final policy: {self.out / 'final'}")
            dist.barrier()
        return history

    def log_metrics(self, metrics: dict) -> dict:
        if self.rank == 0:
            self.loggers.log(metrics)
            shown = [f"step {metrics['step']:>4}/{self.cfg.run.steps}"]
            for key, fmt in (("reward", ".3f"), ("kl", ".4f"), ("clipfrac", ".3f"), ("entropy", ".3f"),
                             ("value_loss", ".4f"), ("response_length", ".1f"), ("seconds", ".2f")):
                if key in metrics:
                    shown.append(f"{key} {metrics[key]:{fmt}}")
            shown += [f"{k.removeprefix('acc/')} {v:.1f}%" for k, v in metrics.items() if k.startswith("acc/")]
            self.log(" | ".join(shown))
        return metrics
