"""Rollouts that overlap training (rollout.placement = separate): one step off-policy.

The first world - n ranks train (FSDP2 among themselves), the last n decode and score, each
rollout rank drawing the shares of k = (world - n) / n training ranks as one batch (rollout rank j
serves training ranks j k .. j k + k - 1: pbrl/distributed.py's `split`). W_t is the policy after t
updates. Batch t is drawn with W_(t-1) (batches 0 and 1 with W_0), so while the training ranks
update on batch t, the rollout ranks draw batch t+1:

    training ranks  send W_0 | get b_0 | update on b_0      | send W_1 | get b_1 | update on b_1
    rollout ranks   get W_0  | draw b_0 | send b_0, draw b_1 | get W_1  | send b_1, draw b_2 (W_1)

Which weights drew which batch is a function of the step alone. The weights go tensor by tensor:
each gathered whole among the training ranks in the compute dtype (one at a time; no rank holds
the gathered model), broadcast by training rank 0 straight into the parameters the rollout rank's
sampler reads. A training rank's share goes from its rollout rank to it as one object (on the
CPU), broadcast within their pair's group: a collective, so a stalled peer ends the run at the
process group's timeout.
A checkpoint keeps each training rank's batch in flight (rank_state), so a resumed run is exact:
it learns from that batch, and its rollout ranks draw the next with the checkpoint's weights.
The objective is the decoupled one: the sampler's log-probs are the behaviour policy's, the
training ranks recompute the proximal (old) policy's, and ppo.rollout_correction weighs the two.
docs/scale.md says when separate rollout ranks pay.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from pbrl import distributed as dist
from pbrl import lora, rollout
from pbrl.data import Problem
from pbrl.model import Transformer
from pbrl.rewards import Sample
from pbrl.sampler import Completions
from pbrl.trainer import Step, Trainer, timed

STALENESS = 1  # updates between the weights that drew a batch and the update that learns from it


@dataclass
class PipelinedTrainer(Trainer):
    """A training rank: its batches come from its rollout rank, and after each update it streams
    the actor's weights to the rollout ranks."""
    stream: object = None                   # training rank 0 and the rollout ranks
    pair: object = None                     # my rollout rank and I
    pending: rollout.Groups | None = None   # the next step's batch: received, or checkpointed
    streamed: bool = False                  # this process has sent the rollout ranks its weights

    def sample_and_score(self, draw: int, timings: dict) -> rollout.Groups:
        """The batch my rollout rank drew for this step (dynamic sampling's rounds included)."""
        if not self.streamed:  # the rollout ranks start from my weights (W_0, or a checkpoint's)
            stream_weights(self, timings)
            self.streamed = True
        if self.pending is None:  # a fresh run's first batch
            self.pending = receive(self, timings)
        batch, self.pending = self.pending, None
        return batch

    def collect_informative(self, timings: dict) -> rollout.Groups:
        return self.sample_and_score(self.step, timings)  # (the rounds ran on my rollout rank)

    def rank_state(self) -> dict | None:
        """The batch in flight (drawn with the weights before this checkpoint's): a resumed run
        learns from it, exactly as the uninterrupted run did."""
        return None if self.pending is None else batch_state(self.pending)

    def restore_rank_state(self, state: dict) -> None:
        self.pending = batch_from_state(state)

    def train_step(self) -> Step:
        step = super().train_step()
        if self.step + 1 < self.cfg.run.steps:  # W_(t+1) out, batch t+1 (drawn with W_t) in
            start = time.perf_counter()
            stream_weights(self, step.timings)
            self.pending = receive(self, step.timings)
            step.seconds += time.perf_counter() - start
        step.batch.stats["pipeline/staleness"] = STALENESS
        return step


@dataclass
class RolloutWorker(Trainer):
    """A rollout rank: draws and scores its training ranks' shares of every step's problems (its
    own share among the rollout ranks), with the weights streamed to it (actor: a whole copy in
    the compute dtype, no optimizer)."""
    stream: object = None
    pairs: list = dataclasses.field(default_factory=list)  # with each training rank I serve
    resumed: bool = False  # from a checkpoint that holds batch `step` (its training rank has it)

    def run(self, steps: int | None = None) -> list[dict]:
        """Batches run.step.. until run.steps, in the training ranks' order (the module's
        timeline); it reports, in each batch, its drawing's seconds and how long this rank waited
        before it (for the weights and for its training rank to take the batch before)."""
        start, end = self.step, self.cfg.run.steps
        if start < end:
            receive_weights(self)  # W_start
        idle = 0.0
        for k in range(start + self.resumed, end):
            batch, busy = self.draw(k)  # with W_start (k <= start + 1), else W_(k-1)
            batch.stats.update({"pipeline/rollout_busy_s": busy, "pipeline/rollout_idle_s": idle})
            t0 = time.perf_counter()
            if k > start:
                receive_weights(self)  # W_k, which draws batch k + 1
            for i, pair in enumerate(self.pairs):  # my global rank is the source
                part = share(batch, i, len(self.pairs), self.cfg.rollout.samples_per_prompt)
                tdist.broadcast_object_list([part], src=tdist.get_rank(), group=pair)
            idle = time.perf_counter() - t0
        return []

    def decoding_copy(self):
        """rollout.tensor_parallel: the twin itself (the weights stream into its shards)."""
        return nullcontext(self.tp_twin) if self.tp_twin is not None else super().decoding_copy()

    def draw(self, k: int) -> tuple[rollout.Groups, float]:
        start = time.perf_counter()
        self.step = k  # (dynamic sampling's rounds draw as a function of the step)
        batch = self.collect_informative({}) if self.cfg.rollout.dynamic_sampling else \
            self.sample_and_score(k, {})
        c = batch.completions
        cpu = batch._replace(completions=Completions(*(t.cpu() for t in c)),
                             rewards={name: v.cpu() for name, v in batch.rewards.items()},
                             keep=batch.keep.cpu(), stats=dict(batch.stats))
        return cpu, time.perf_counter() - start


