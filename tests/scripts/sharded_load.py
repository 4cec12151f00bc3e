"""Run under torchrun by tests/test_checkpoint.py: load a checkpoint sharded, record the largest
tensor slice any read returned and rank 0's parameter bytes, gather the full state and write them
(rank 0) to the JSON file named by argv[2]."""
import json
import sys

import safetensors
import torch

from pbrl import distributed as dist
from pbrl.checkpoint import load_model

largest = []
real_open = safetensors.safe_open


class Probe:
    """safe_open whose get_tensor/get_slice reads are measured."""

    def __init__(self, *args, **kwargs):
        self.f = real_open(*args, **kwargs)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        t = self.f.get_tensor(name)
        largest.append(t.numel())
        return t

    def get_slice(self, name):
        view = self.f.get_slice(name)

        class Sliced:
            def get_shape(self):
                return view.get_shape()

            def get_dtype(self):
                return view.get_dtype()

            def __getitem__(self, index):
                t = view[index]
                largest.append(t.numel())
                return t
        return Sliced()


import pbrl.checkpoint  # noqa: E402


def main():  # the sharded model is a local: freed before the process exits (see dist.shutdown)
    rank, world, _ = dist.init()
    model = load_model(sys.argv[1], dtype=torch.float32, value_head=True, shard=dist.shard)
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        json.dump({"largest_read": max(largest), "state": {k: v.tolist() for k, v in state.items()},
                   "rank0_parameter_bytes": local_bytes}, open(sys.argv[2], "w"))


pbrl.checkpoint.safe_open = Probe
main()
dist.shutdown()
