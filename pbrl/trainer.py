"""The PB-RLSVR training loop: PPO on target-language prompts, rewarded against an English pivot.

pbrl/setup.py builds a Trainer (checks, data, pivot references, models, optimizers); this file is
what the Trainer does with it. One iteration, `train_step`, in seven numbered, timed phases (as
verl's):
  1. sample      this rank's share of the step's problems (a seeded function of the step)
  2. rollout     n samples per problem with the KV-cached sampler, the actor gathered once
  3. reward      the configured reward, against the pivot's English reference of the same problem id
  4. forward     old and reference log-probs, and the critic's values, over the same sequences
  5. advantages  GAE over per-token rewards; or (grpo, rloo) each response against its group
  6. update      PPO epochs over minibatches of micro-batches: the actor, then the critic
  7. metrics     one line on stdout, one JSON line in {out_dir}/metrics.jsonl
Sampling noise is seeded per sequence by (seed, step, problem, sample), so a run samples the same
whatever its number of ranks, and a resumed run continues exactly. docs/iteration.md reads one
iteration top to bottom.
"""
from __future__ import annotations

import json
import math
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pbrl import distributed as dist
from pbrl import ppo, rollout
from pbrl.checkpoint import export, latest_checkpoint, save_training_checkpoint
from pbrl.cli import Progress
from pbrl.config import Config
from pbrl.data import Problem
from pbrl.evaluate import accuracy_by_language, evaluate
from pbrl.graphs import CudaGraphs
from pbrl.loggers import Loggers
from pbrl.model import Transformer
from pbrl.sampler import Sampling, complete
from pbrl.tokenizer import Tokenizer


@dataclass
class Trained:
    """A model the update trains, with its optimizer and base learning rate."""
    model: Transformer
    optimizer: torch.optim.Optimizer
    lr: float


