"""Run under torchrun by tests/test_checkpoint.py: save a sharded training checkpoint (a sharded
actor and critic with AdamW states after one step) and load it into fresh models, while probes
record every way a rank could materialise a whole tensor: DTensor.full_tensor / redistribute,
floating-point all-gathers (pickled plans travel as uint8), and the size of every tensor DCP reads
from a file. Writes (rank 0) a JSON report to argv[2], argv[1] being a HF checkpoint and argv[3] the
run directory."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as c10d
import torch.distributed.checkpoint.filesystem as dcp_files
from torch.distributed.tensor import DTensor

from pbrl import distributed as dist
from pbrl.checkpoint import (latest_checkpoint, load_model, load_training_checkpoint,
                             save_training_checkpoint)

events = {"full_tensor": 0, "redistribute": 0, "float_gathers": 0, "largest_read": 0}


def probe(owner, name, record):
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)


def count(key):
    return lambda *a, **k: events.__setitem__(key, events[key] + 1)


def gathered(output, input=None, *args, **kwargs):
    tensors = output if isinstance(output, list) else [output]
    if any(t.is_floating_point() for t in tensors):
        events["float_gathers"] += 1


real_load = torch.load


def measured_load(*args, **kwargs):
    value = real_load(*args, **kwargs)
    if isinstance(value, torch.Tensor):
        events["largest_read"] = max(events["largest_read"], value.numel())
    return value


def build():
    models = {"actor": load_model(sys.argv[1], dtype=torch.float32, shard=dist.shard),
              "critic": load_model(sys.argv[1], dtype=torch.float32, value_head=True,
                                   shard=dist.shard)}
    return models, {name: torch.optim.AdamW(m.parameters(), lr=1e-2) for name, m in models.items()}


def main():  # the sharded models are locals: freed before the process exits (see dist.shutdown)
    rank, world, _ = dist.init()
    out = Path(sys.argv[3])
    models, optimizers = build()
    ids = torch.arange(12).view(2, 6)
    for name, model in models.items():
        (model(ids) if name == "actor"
         else model(ids, output="values")).float().square().mean().backward()
        optimizers[name].step()

    probe(DTensor, "full_tensor", count("full_tensor"))
    probe(DTensor, "redistribute", count("redistribute"))
    for name in ("all_gather", "all_gather_into_tensor"):
        probe(c10d, name, gathered)
    # the module's own reference to torch, used for every tensor it reads
    dcp_files.torch.load = measured_load
    save_training_checkpoint(out, 1, models, optimizers, {"step": 1})
    fresh, fresh_optimizers = build()
    load_training_checkpoint(latest_checkpoint(out), fresh, fresh_optimizers, max_step=1)
    dcp_files.torch.load = real_load

    same = all(torch.equal(a.to_local(), b.to_local()) for name in models
               for a, b in zip(models[name].parameters(), fresh[name].parameters()))
    for name in models:
        saved = optimizers[name].state_dict()["state"]
        loaded = fresh_optimizers[name].state_dict()["state"]
        same &= saved.keys() == loaded.keys() and all(
            torch.equal(saved[k][s].to_local() if isinstance(saved[k][s], DTensor) else saved[k][s],
                        loaded[k][s].to_local() if isinstance(loaded[k][s], DTensor)
                        else loaded[k][s])
            for k in saved for s in saved[k])
    reports = dist.all_gather_objects({**events, "same": bool(same)})
    if rank == 0:
        json.dump(reports, open(sys.argv[2], "w"))


main()
dist.shutdown()
