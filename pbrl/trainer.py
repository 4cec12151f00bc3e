"""The PB-RLSVR training loop: PPO on target-language prompts, rewarded against an English pivot.

pbrl/prepare.py builds a Trainer (checks, data, pivot references, models, optimizers); this file is
what the Trainer does with it. One iteration, `train_step`, in seven numbered, timed phases (as
verl's):
  1. sample      this rank's share of the step's problems (a seeded function of the step)
  2. rollout     n samples per problem with the KV-cached sampler, the actor gathered once
  3. reward      the configured reward, against the pivot's English reference of the same problem id
  4. forward     old and reference log-probs, and the critic's values, over the same sequences
  5. advantages  GAE over per-token rewards; or (grpo, rloo) each response against its group
  6. update      PPO epochs over minibatches of micro-batches: the actor, then the critic
  7. metrics     beside the iteration (`report`): the rollouts' rewards, lengths and fidelity by
                 language, the update's statistics and the phases' times, over all ranks; one line
                 on stdout, one JSON line in {out_dir}/metrics.jsonl
Sampling noise is seeded per sequence by (seed, step, problem, sample), so a run samples the same
whatever its number of ranks, and a resumed run continues exactly. docs/iteration.md reads one
iteration top to bottom.
"""
from __future__ import annotations

import json
import math
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pbrl import distributed as dist
from pbrl import losses, lora, ppo, rollout
from pbrl.checkpoint import (export, export_lora, latest_checkpoint, lora_settings,
                             save_training_checkpoint)
from pbrl.cli import Progress
from pbrl.config import Config
from pbrl.cudagraphs import CudaGraphs
from pbrl.data import Problem
from pbrl.evaluate import accuracy_by_language, evaluate, sampled_scores
from pbrl.loggers import Loggers, console_line
from pbrl.model import Transformer
from pbrl.sampler import Sampling, complete
from pbrl.tokenizer import Tokenizer


@dataclass
class Trained:
    """A model the update trains, with its optimizer and base learning rate."""
    model: Transformer
    optimizer: torch.optim.Optimizer
    lr: float
    adapters: str | None = None  # a critic on the LoRA actor's base: "critic", its passes' adapters

    def passes(self):
        """Its forward and backward passes select its adapters (pbrl/lora.py); a model of its own
        has nothing to select."""
        return lora.selected(self.model, self.adapters) if self.adapters else nullcontext()


@dataclass
class Step:
    """What one iteration made, for `report`: the scored batch, its experience, which tokens the
    rollout correction changed, the update's statistics and the phases' times."""
    batch: rollout.Groups
    exp: losses.Experience
    corrected: torch.Tensor
    stats: dict
    timings: dict
    seconds: float


