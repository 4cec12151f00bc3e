"""Batched generation with a preallocated KV cache: one prefill over the prompts, then one token per step.

Prompts of different lengths share a batch by left padding: every row's last prompt token sits in the same slot,
so each decoding step writes one slot for all rows. Padding slots are hidden by the attention mask and each row
counts its RoPE positions from its own first real token, so a row's output does not depend on its neighbours.

The decoding step has static shapes (gpt-fast's design): it attends over every slot of the cache under a per-row
validity mask, with the slot and the positions as tensors, so on CUDA it can run as one CUDA graph
(`compile=True`: torch.compile with CUDA graphs). Sampling is one kernel per step (kernels.sample_tokens:
Gumbel-max with noise hashed from each row's seed and the step, so a row's sample does not depend on the batch).
The host looks at the batch only every SYNC_EVERY steps: to stop when every row has finished, and to drop finished
rows (the live rows move to the front of the same buffers and the batch shrinks to the next of BATCH_SIZES, a
handful of shapes to compile). The n samples of a prompt share its prefill. A CUDA graph reads its inputs at the
addresses it was recorded with, so a compiled call keeps its state (the cache included) for the next call of the same
shape, and each batch size is always the same prefix of those buffers: later calls replay the graphs recorded by
the first instead of recording new ones.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

import kernels
from pbrl.model import KVCache, Transformer, pad_rows

SYNC_EVERY = 8  # decoding steps between the host's looks at which rows have finished
# The sizes a batch shrinks to as its rows finish (two per octave: few shapes to compile, little waste).
BATCH_SIZES = sorted({1} | {c << k for k in range(16) for c in (2, 3)})  # 1, 2, 3, 4, 6, 8, 12, 16, ...
# What compile=True passes to torch.compile (tests switch the backend to check that the step is one graph):
# CUDA graphs (what mode="reduce-overhead" sets) and, as in gpt-fast, coordinate-descent tuning, under which inductor
# turns each batch-1 matmul on CUDA into a fused multiply-and-reduce kernel tuned to stream the weights at full
# bandwidth (cuBLAS's GEMVs are slower there).
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False,
                   "options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
_KEPT: dict[tuple, "DecodeState"] = {}  # the last compiled call's state, by its shape (see new_state)


class Completions(NamedTuple):
    """Row i*n + j is sample j of prompt i. A finished row's completion ends with its stop token."""
    tokens: torch.Tensor          # [N, L] long, pad_id after each row's end
    lengths: torch.Tensor         # [N] long, tokens generated per row (stop token included)
    finished: torch.Tensor        # [N] bool, the row ended on a stop id (else it ran out of max_new_tokens)
    logprobs: torch.Tensor | None  # [N, L] float32: log softmax(logits / temperature) of each chosen token, 0 after

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V], keys [B] (kernels.row_keys of each row's seed and the step) -> (token ids [B], their
    log-probs [B] under softmax(logits / temperature), untruncated). temperature 0 is greedy. Without top-k/top-p
    one fused kernel; with them, the same noise added to the truncated logits in PyTorch."""
    if temperature == 0 or (top_k is None and top_p is None):
        return kernels.sample_tokens(logits, temperature, keys)
    x = logits.float() / temperature
    kept = x
    if top_k is not None:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        kept = kept.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        sorted_x, order = kept.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        kept = kept.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    tokens = (kept + kernels.gumbel_noise(keys, x.shape[-1])).argmax(-1)
    return tokens, x.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


_BATCH_FIELDS = ("ids", "positions", "valid", "seeds", "done", "live")  # one row per row of the batch


@dataclass
class DecodeState:
    """The tensors one decoding step reads and updates in place, for the B rows still in the batch; the outputs
    are indexed by `live`, each row's output row. All keep their addresses from step to step (CUDA graphs)."""
    ids: torch.Tensor        # [B] long, each row's last token
    positions: torch.Tensor  # [B] long, the RoPE position of that token
    valid: torch.Tensor      # [B, max_len] bool, the cache slots each row sees
    seeds: torch.Tensor      # [B] int64, each row's sampling seed
    done: torch.Tensor       # [B] bool, the row drew a stop id
    live: torch.Tensor       # [B] long, each row's output row
    slot: torch.Tensor       # [1] long, the cache slot of `ids`
    step: torch.Tensor       # [1] long, the output column the next token goes to
    tokens: torch.Tensor     # [N, max_new_tokens] long, outputs of all N rows
    logprobs: torch.Tensor   # [N, max_new_tokens] fp32
    lengths: torch.Tensor    # [N] long, tokens generated per output row
    cache: KVCache

    def keep(self, rows: torch.Tensor) -> "DecodeState":
        """The state of these batch rows only: they move to the front of this state's buffers (their cache rows
        too) and the result is the first len(rows) rows, as views, so a batch size always has the same addresses.
        The outputs stay whole."""
        n = len(rows)
        for t in [getattr(self, name) for name in _BATCH_FIELDS] + self.cache.k + self.cache.v:
            t[:n] = t[rows]  # t[rows] is a copy: no row is overwritten before it is read
        return replace(self, **{name: getattr(self, name)[:n] for name in _BATCH_FIELDS}, cache=self.cache.rows(n))

    def static(self) -> None:
        """Tell torch.compile that these tensors keep their addresses: CUDA graphs may then update them in place (a
        graph that mutates any other input runs without CUDA graphs). Without a guard: tensors at other addresses
        make a graph re-record, not recompile, which new_state and keep avoid."""
        for t in self.tensors():
            torch._dynamo.mark_static_address(t, guard=False)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, the cache's included."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "cache"] + self.cache.k + self.cache.v


