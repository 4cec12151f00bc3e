"""Process group, FSDP2 sharding and the few collectives the trainer needs. Everything degrades to a
no-op in a single process, so the same training code runs under `python train.py` and `torchrun
train.py`."""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

DEFAULT_TIMEOUT_MINUTES = 60.0  # run.timeout_minutes' default
_timeout_minutes: float | None = None  # the process group's, when init created it
# rollout.placement separate (split): the group this rank's collectives run in (None: every rank)
# and the training ranks' FSDP2 mesh (None: every rank's)
_group = None
_mesh = None


def init(one_rank_group: bool = False,
         timeout_minutes: float | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on CUDA (one GPU per local rank), gloo on
    CPU. Outside torchrun, one_rank_group starts a process group of one rank anyway, so that FSDP2
    (and with it the mixed-precision recipe) runs in a single process exactly as on N ranks.
    timeout_minutes bounds how long a rank waits in any collective (None: 60). The group is created
    once, by the first call that needs it; a later call returns the same, and one that asks for
    another timeout is an error (a group's timeout cannot change)."""
    global _timeout_minutes
    torchrun = "RANK" in os.environ
    device = torch.device("cuda",
                          int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if not (torchrun or one_rank_group or is_distributed()):
        return 0, 1, device
    if is_distributed() and None not in (timeout_minutes, _timeout_minutes) and \
            timeout_minutes != _timeout_minutes:
        raise ValueError(f"the process group was created with a timeout of {_timeout_minutes} "
                         f"minutes; run.timeout_minutes = {timeout_minutes} cannot apply to it")
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _timeout_minutes = DEFAULT_TIMEOUT_MINUTES if timeout_minutes is None else timeout_minutes
        timeout = timedelta(minutes=_timeout_minutes)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if torchrun:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def resolve_device(name: str | None) -> torch.device:
    """None or 'auto': CUDA when it is available, else the CPU. Asking for CUDA where there is none
    is an error here, in one sentence, rather than deep inside the first tensor copy."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA devices (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return device


def split(rollout_ranks: int, device: torch.device,
          tp: int = 1) -> tuple[bool, int, int, object, list, object]:
    """rollout.placement separate: the first world - n ranks train, the last n decode and score
    (pbrl/pipeline.py); rollout rank j serves the k = (world - n) / n training ranks j k .. j k +
    k - 1, whose shares of a step are together its own. From here this rank's collectives (and the
    training ranks' FSDP2) run among its own kind. Returns (trains, rank among its kind, their
    number, the group in which training rank 0 broadcasts the weights to the rollout ranks, the
    groups of this rank's pairs: a training rank's one, a rollout rank's k, in order; a rollout
    rank's 1-D mesh of the `tp` consecutive rollout ranks it decodes tensor-parallel with, or
    None). Batches go by broadcast within a pair, not send/recv: a collective waits at most the
    process group's timeout (gloo's recv waits forever). Every rank calls it."""
    from torch.distributed.device_mesh import DeviceMesh
    global _group, _mesh
    world, rank = dist.get_world_size(), dist.get_rank()
    trainers = world - rollout_ranks
    served = trainers // rollout_ranks

    def new(ranks):  # (a new group does not inherit the default group's timeout)
        return dist.new_group(ranks, timeout=timedelta(minutes=_timeout_minutes))
    groups = new(list(range(trainers))), new(list(range(trainers, world)))
    stream = new([0, *range(trainers, world)])
    pairs = [new([t, trainers + t // served]) for t in range(trainers)]
    blocks = [new(list(range(b, b + tp))) for b in range(trainers, world, tp)] if tp > 1 else []
    trains = rank < trainers
    _group = groups[0] if trains else groups[1]
    _mesh = DeviceMesh.from_group(groups[0], device.type) if trains else None
    if trains:
        return True, rank, trainers, stream, [pairs[rank]], None
    j = rank - trainers
    mesh = DeviceMesh.from_group(blocks[j // tp], device.type) if blocks else None
    return False, j, rollout_ranks, stream, pairs[j * served:(j + 1) * served], mesh


def group():
    """The group this rank's collectives run in: every rank (None), or its kind's (split)."""
    return _group


def group_rank() -> int:
    """This rank's index in its group (0 in a single process)."""
    return dist.get_rank(_group) if is_distributed() else 0


def group_size() -> int:
    """The number of ranks in this rank's group (1 in a single process)."""
    return dist.get_world_size(_group) if is_distributed() else 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown(wait_for_peers: bool = True) -> None:
    """Barrier, tear down, then free what is no longer reachable. A rank that destroys its gloo
    group while a peer is still working (rank 0 writing results) can abort with "terminate called
    without an active exception"; so can one whose sharded models (their device meshes hold the
    process group) are only freed at interpreter exit: keep models out of module globals, and cycles
    unreachable by now are collected here, while the interpreter runs. A rank that is failing does
    not wait for its peers (they may be the reason it fails)."""
    if is_distributed():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@contextmanager
def process_group(timeout_minutes: float | None = None):
    """init() for the duration, then shutdown(): with a barrier when the body finished, without one
    when it raised, so the error that ended this rank is the one reported."""
    place = init(timeout_minutes=timeout_minutes)
    try:
        yield place
    except BaseException:
        shutdown(wait_for_peers=False)
        raise
    shutdown()


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: fully_shard each transformer block, then the root (embeddings, final norm, heads).
    compute_dtype (e.g. bf16 over a trainable model's fp32 parameters) is the dtype parameters are
    all-gathered and computed in, while the sharded parameters and the optimizer states keep theirs
    (fp32 masters) and gradients are reduced in fp32; None computes in the stored dtype (frozen
    models, fp32 runs)."""
    if not is_distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype,
                              reduce_dtype=torch.float32) if compute_dtype is not None \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=_mesh, mp_policy=mp)
    fully_shard(model, mesh=_mesh, mp_policy=mp)
    # Sum, not average, the ranks' gradients: losses are already divided by the global token count,
    # so the sum is exactly the gradient one process would compute on the whole batch.
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo has no PREMUL_SUM)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def shard_rows(rows: int, mesh=None, world: int = 1, rank: int = 0) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 that a rank holds under FSDP2's Shard(0), which splits as
    torch.chunk: ceil(rows / world) rows per rank, the last ranks possibly fewer or none. `mesh` (a
    DeviceMesh) gives world and rank when set."""
    if mesh is not None:
        world, rank = mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    return start, min(start + per_rank, rows)


@contextmanager
def gathered(model: torch.nn.Module):
    """Hold every FSDP unit's full parameters for the duration (rollout): one all-gather per
    generation instead of one per block per decoding step. Restores FSDP's defaults (reshard after
    forward, except the root)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, group=_group)
    return x


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size(_group)
    dist.all_gather_object(out, obj, group=_group)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_group)


def timed_out(error: BaseException) -> str | None:
    """What to tell the user when `error` is a collective that waited past the process group's
    timeout (gloo and NCCL say "timed out" in their own words), else None. It is asked after the
    failing rank has torn its group down, so it reads what init() recorded."""
    text = str(error)
    if _timeout_minutes is None or not isinstance(error, RuntimeError) or \
            "timed out" not in text.lower():
        return None
    return (f"rank {os.environ.get('RANK', 0)} waited longer than the process group's timeout "
            f"({_timeout_minutes} minutes, run.timeout_minutes) in a collective: another rank "
            f"stalled or died (its own output says why). {text.splitlines()[0][:200]}")


# ------------------------------------------------------------- tensor-parallel rollouts (DTensor)
def tensor_parallel_group(degree: int, device: torch.device):
    """The 1-D mesh of this rank's tensor-parallel group, from the (dp, tp) mesh over all ranks:
    ranks k * degree .. (k + 1) * degree - 1 decode together (one node's GPUs, when degree divides
    them), while FSDP keeps sharding the trained models over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world // degree, degree), mesh_dim_names=("dp", "tp"))
    return mesh["tp"]


def tensor_parallel_twin(model: torch.nn.Module, mesh, dtype: torch.dtype, device):
    """An empty copy of `model`'s architecture, its weights in dtype sharded over `mesh` as
    Megatron-LM shards a decoder: q, k, v, gate and up column-wise (each rank its attention heads
    and its slice of the MLP), o and down row-wise (their outputs summed over the group), the
    embedding and the LM head by vocabulary (the logits gathered whole, so every rank draws the same
    tokens). Built on the meta device, so no rank ever holds more than its shard, and left there:
    `tensor_parallel_weights` gives it its weights for a rollout. Its args describe one rank's share
    of the heads, the share its KV cache holds."""
    from dataclasses import replace

    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from pbrl.model import Transformer
    args, n = model.args, mesh.size()
    with torch.device("meta"):
        twin = Transformer(args, lm_head=model.lm_head is not None)
    column, row = ColwiseParallel(), RowwiseParallel()
    plan = {"self_attn.q_proj": column, "self_attn.k_proj": column, "self_attn.v_proj": column,
            "self_attn.o_proj": row, "mlp.gate_proj": column, "mlp.up_proj": column,
            "mlp.down_proj": row}
    for block in twin.layers:
        parallelize_module(block, mesh, plan)
    parallelize_module(twin, mesh, {"embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                                    **({"lm_head": ColwiseParallel(output_layouts=Replicate())}
                                       if twin.lm_head is not None else {})})
    twin.to(dtype)  # a tied LM head is now a weight of its own
    twin.args = replace(args, num_attention_heads=args.num_attention_heads // n,
                        num_key_value_heads=args.num_key_value_heads // n)
    return twin.eval().requires_grad_(False)


@contextmanager
def tensor_parallel_weights(twin: torch.nn.Module, model: torch.nn.Module, device,
                            keep: bool = False, weight=None):
    """The twin with its shards allocated and refreshed from `model` for the duration, freed
    after, so that no phase but the rollout holds them (keep: kept at the same addresses for the
    next rollout, as CUDA graphs need)."""
    allocate(twin, device)
    refresh(twin, model, weight or whole_parameter)
    try:
        yield twin
    finally:
        if not keep:
            twin.to_empty(device="meta")


def allocate(twin: torch.nn.Module, device) -> torch.nn.Module:
    """The tensor-parallel twin's shards allocated (uninitialised) on device and its RoPE
    frequencies computed, unless they are already."""
    from pbrl.model import rope_inv_freq
    if twin.inv_freq.is_meta:
        twin.to_empty(device=device)
        twin.inv_freq = rope_inv_freq(twin.args).to(device)
    return twin


def whole_parameter(model: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """model's parameter `name` whole (its FSDP shards gathered) in dtype, cast first: fewer bytes
    on the wire."""
    from torch.distributed.tensor import DTensor
    t = model.get_parameter(name).to(dtype)
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def refresh(twin: torch.nn.Module, model: torch.nn.Module, weight=whole_parameter) -> None:
    """Copy model's weights (FSDP-sharded or whole) into the tensor-parallel twin, one tensor at a
    time: each gathered whole (in the twin's dtype) by weight(model, name, dtype) (a LoRA model's:
    lora.whole_weight, the adapters merged), then this rank's shard of it kept. A rank holds at
    most one whole tensor besides its shards."""
    from torch.distributed.tensor import DTensor
    for name, mine in twin.state_dict().items():
        full = weight(model, name, mine.dtype)
        if isinstance(mine, DTensor):
            for axis, placement in enumerate(mine.placements):
                if placement.is_shard():
                    full = full.chunk(mine.device_mesh.size(axis), placement.dim)[
                        mine.device_mesh.get_local_rank(axis)]
            mine = mine.to_local()
        mine.copy_(full)


def decode_together(mesh, prompts: list, seeds: torch.Tensor, complete):
    """complete(prompts, seeds) over the prompts of every rank of the tensor-parallel group `mesh`,
    decoded as one batch, and this rank's rows of the result. Each prompt has len(seeds) /
    len(prompts) rows; sampling depends only on each row's seed, so a row's tokens are those it
    would get alone."""
    parts = [None] * mesh.size()
    dist.all_gather_object(parts, (prompts, seeds.tolist()), group=mesh.get_group())
    out = complete([p for mine, _ in parts for p in mine],
                   torch.tensor([s for _, theirs in parts for s in theirs]))
    first = sum(len(theirs) for _, theirs in parts[:mesh.get_local_rank()])
    rows = slice(first, first + len(seeds))
    width = int(out.lengths[rows].max())
    return type(out)(out.tokens[rows, :width], out.lengths[rows], out.finished[rows],
                     out.logprobs[rows, :width])