@dataclass
class Trainer:
    """One run: what prepare.prepare built, and the loop over it."""
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
    reference: Transformer | None       # frozen: the KL anchor (None: ppo.kl_beta = 0)
    reward: Callable                    # samples -> {"reward": [B], component: [B], ...}
    kl: ppo.AdaptiveKLController
    sampling: Sampling                  # the rollouts' settings (setup checks them once)
    graphs: CudaGraphs | None = None    # rollout.compile: decode through CUDA graphs
    slots: int | None = None            # rollout.compile: one KV-cache length for every rollout
    tp_group: object = None             # rollout.tensor_parallel > 1: the ranks decoding with me
    tp_twin: Transformer | None = None  # ... on this copy of the actor, its weights sharded
    step: int = 0
    eval_records: dict[int, list[dict]] = field(default_factory=dict)  # step -> eval records
    loggers: Loggers | None = None

    def rank_state(self) -> dict | None:
        """What a checkpoint keeps of this rank alone (pbrl/pipeline.py: the batch in flight)."""
        return None

    def restore_rank_state(self, state: dict) -> None:
        raise ValueError("this checkpoint holds a rank's own state (a pipelined run's batch in "
                         "flight): resume it with rollout.placement = separate")

    @property
    def trained(self) -> dict[str, Trained]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic else {})}

    def train_step(self) -> Step:
        cfg, p, n = self.cfg, self.cfg.ppo, self.cfg.rollout.samples_per_prompt
        timings, start = {}, time.perf_counter()
        factor = ppo.lr_factor(self.step, p.warmup_steps, p.schedule, cfg.run.steps)
        for t in filter(None, (self.actor, self.critic)):
            t.optimizer.param_groups[0]["lr"] = t.lr * factor  # (prepare.trained: one group)
        # 1-3. sample, rollout, reward; with rollout.dynamic_sampling, rounds of them
        batch = self.collect_informative(timings) if cfg.rollout.dynamic_sampling else \
            self.sample_and_score(self.step, timings)
        scores = batch.rewards["reward"].to(self.device)
        with torch.no_grad():
            # 4. forward: old and reference log-probs, values
            rows = [self.prompts[problem] for problem in batch.problems for _ in range(n)]
            *seqs, sampled = (t.to(self.device) for t in rollout.sequences(rows, batch.completions))
            mask = seqs[2]  # seqs: tokens, lengths, mask
            zeros = torch.zeros(mask.shape, device=self.device)
            # None: the update's own (ppo.PPOConfig.old_from_update)
            old = None if p.old_from_update() else \
                self.per_token(self.actor.model, "logprobs", seqs, timings, "old_logprobs")
            # a KL-free run (ppo.kl_beta = 0) has no reference: KL 0
            ref = self.per_token(self.reference, "logprobs", seqs, timings, "ref_logprobs") \
                if self.reference else None
            values = zeros
            if self.critic:
                with self.critic.passes():
                    values = self.per_token(self.critic.model, "values", seqs, timings, "values")
            # 5. advantages, and each token's weight in the loss
            with timed(timings, "advantages"):
                kl = ppo.kl_estimate(old, ref, p.kl_estimator) if self.reference else zeros
                groups = torch.arange(len(batch.problems), device=self.device).repeat_interleave(n)
                advantages, returns = ppo.advantages(p, scores, kl, values, mask, groups,
                                                     self.kl.beta, dist.all_reduce_sum)
                keep = mask & batch.keep.to(self.device)[:, None]  # overlong filtered: False
                uncorrected = old is None or p.rollout_correction == "off"  # (the default)
                weights, corrected = (keep.float(), zeros.bool()) if uncorrected else \
                    ppo.correction_weights(p.rollout_correction, old, sampled, keep,
                                           p.correction_clip, p.correction_low, p.correction_high)
        exp = losses.Experience(*seqs, sampled, old, ref, values, kl, advantages, returns, weights)
        # 6. update
        with timed(timings, "update"):
            stats = self.update(exp)
        if self.reference is not None:  # an adaptive KL coefficient moves by the global batch's KL
            kl_sum, tokens = dist.all_reduce_sum(torch.stack([ppo.masked_sum(kl, mask),
                                                              mask.sum().float()])).tolist()
            self.kl.update(kl_sum / max(tokens, 1.0), len(exp.tokens) * self.world)
        return Step(batch, exp, corrected, stats, timings, time.perf_counter() - start)

    def sample_and_score(self, draw: int, timings: dict) -> rollout.Groups:
        """Phases 1-3 for the problems of `draw` (the step, or a dynamic-sampling round's own)."""
        cfg, r, n = self.cfg, self.cfg.rollout, self.cfg.rollout.samples_per_prompt
        # 1. sample
        problems = rollout.problems_for_step(self.train_problems, draw, r.prompts_per_step,
                                             cfg.run.seed, self.rank, self.world)
        prompts = [self.prompts[problem] for problem in problems]
        # 2. rollout
        with timed(timings, "rollout"), self.sampling_policy() as policy:
            seeds = torch.tensor([rollout.sequence_seed(cfg.run.seed, draw, problem, j)
                                  for problem in problems for j in range(n)])
            completions = self.decode_together(policy, prompts, seeds) if self.tp_group else \
                complete(policy, prompts, self.sampling, seeds, self.slots, self.graphs)
        # 3. reward
        with timed(timings, "reward"), torch.no_grad():
            texts = [self.tokenizer.decode(ids) for ids in completions.as_lists()]
            samples, rewards = rollout.score(self.reward, problems, texts, self.references, n)
            rewards, keep = rollout.OVERLONG[r.overlong](rewards, completions, r.max_new_tokens,
                                                         r.overlong_buffer)
        return rollout.Groups(problems, completions, samples, rewards, keep, {})

    def collect_informative(self, timings: dict) -> rollout.Groups:
        """DAPO's dynamic sampling: rounds of phases 1-3, each on problems of its own (draw step *
        R + k: a pure function of the step, so a resumed run continues exactly), until the step's
        batch can be filled with groups whose samples score differently, or R rounds are spent and
        the rest of the batch is the uninformative groups in draw order (metrics say how many).
        Groups are chosen in their global draw order, whatever the number of ranks."""
        r = self.cfg.rollout
        rounds, informative = [], 0
        for k in range(r.max_sampling_rounds):
            rounds.append(self.sample_and_score(self.step * r.max_sampling_rounds + k, timings))
            found = rollout.informative(rounds[-1].rewards["reward"], r.samples_per_prompt)
            informative += int(dist.all_reduce_sum(found.sum().float()))
            if informative >= r.prompts_per_step:
                break
            self.log(f"step {self.step + 1}: dynamic sampling round {k + 1} of "
                     f"{r.max_sampling_rounds}: {informative} of {r.prompts_per_step} groups "
                     f"informative so far" + ("" if k + 1 < r.max_sampling_rounds else
                                              "; the rest of the batch is uninformative groups"))
        batch = rollout.choose_groups(rounds, r.prompts_per_step, r.samples_per_prompt, self.rank,
                                      self.world, dist.all_gather_objects, self.sampling.pad_id)
        return batch._replace(stats={"sampling_rounds": len(rounds),
                                     "informative_groups": min(informative, r.prompts_per_step)})

    def decode_together(self, policy: Transformer, prompts: list[list[int]], seeds: torch.Tensor):
        """rollout.tensor_parallel: the group's ranks decode their prompts together."""
        def decode(prompts, seeds):
            return complete(policy, prompts, self.sampling, seeds, self.slots, self.graphs)
        return dist.decode_together(self.tp_group, prompts, seeds, decode)

    def sampling_policy(self):
        """The model a rollout decodes on: the actor with every FSDP unit gathered, or
        (rollout.compile) the decoding copy that CudaGraphs keeps, or (rollout.tensor_parallel) the
        twin whose weights the group shares, refreshed from the actor."""
        if self.tp_twin is not None or self.graphs is not None:
            return self.decoding_copy()
        return dist.gathered(self.actor.model)

    def decoding_copy(self):
        """rollout.tensor_parallel's twin, or rollout.compile's copy in CudaGraphs' buffers."""
        if self.tp_twin is not None:
            return dist.tensor_parallel_weights(self.tp_twin, self.actor.model, self.device,
                                                keep=self.graphs is not None,
                                                weight=lora.whole_weight)
        return self.graphs.policy(self.actor.model)

    def per_token(self, model: Transformer, output: str, seqs: tuple, timings: dict, name: str):
        """losses.per_token's log-probs or values [B, L - 1], micro-batch by micro-batch, timed as
        `name`."""
        out, cfg = torch.zeros(seqs[2].shape, device=self.device), self.cfg
        with timed(timings, name):
            for rows in self.micro_batches(*seqs):
                part = losses.per_token(model, *(x[rows] for x in seqs), output,
                                        cfg.rollout.temperature, bool(cfg.ppo.micro_batch_tokens))
                out[rows] = part[0] if output == "logprobs" else part
        return out

    def micro_batches(self, tokens, lengths, mask) -> list[torch.Tensor]:
        """Each micro-batch's rows: ppo.micro_batch_size at a time, or (ppo.micro_batch_tokens)
        packed_micro_batches."""
        p = self.cfg.ppo
        if p.micro_batch_tokens:
            return self.packed_micro_batches(tokens, lengths, mask)
        return [r.to(self.device) for r in torch.arange(len(lengths)).split(p.micro_batch_size)]

    def packed_micro_batches(self, tokens, lengths, mask) -> list[torch.Tensor]:
        """As many prompt groups (or parts of one) per micro-batch as fit ppo.micro_batch_tokens
        tokens, packed into one row, each prompt once (losses.packing_units,
        token_micro_batches)."""
        budget = self.cfg.ppo.micro_batch_tokens
        units = losses.packing_units(tokens, lengths, mask, budget)
        parts = losses.token_micro_batches([width for _, width in units], budget,
                                           dist.all_gather_objects)
        return [torch.tensor(sorted(i for u in part for i in units[u][0]), device=self.device)
                for part in parts]

    def update(self, exp: losses.Experience) -> dict[str, float]:
        """PPO epochs over minibatches; a minibatch's loss is normalised by its counts (tokens,
        responses) over all ranks."""
        p, r, sums, norms = self.cfg.ppo, self.cfg.rollout, {}, []
        if not dist.all_reduce_sum((exp.weights > 0).sum().float()):  # on every rank alike
            raise nothing_to_train(self.cfg, self.step)
        steps = [(self.actor, losses.actor_loss)]
        steps += [(self.critic, losses.critic_loss)] if self.critic else []
        for _ in range(p.epochs):
            for rows in torch.arange(len(exp.tokens), device=self.device).chunk(p.minibatches):
                counts = ppo.count(exp.weights[rows], r.max_new_tokens, dist.all_reduce_sum)
                for trained, loss_fn in steps:
                    stats, norm = self.optimize(trained, loss_fn, exp.rows(rows), counts)
                    sums.update({k: sums.get(k, 0.0) + v for k, v in stats.items()})
                    norms += [norm] if trained is self.actor else []
        s = dict(zip(sums, dist.all_reduce_sum(torch.stack(list(sums.values()))).tolist()))
        passes, tokens = p.epochs * p.minibatches, max(s["tokens"], 1.0)
        per_token = ("entropy", "clipfrac", "approx_kl", "value_clipfrac", "kl_loss",
                     "logprob_mismatch", "logprob_mismatch_k3")
        return {**{k: s[k] / passes for k in ("policy_loss", "value_loss") if k in s},
                **{k: s[k] / tokens for k in per_token if k in s},
                "update_tokens": s["update_tokens"] / p.epochs,  # one pass over the batch
                "padding": s["padding"] / s["update_tokens"], "grad_norm": sum(norms) / len(norms)}

    def optimize(self, trained: Trained, loss_fn, exp: losses.Experience, counts: ppo.Counts):
        """One optimizer step over these rows, micro-batch by micro-batch; returns (sums of the
        losses' statistics, the gradient norm before clipping)."""
        p, sums = self.cfg.ppo, {}
        micro_batches = self.micro_batches(exp.tokens, exp.lengths, exp.mask)
        with trained.passes():
            for rows in micro_batches:
                loss, stats = loss_fn(trained.model, exp.rows(rows), counts, p,
                                      self.cfg.rollout.temperature, self.kl.beta)
                loss.backward()
                sums.update({k: sums.get(k, 0.0) + v for k, v in stats.items()})
        if trained is self.actor:  # what its passes compute: perf/update_tokens, perf/padding
            computed = losses.computed_tokens(exp, micro_batches, bool(p.micro_batch_tokens))
            sums["update_tokens"], sums["padding"] = torch.tensor(computed, device=self.device)
        # (a LoRA critic shares the actor's model: the other's gradients are None here, as each
        # step below leaves its own)
        norm = torch.nn.utils.clip_grad_norm_(trained.model.parameters(), p.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):  # the same on every rank: the norm is global
            raise not_finite(loss_fn, norm, self.step)
        trained.optimizer.step()
        trained.optimizer.zero_grad(set_to_none=True)  # no gradients held through the rollout
        return sums, norm

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until run.steps (or `steps` more iterations); returns this call's metrics. The run
        directory's lock is released when it returns or fails."""
        run = self.cfg.run
        end = min(run.steps, self.step + steps) if steps else run.steps
        try:
            open_logs(self)
            history = []
            if self.step == 0 and self.eval_problems:
                history.append(log_metrics(self, {"step": 0, **evaluate_policy(self)}))
            bar = Progress(end - self.step, "train", " steps", enabled=self.rank == 0)
            while self.step < end:
                metrics = report(self, self.train_step())
                self.step += 1
                bar.update()
                if self.eval_problems and due(self, run.eval_every):
                    metrics.update(evaluate_policy(self))
                history.append(log_metrics(self, metrics))
                if due(self, run.checkpoint_every):
                    save_checkpoint(self)
            bar.close()
            if self.step == run.steps:
                export_final(self)
            return history
        finally:
            if self.loggers is not None:
                self.loggers.close()
                self.loggers = None
            if self.lock is not None:
                self.lock.close()


