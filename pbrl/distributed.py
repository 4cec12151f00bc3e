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
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use cpu")
    return device


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
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Sum, not average, the ranks' gradients: losses are already divided by the global token count,
    # so the sum is exactly the gradient one process would compute on the whole batch.
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo has no PREMUL_SUM)
            unit.set_force_sum_reduction_for_comms(True)
    return model


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
        dist.all_reduce(x)
    return x


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


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
