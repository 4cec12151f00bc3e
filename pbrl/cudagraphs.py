"""Decoding through CUDA graphs: the sampler's step compiled, on buffers that never move.

A CUDA graph replays its kernels on the addresses it was recorded with, so whatever a decoding step
reads must stay where it was from step to step and from call to call. CudaGraphs owns those buffers:
  - the sampler's state, KV cache included, kept for the next call of the same shape (dropping
    finished rows moves the live ones to the front of the same buffers: a batch size keeps its
    addresses);
  - under FSDP, a whole copy of the actor in the compute dtype, refreshed before each rollout one
    tensor at a time: FSDP's gathered parameters land at new addresses at every all-gather.
Torch 2.13 stops graphing a function after 128 re-recordings; on fixed addresses there are none.
docs/sampler.md tells the story and the numbers.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from pbrl.lora import whole_weight
from pbrl.model import Transformer, empty_like
from pbrl.sampler import DecodeState, Sampling, decode_step, new_state

# What torch.compile gets (tests swap the backend): CUDA graphs (what mode="reduce-overhead" sets)
# and, as in gpt-fast, coordinate-descent tuning, under which each batch-1 matmul on CUDA becomes a
# fused, tuned multiply-and-reduce that streams the weights at full bandwidth (cuBLAS's GEMVs are
# slower there).
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False,
                   "options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}


def cache_slots(prompt_tokens: int, max_new_tokens: int) -> int:
    """A compiled cache's length: the longest prompt + max_new_tokens, rounded up to 128 slots, so
    that calls whose prompts differ a little share one shape."""
    return -(-(prompt_tokens + max_new_tokens) // 128) * 128


class CudaGraphs:
    """pass as generate(..., graphs=): the decoding step through torch.compile, on kept buffers.

    copy_of: under FSDP or LoRA, the (sharded, adapted) actor whose whole copy, in `dtype` on
    `device`, rollouts decode on; see policy()."""

    def __init__(self, copy_of: Transformer | None = None, dtype=None, device=None):
        self.copy = None
        if copy_of is not None:
            self.copy = empty_like(copy_of, dtype, device).requires_grad_(False)
        # the last call's state, kept for the next of its shape
        self.kept: DecodeState | None = None
        self.shape: tuple | None = None
        self.marked: DecodeState | None = None  # the last state marked static (see step)
        self.compiled = torch.compile(decode_step, **COMPILE_OPTIONS)

    def state(self, model: Transformer, rows: int, slots: int, max_new_tokens: int) -> DecodeState:
        """generate's new_state, kept: a call of the last call's shape gets its buffers back,
        zeroed."""
        weight = model.embed_tokens.weight
        shape = (rows, cache_slots(slots, 0), max_new_tokens, weight.dtype, weight.device,
                 model.args.num_hidden_layers, model.args.num_key_value_heads, model.args.head_dim)
        if shape != self.shape:
            self.kept = self.marked = None  # freed first: never two kept states at once
            self.kept, self.shape = new_state(model, rows, shape[1], max_new_tokens), shape
            return self.kept
        for t in self.kept.tensors():
            t.zero_()
        self.kept.live.copy_(torch.arange(rows))
        return self.kept

    def step(self, model: Transformer, st: DecodeState, s: Sampling) -> None:
        """generate's decode_step, compiled. Its tensors keep their addresses, which torch.compile
        is told (a graph that mutates an input it does not know to be static runs without CUDA
        graphs)."""
        if st is not self.marked:  # a new state, or a smaller batch's views after dropping rows
            for t in st.tensors():
                torch._dynamo.mark_static_address(t, guard=False)
            self.marked = st
        # One graph per batch size the batch shrinks to: more than dynamo's default limit of 8.
        with torch._dynamo.config.patch(recompile_limit=64):
            self.compiled(model, st, s)

    @contextmanager
    def policy(self, actor: Transformer):
        """The model a rollout decodes on: without a copy the actor (its parameters never move),
        else the copy refreshed from the sharded actor, one tensor gathered at a time in the copy's
        dtype (half the bytes of fp32 on the wire, as FSDP's own all-gathers under mixed
        precision); a LoRA actor's adapters merged into the copy's weights."""
        if self.copy is None:
            yield actor
            return
        with torch.no_grad():
            for name, mine in self.copy.named_parameters():
                mine.copy_(whole_weight(actor, name, mine.dtype))
        yield self.copy