# --------------------------------------------------------------------------------------------------
# Around the loop: evaluation, checkpoints, the final export, logs
# --------------------------------------------------------------------------------------------------
def due(trainer: Trainer, every: int | None) -> bool:
    """Whether this step is one of every N (or the run's last)."""
    return trainer.step == trainer.cfg.run.steps or bool(every and trainer.step % every == 0)


def evaluate_policy(trainer: Trainer) -> dict[str, float]:
    """Greedy accuracy per language on the held-out problems, each rank (or tensor-parallel
    group) every world-th (groups-th) problem. Records already kept for this step are reused
    (runs that share a warm start share its eval)."""
    t = trainer
    if t.step not in t.eval_records:
        # a tensor-parallel group decodes its share together, as its rollouts do
        tp = t.cfg.rollout.tensor_parallel
        groups, group = t.world // tp, t.rank // tp
        run = t.cfg.run
        with t.sampling_policy() if t.tp_twin else dist.gathered(t.actor.model) as model:
            records = evaluate(model, t.tokenizer, t.eval_problems[group::groups], batch_size=64,
                               max_new_tokens=run.eval_max_new_tokens or
                               t.cfg.rollout.max_new_tokens, progress=False,
                               temperature=run.eval_temperature, samples=run.eval_samples,
                               seed=run.seed)
        gathered = dist.all_gather_objects(records if t.rank % tp == 0 else [])
        t.eval_records[t.step] = [r for part in gathered for r in part]
    records = t.eval_records[t.step]
    scores = {"acc": accuracy_by_language(records)}  # pass@1 with several samples
    if t.cfg.run.eval_samples > 1:
        scores.update(sampled_scores(records, t.cfg.run.eval_samples))
    return {f"{name}/{k}": v for name, by_lang in scores.items() for k, v in by_lang.items()}