def share(batch: rollout.Groups, i: int, parts: int, n: int) -> rollout.Groups:
    """Part i of `parts` of a batch, by problem (n samples each): the share of the i-th training
    rank a rollout rank serves (problems_for_step deals each rank a contiguous slice, so those of
    the training ranks it serves, in order, are its own)."""
    k = len(batch.problems) // parts
    rows = slice(i * k * n, (i + 1) * k * n)
    c = batch.completions
    width = int(c.lengths[rows].max())
    return batch._replace(problems=batch.problems[i * k:(i + 1) * k],
                          completions=Completions(c.tokens[rows, :width], c.lengths[rows],
                                                  c.finished[rows], c.logprobs[rows, :width]),
                          samples=batch.samples[rows],
                          rewards={name: v[rows] for name, v in batch.rewards.items()},
                          keep=batch.keep[rows], stats=dict(batch.stats))


@torch.no_grad()
def stream_weights(trainer: PipelinedTrainer, timings: dict) -> None:
    """Every actor tensor by its plain name (a LoRA actor's adapters merged: lora.whole_weight),
    gathered whole among the training ranks in the compute dtype, one at a time, and broadcast by
    training rank 0 to the rollout ranks (a collective of both kinds)."""
    model = trainer.actor.model
    with timed(timings, "stream_weights"):
        for name in plain_shapes(model):
            whole = lora.whole_weight(model, name, trainer.dtype).detach().contiguous()
            if trainer.rank == 0:
                tdist.broadcast(whole, src=0, group=trainer.stream)
            del whole


@torch.no_grad()
def receive_weights(worker: RolloutWorker) -> None:
    """The streamed weights, in order, into the parameters the sampler reads: a whole copy's, or
    (rollout.tensor_parallel) each received whole, one at a time, and this rank's shard kept."""
    if worker.tp_twin is None:
        for t in worker.actor.model.state_dict().values():  # (a tied head: its tensor twice)
            tdist.broadcast(t, src=0, group=worker.stream)
        return
    shapes = {name: t.shape for name, t in worker.tp_twin.state_dict().items()}  # (DTensors':
    # the whole tensor's)

    def receive(_, name: str, dtype: torch.dtype) -> torch.Tensor:
        whole = torch.empty(shapes[name], dtype=dtype, device=worker.device)
        tdist.broadcast(whole, src=0, group=worker.stream)
        return whole
    dist.refresh(worker.tp_twin, None, receive)


def plain_shapes(model: Transformer) -> dict[str, torch.Size]:
    """The whole tensors of model's architecture without adapters, by name, in the order a plain
    copy's state_dict lists them (a tied LM head under its own name too): the stream's order."""
    with torch.device("meta"):
        plain = Transformer(model.args, lm_head=model.lm_head is not None)
    return {name: t.shape for name, t in plain.state_dict().items()}


def batch_state(batch: rollout.Groups) -> dict:
    """A batch as tensors and plain containers (what a checkpoint may hold)."""
    return {"problems": [dataclasses.asdict(p) for p in batch.problems],
            "completions": list(batch.completions),
            "samples": [dataclasses.asdict(x) for x in batch.samples],
            "rewards": batch.rewards, "keep": batch.keep, "stats": batch.stats}


def batch_from_state(state: dict) -> rollout.Groups:
    return rollout.Groups([Problem(**p) for p in state["problems"]],
                          Completions(*state["completions"]),
                          [Sample(**x) for x in state["samples"]], state["rewards"],
                          state["keep"], state["stats"])


def receive(trainer: PipelinedTrainer, timings: dict) -> rollout.Groups:
    """The batch my rollout rank drew (its tensors on the CPU)."""
    with timed(timings, "wait_for_rollouts"):
        box = [None]
        # the pair's ranks ascending: mine, then my rollout rank's (the source)
        partner = tdist.get_process_group_ranks(trainer.pair)[-1]
        tdist.broadcast_object_list(box, src=partner, group=trainer.pair)
    return box[0]