@dataclass
class Trainer:
    """One run: what setup.prepare built, and the loop over it."""
    cfg: Config
    log: Callable                       # prints on rank 0, nothing elsewhere
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype                  # the compute dtype
    out: Path                           # run.out_dir
    lock: object                        # rank 0's lock on out, released when run() ends
    tokenizer: Tokenizer
    policy_dir: Path                    # the export copies its tokenizer files
    train_problems: list[Problem]
    prompts: dict[Problem, list[int]]   # each training problem's prompt, rendered once
    eval_problems: list[Problem]
    references: dict[str, str]          # problem id -> the pivot's English reference
    actor: Trained
    critic: Trained | None              # None: a critic-free estimator (grpo, rloo)
    reference: Transformer              # frozen: the KL anchor
    reward: Callable                    # samples -> {"reward": [B], component: [B], ...}
    kl: ppo.AdaptiveKLController
    sampling: Sampling                  # the rollouts' settings (setup checks them once)
    graphs: CudaGraphs | None = None    # rollout.compile: decode through CUDA graphs
    slots: int | None = None            # rollout.compile: one KV-cache length for every rollout
    step: int = 0
    eval_records: dict[int, list[dict]] = field(default_factory=dict)  # step -> eval records
    loggers: Loggers | None = None

    @property
    def trained(self) -> dict[str, Trained]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic else {})}

    def train_step(self) -> dict:
        cfg, r, p, n = self.cfg, self.cfg.rollout, self.cfg.ppo, self.cfg.rollout.samples_per_prompt
        timings, start = {}, time.perf_counter()
        factor = ppo.lr_factor(self.step, p.warmup_steps, p.schedule, cfg.run.steps)
        for t in self.trained.values():
            for group in t.optimizer.param_groups:
                group["lr"] = t.lr * factor
        # 1. sample
        problems = rollout.problems_for_step(self.train_problems, self.step, r.prompts_per_step,
                                             cfg.run.seed, self.rank, self.world)
        prompts = [self.prompts[problem] for problem in problems]
        # 2. rollout
        with timed(timings, "rollout"), self.sampling_policy() as policy:
            seeds = torch.tensor([rollout.sequence_seed(cfg.run.seed, self.step, problem, j)
                                  for problem in problems for j in range(n)])
            completions = complete(policy, prompts, self.sampling, seeds, self.slots, self.graphs)
        with torch.no_grad():
            # 3. reward
            with timed(timings, "reward"):
                texts = [self.tokenizer.decode(ids) for ids in completions.as_lists()]
                samples, rewards = rollout.score(self.reward, problems, texts, self.references, n)
                scores = rewards["reward"].to(self.device)
            # 4. forward: old and reference log-probs, values
            rows = [prompt for prompt in prompts for _ in range(n)]
            sequences = rollout.sequences(rows, completions)
            tokens, lengths, mask, sampled = (t.to(self.device) for t in sequences)
            seqs = (tokens, lengths, mask)
            with timed(timings, "old_logprobs"):
                old = self.per_token(self.actor.model, "logprobs", seqs)
            with timed(timings, "ref_logprobs"):
                ref = self.per_token(self.reference, "logprobs", seqs)
            values = torch.zeros_like(old)
            if self.critic is not None:
                with timed(timings, "values"):
                    values = self.per_token(self.critic.model, "values", seqs)
            # 5. advantages
            with timed(timings, "advantages"):
                kl = ppo.kl_estimate(old, ref, p.kl_estimator)
                groups = torch.arange(len(problems), device=self.device).repeat_interleave(n)
                advantages, returns = rollout.advantages(p, scores, kl, values, mask, groups,
                                                         self.kl.beta, dist.all_reduce_sum)
        exp = rollout.Experience(*seqs, sampled, old, ref, values, kl, advantages, returns)
        # 6. update
        with timed(timings, "update"):
            stats = self.update(exp)
        # 7. metrics
        return self.metrics(exp, samples, rewards, stats, timings, time.perf_counter() - start)

    def sampling_policy(self):
        """The model a rollout decodes on: the actor with every FSDP unit gathered, or
        (rollout.compile) the decoding copy that CudaGraphs keeps."""
        if self.graphs is None:
            return dist.gathered(self.actor.model)
        return self.graphs.policy(self.actor.model)

    def per_token(self, model: Transformer, output: str, seqs: tuple) -> torch.Tensor:
        """rollout.per_token's log-probs or values [B, L - 1], micro_batch_size rows at a time."""
        size, temperature = self.cfg.ppo.micro_batch_size, self.cfg.rollout.temperature
        parts = [rollout.per_token(model, *(x[i:i + size] for x in seqs), output, temperature)
                 for i in range(0, len(seqs[0]), size)]
        return torch.cat([part[0] if output == "logprobs" else part for part in parts])

    def update(self, exp: rollout.Experience) -> dict[str, float]:
        """PPO epochs over minibatches; a minibatch's loss is normalised by its token count on all
        ranks."""
        p, sums, norms = self.cfg.ppo, {}, []
        losses = [(self.actor, rollout.actor_loss)]
        losses += [(self.critic, rollout.critic_loss)] if self.critic else []
        for _ in range(p.epochs):
            for rows in torch.arange(len(exp.tokens), device=self.device).chunk(p.minibatches):
                num_tokens = dist.all_reduce_sum(exp.mask[rows].sum().float())
                for trained, loss_fn in losses:
                    stats, norm = self.optimize(trained, loss_fn, exp.rows(rows), num_tokens)
                    sums.update({k: sums.get(k, 0.0) + v for k, v in stats.items()})
                    norms += [norm] if trained is self.actor else []
        s = dict(zip(sums, dist.all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        passes, tokens = p.epochs * p.minibatches, max(s["tokens"], 1.0)
        per_token = ("entropy", "clipfrac", "approx_kl", "value_clipfrac", "kl_loss")
        return {**{k: s[k] / passes for k in ("policy_loss", "value_loss") if k in s},
                **{k: s[k] / tokens for k in per_token if k in s},
                "grad_norm": sum(norms) / len(norms)}

    def optimize(self, trained: Trained, loss_fn, exp: rollout.Experience, num_tokens):
        """One optimizer step over these rows, micro-batch by micro-batch; returns (sums of the
        losses' statistics, the gradient norm before clipping)."""
        trained.optimizer.zero_grad(set_to_none=True)
        sums = {}
        for rows in torch.arange(len(exp.tokens),
                                 device=self.device).split(self.cfg.ppo.micro_batch_size):
            loss, stats = loss_fn(trained.model, exp.rows(rows), num_tokens, self.cfg.ppo,
                                  self.cfg.rollout.temperature, self.kl.beta)
            loss.backward()
            sums.update({k: sums.get(k, 0.0) + v for k, v in stats.items()})
        params = [q for q in trained.model.parameters() if q.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.ppo.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):  # the same on every rank: the norm is global
            raise FloatingPointError(f"step {self.step + 1}: the {loss_fn.__name__}'s gradient "
                                     f"norm is {norm} (a reward, advantage or loss is not "
                                     f"finite); training stopped before applying it, and the "
                                     f"last checkpoint is kept")
        trained.optimizer.step()
        return sums, norm

    def metrics(self, exp, samples, rewards, stats, timings, seconds) -> dict:
        """Step 7: the iteration's numbers, over all ranks; the KL controller moves by the batch's
        KL."""
        r = self.cfg.rollout
        kl_sum, tokens = dist.all_reduce_sum(torch.stack([ppo.masked_sum(exp.kl, exp.mask),
                                                          exp.mask.sum().float()])).tolist()
        self.kl.update(kl_sum / max(tokens, 1.0), r.prompts_per_step * r.samples_per_prompt)
        metrics = {"step": self.step + 1, "kl": kl_sum / max(tokens, 1.0), **stats,
                   **rollout.rollout_metrics(samples, rewards, exp, dist.all_reduce_sum,
                                             dist.all_gather_objects,
                                             critic=self.critic is not None)}
        metrics["seconds"] = seconds
        metrics["tokens_per_s"] = metrics["response_tokens"] / seconds
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        metrics["peak_memory_mb"] = peak / 2**20
        metrics["lr"], metrics["kl_beta"] = self.actor.optimizer.param_groups[0]["lr"], self.kl.beta
        return metrics

    # ---------------------------------------------------------------------------------- around the
    # loop
    def run(self, steps: int | None = None) -> list[dict]:
        """Train until run.steps (or `steps` more iterations); returns this call's metrics. The run
        directory's lock is released when it returns or fails."""
        run = self.cfg.run
        end = min(run.steps, self.step + steps) if steps else run.steps
        try:
            self.open_logs()
            history = []
            if self.step == 0 and self.eval_problems:
                history.append(self.log_metrics({"step": 0, **self.evaluate()}))
            bar = Progress(end - self.step, "train", " steps", enabled=self.rank == 0)
            while self.step < end:
                metrics = self.train_step()
                self.step += 1
                bar.update()
                if self.eval_problems and self.due(run.eval_every):
                    metrics.update(self.evaluate())
                history.append(self.log_metrics(metrics))
                if self.due(run.checkpoint_every):
                    self.save()
            bar.close()
            if self.step == run.steps:
                self.export_final()
            return history
        finally:
            if self.loggers is not None:
                self.loggers.close()
                self.loggers = None
            if self.lock is not None:
                self.lock.close()

    def due(self, every: int | None) -> bool:
        """Whether this step is one of every N (or the run's last)."""
        return self.step == self.cfg.run.steps or bool(every and self.step % every == 0)

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy per language on the held-out problems, each rank every world-th problem.
        Records already kept for this step are reused (runs that share a warm start share its
        eval)."""
        if self.step not in self.eval_records:
            with dist.gathered(self.actor.model) as model:
                records = evaluate(model, self.tokenizer, self.eval_problems[self.rank::self.world],
                                   batch_size=64, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                   progress=False)
            gathered = dist.all_gather_objects(records)
            self.eval_records[self.step] = [r for part in gathered for r in part]
        accuracy = accuracy_by_language(self.eval_records[self.step])
        return {f"acc/{k}": v for k, v in accuracy.items()}

    def save(self) -> None:
        trained = self.trained
        save_training_checkpoint(self.out, self.step, {k: t.model for k, t in trained.items()},
                                 {k: t.optimizer for k, t in trained.items()},
                                 {"step": self.step, "kl_beta": self.kl.beta,
                                  "torch_rng": torch.get_rng_state()},
                                 source_dir=self.policy_dir, keep=self.cfg.run.keep_checkpoints)

    def export_final(self) -> None:
        """The last checkpoint, streamed into a HF directory by rank 0 while the others wait."""
        if self.rank == 0:
            ckpt = latest_checkpoint(self.out)
            self.log(f"final policy: exporting {ckpt} on rank 0 (the other ranks wait)")
            export(ckpt, self.out / "final", "actor", self.dtype, overwrite=True)  # its own
            self.log(f"final policy: {self.out / 'final'}")
        dist.barrier()

    def open_logs(self) -> None:
        """Rank 0: the run's config.json, and its loggers (metrics.jsonl cut after this step)."""
        if self.rank == 0:
            r = self.cfg.run
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            self.loggers = Loggers(self.out, r.loggers, r.name or self.out.name, self.cfg.to_dict(),
                                   r.wandb_project, r.wandb_mode, after_step=self.step)

    def log_metrics(self, metrics: dict) -> dict:
        if self.rank == 0:
            self.loggers.log(metrics)
            shown = [f"step {metrics['step']:>4}/{self.cfg.run.steps}"]
            for key, fmt in (("reward", ".3f"), ("kl", ".4f"), ("clipfrac", ".3f"),
                             ("entropy", ".3f"),
                             ("value_loss", ".4f"), ("response_length", ".1f"), ("seconds", ".2f")):
                if key in metrics:
                    shown.append(f"{key} {metrics[key]:{fmt}}")
            shown += [f"{k.removeprefix('acc/')} {v:.1f}%"
                      for k, v in metrics.items() if k.startswith("acc/")]
            self.log(" | ".join(shown))
        return metrics


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