def save_checkpoint(trainer: Trainer) -> None:
    """A training checkpoint of every trained model and optimizer, the step, the KL coefficient
    and the RNG state (pbrl/checkpoint.py)."""
    t, trained = trainer, trainer.trained
    save_training_checkpoint(t.out, t.step, {k: m.model for k, m in trained.items()},
                             {k: m.optimizer for k, m in trained.items()},
                             {"step": t.step, "kl_beta": t.kl.beta,
                              "torch_rng": torch.get_rng_state(),  # a LoRA run: what its base is
                              **({"lora": lora_settings(c.rank, c.alpha, c.targets, t.policy_dir)}
                                 if (c := t.cfg.lora).rank else {})},
                             source_dir=t.policy_dir, keep=t.cfg.run.keep_checkpoints,
                             rank_state=t.rank_state())


def export_final(trainer: Trainer) -> None:
    """The last checkpoint, streamed into a HF directory by rank 0 while the others wait (a LoRA
    run: the merged model, and the adapters alone in PEFT's layout beside it)."""
    if trainer.rank == 0:
        ckpt, final = latest_checkpoint(trainer.out), trainer.out / "final"
        trainer.log(f"final policy: exporting {ckpt} on rank 0 (the other ranks wait)")
        if trainer.cfg.lora.rank:
            _, adapters = export_lora(ckpt, final, trainer.policy_dir, trainer.dtype,
                                                 overwrite=True)
            trainer.log(f"final policy: {final} (merged), its adapters: {adapters}")
        else:
            export(ckpt, final, "actor", trainer.dtype, overwrite=True)  # its own
            trainer.log(f"final policy: {final}")
    dist.barrier()