def record(logits: torch.Tensor, st: DecodeState, temperature: float, top_k: int | None, top_p: float | None,
           stop: torch.Tensor, pad_id: int) -> None:
    """Draw each row's next token from logits [B, V] and write it (and its log-prob) to output column st.step;
    a row that has finished records nothing, and a row that draws a stop id is done."""
    next_ids, lp = sample_next(logits, temperature, top_k, top_p, kernels.row_keys(st.seeds, st.step))
    column = st.step.expand_as(st.live)
    st.tokens.index_put_((st.live, column), torch.where(st.done, pad_id, next_ids))
    st.logprobs.index_put_((st.live, column), torch.where(st.done, 0.0, lp))
    st.lengths.index_add_(0, st.live, (~st.done).long())
    st.done |= torch.isin(next_ids, stop)
    st.ids.copy_(next_ids)


def decode_step(model: Transformer, st: DecodeState, temperature: float, top_k: int | None, top_p: float | None,
                stop: torch.Tensor, pad_id: int) -> None:
    """One token for every row: the model reads st.ids at cache slot st.slot (attending to the slots st.valid
    marks), then `record` draws and writes the next. Every shape is fixed for the whole generation and nothing
    syncs with the host: compiled, it is one CUDA graph."""
    st.valid.index_fill_(1, st.slot, True)
    logits = model(st.ids[:, None], attention_mask=st.valid, position_ids=st.positions[:, None], cache=st.cache,
                   start=st.slot)[:, -1]
    st.positions += 1
    st.slot += 1
    st.step += 1
    record(logits, st, temperature, top_k, top_p, stop, pad_id)


def row_seeds(n_rows: int, seed: int | None, seeds) -> torch.Tensor:
    """[N] int64: the given per-row seeds, or N seeds derived from `seed`, or drawn from torch's global RNG."""
    if seeds is not None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).flatten()
        if len(seeds) != n_rows:
            raise ValueError(f"one seed per row: need len(prompts) * n = {n_rows}, got {len(seeds)}")
        return seeds
    if seed is None:
        return torch.randint(-2**63, 2**63 - 1, (n_rows,), dtype=torch.int64)
    return (seed % 2**31) * 2**32 + torch.arange(n_rows)  # row r of a seeded call: (seed, r) in one int64