def report(trainer: Trainer, step: Step) -> dict:
    """Step 7, beside the iteration: its numbers over all ranks (every rank calls it)."""
    metrics = {"step": trainer.step + 1, **step.stats, **step.batch.stats,
               **rollout.rollout_metrics(step.batch, step.exp, step.corrected, dist.all_reduce_sum,
                                         dist.all_gather_objects, trainer.critic is not None)}
    if trainer.reference is None:  # a KL-free run reports none
        del metrics["kl"]
    peak = torch.cuda.max_memory_allocated() if trainer.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**metrics, **{f"time/{k}": v for k, v in step.timings.items()},
            "seconds": step.seconds, "tokens_per_s": metrics["response_tokens"] / step.seconds,
            "kl_beta": trainer.kl.beta, "lr": trainer.actor.optimizer.param_groups[0]["lr"],
            "peak_memory_mb": peak / 2**20}


def open_logs(trainer: Trainer) -> None:
    """Rank 0: the run's config.json, and its loggers (metrics.jsonl cut after this step)."""
    if trainer.rank == 0:
        r, config = trainer.cfg.run, trainer.cfg.to_dict()
        (trainer.out / "config.json").write_text(json.dumps(config, indent=2))
        trainer.loggers = Loggers(trainer.out, r.loggers, r.name or trainer.out.name, config,
                                  r.wandb_project, r.wandb_mode, after_step=trainer.step)


def log_metrics(trainer: Trainer, metrics: dict) -> dict:
    """Rank 0: one step's metrics to the loggers and one line on the console."""
    if trainer.rank == 0:
        trainer.loggers.log(metrics)
        trainer.log(console_line(metrics, trainer.cfg.run.steps))
    return metrics


def not_finite(loss_fn, norm: float, step: int) -> FloatingPointError:
    return FloatingPointError(f"step {step + 1}: the {loss_fn.__name__}'s gradient norm is "
                              f"{norm}; stopped before updating (checkpoints kept)")


def nothing_to_train(cfg: Config, step: int) -> ValueError:
    """The error of a step in which no response token takes part in the loss."""
    r, p = cfg.rollout, cfg.ppo
    return ValueError(f"step {step + 1}: no response token takes part in the loss, so the step "
                      f"would train nothing. Every response was cut at rollout.max_new_tokens="
                      f"{r.max_new_tokens} under rollout.overlong={r.overlong}, or "
                      f"ppo.rollout_correction={p.rollout_correction} dropped every token: raise "
                      f"max_new_tokens, or set overlong penalty or off, or widen the correction's "
                      f"window")


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