def cache_slots(prompt_tokens: int, max_new_tokens: int, compile: bool) -> int:
    """The KV cache's slots: the longest prompt + max_new_tokens, rounded up to a multiple of 128 when compiling (so
    that calls whose prompts differ in length reuse the compiled graphs and the kept state)."""
    slots = prompt_tokens + max_new_tokens
    return -(-slots // 128) * 128 if compile else slots


def new_state(model: Transformer, rows: int, slots: int, max_new_tokens: int, keep: bool) -> DecodeState:
    """A zeroed state for `rows` rows, a cache of `slots` slots and outputs of max_new_tokens columns. keep=True
    (compiled calls) returns the kept state of the previous such call when its shape was the same, zeroed again,
    so the CUDA graphs recorded on its addresses replay; and keeps this one: one state (mostly its cache) stays
    allocated between calls, that of the last shape used."""
    weight, args = model.embed_tokens.weight, model.args
    key = (rows, slots, max_new_tokens, weight.dtype, weight.device, args.num_hidden_layers,
           args.num_key_value_heads, args.head_dim)
    st = _KEPT.get(key) if keep else None
    if st is not None:
        for t in st.tensors():
            t.zero_()
        return st
    if keep:
        _KEPT.clear()  # before allocating: never two kept states at once
    long = dict(dtype=torch.long, device=weight.device)
    st = DecodeState(
        ids=torch.zeros(rows, **long),
        positions=torch.zeros(rows, **long),
        valid=torch.zeros(rows, slots, dtype=torch.bool, device=weight.device),
        seeds=torch.zeros(rows, **long),
        done=torch.zeros(rows, dtype=torch.bool, device=weight.device),
        live=torch.zeros(rows, **long),
        slot=torch.zeros(1, **long),
        step=torch.zeros(1, **long),
        tokens=torch.zeros(rows, max_new_tokens, **long),
        logprobs=torch.zeros(rows, max_new_tokens, device=weight.device),
        lengths=torch.zeros(rows, **long),
        cache=KVCache(args, rows, slots, weight.dtype, weight.device))
    if keep:
        _KEPT[key] = st
    return st


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, n: int = 1, stop_ids=(), pad_id: int = 0,
             seed: int | None = None, seeds=None, return_logprobs: bool = False, compile: bool = False,
             slots: int | None = None) -> Completions:
    """Sample up to max_new_tokens after each prompt (token ids), n samples per prompt.

    seeds: one per row (len(prompts) * n, row i*n + j = sample j of prompt i), for samples that do not depend on
    how rows are batched; else `seed` derives them, else they are drawn from torch's RNG. Sampling log-probs are
    those of the tempered, untruncated distribution (temperature 0: the raw one), the same quantity a trainer
    recomputes with a full forward pass; top-k/top-p only change which token is drawn. compile=True runs the
    decoding step through torch.compile (COMPILE_OPTIONS: CUDA graphs on CUDA) and keeps its state, the KV cache
    included, allocated until a call with another shape (new_state). slots: the KV cache's length, at least the
    longest prompt + max_new_tokens; by default this call's own (cache_slots). A caller whose prompts vary in length
    from call to call passes one value for all (cache_slots of its longest possible prompt), so that its compiled
    calls keep one shape and replay the same CUDA graphs.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens and n must be >= 1, got {max_new_tokens} and {n}")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 1; got {temperature}, {top_p}, {top_k}")
    context = model.args.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"of {context} tokens (max_position_embeddings)")
    if slots is not None and slots < longest + max_new_tokens:
        raise ValueError(f"slots={slots} cannot hold the longest prompt ({longest} tokens) + max_new_tokens="
                         f"{max_new_tokens}")
    vocab = model.args.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} holds token id {min(p) if min(p) < 0 else max(p)} outside the "
                             f"model's vocabulary [0, {vocab})")
    device = model.embed_tokens.weight.device
    rows = [p for p in prompts for _ in range(n)]
    step_fn = torch.compile(decode_step, **COMPILE_OPTIONS) if compile else decode_step

    # A generated slot becomes valid when it is written.
    b, p_len = len(rows), longest
    slots = cache_slots(p_len, max_new_tokens, compile) if slots is None else slots
    st = new_state(model, b, slots, max_new_tokens, keep=compile)
    input_ids, prompt_mask = pad_rows(prompts, side="left")  # padding slots hold id 0: masked, never attended to
    st.valid[:, :p_len] = prompt_mask.repeat_interleave(n, 0).to(device)
    st.positions.copy_(torch.tensor([len(p) for p in rows]))
    st.seeds.copy_(row_seeds(b, seed, seeds))
    st.live.copy_(torch.arange(b))
    st.slot.fill_(p_len)
    st.tokens.fill_(pad_id)
    # Prefill each prompt once, then give each of its n samples (rows i*n .. i*n + n-1) a copy of its cache.
    prefill = KVCache(model.args, len(prompts), p_len, model.embed_tokens.weight.dtype, device)
    hidden = model.hidden_states(input_ids.to(device), attention_mask=prompt_mask.to(device), cache=prefill)
    logits = model.lm_head(hidden[:, -1]).repeat_interleave(n, 0)  # only the last position's logits are needed
    for full, prompt in zip(st.cache.k + st.cache.v, prefill.k + prefill.v):
        full[:, :, :p_len].unflatten(0, (len(prompts), n)).copy_(prompt[:, None])
    del prefill, hidden  # before decoding
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    record(logits, st, temperature, top_k, top_p, stop, pad_id)  # the first token, from the prefill
    if compile:
        st.static()
    # Compiled: one graph per batch size the batch shrinks to (and per cache length), more than dynamo's default 8.
    with torch._dynamo.config.patch(recompile_limit=64) if compile else contextlib.nullcontext():
        for step in range(1, max_new_tokens):
            if step % SYNC_EVERY == 0:
                # The host's look at the batch: stop when every row has finished; drop finished rows (keeping
                # some to fill the next batch size) when the live ones fit a smaller size.
                alive = int((~st.done).sum())
                if alive == 0:
                    break
                size = next(s for s in BATCH_SIZES if s >= alive) if alive <= BATCH_SIZES[-1] else len(st.live)
                if size < len(st.live):
                    finished[st.live] = st.done  # before the rows that leave are forgotten
                    st = st.keep(torch.argsort(st.done.int(), stable=True)[:size])
                    if compile:
                        st.static()
            step_fn(model, st, temperature, top_k, top_p, stop, pad_id)
    finished[st.live] = st.done
    width = int(st.lengths.max())
    # Copies: a kept state's tensors are overwritten by the next call.
    return Completions(st.tokens[:, :width].to("cpu", copy=True), st.lengths.to("cpu", copy=True), finished.cpu(),
                       st.logprobs[:, :width].to("cpu", copy=True) if return_logprobs else None)
