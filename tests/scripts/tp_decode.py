"""Run under torchrun by tests/test_tensor_parallel.py: every rank builds the same random model
(argv[1]: a HF checkpoint), decodes alone (its whole copy), then with the ranks as one
tensor-parallel group on a twin refreshed from the FSDP-sharded model, eagerly and (--compile)
through the compiled step (aot_eager, fullgraph). Rank 0 writes a JSON report to argv[2]: the
tokens and log-probs of each way, the largest tensor any rank held of each twin weight against the
whole, and the bytes of its shards."""
import json
import sys

import torch
from torch.distributed.tensor import DTensor

import pbrl.graphs
from pbrl import distributed as dist
from pbrl.checkpoint import load_model
from pbrl.graphs import CudaGraphs
from pbrl.sampler import generate

rank, world, device = dist.init()
whole = load_model(sys.argv[1]).eval()
sharded = dist.shard(load_model(sys.argv[1]))
prompts = [[5, 17, 33, 2, 90, 14, 7], [8, 3], [41, 42, 43, 44], [9] * 12]
runs = {"greedy": dict(), "sampled": dict(temperature=1.0, n=2, seed=5, stop_ids=[17, 40])}
report = {}
group = dist.tensor_parallel_group(world, device)
twin = dist.tensor_parallel_twin(sharded, group, torch.float32, device)
assert all(t.is_meta for t in twin.state_dict().values())
gathered, real_full_tensor = [], DTensor.full_tensor


def full_tensor(self, *args, **kwargs):  # what a refresh gathers, one tensor at a time
    out = real_full_tensor(self, *args, **kwargs)
    gathered.append(out.numel())
    return out


DTensor.full_tensor = full_tensor
weights = dist.tensor_parallel_weights(twin, sharded, device, keep=True)
weights.__enter__()
DTensor.full_tensor = real_full_tensor
report["largest_gathered"] = max(gathered)
report["largest_parameter"] = max(p.numel() for p in whole.parameters())
largest = {}
for name, t in twin.state_dict().items():
    local = t.to_local() if isinstance(t, DTensor) else t
    largest[name] = [local.numel(), whole.state_dict()[name].numel()]
report["shards"] = largest
report["twin_bytes"] = sum(v[0] * 4 for v in largest.values())
for key, kwargs in runs.items():
    alone = generate(whole, prompts, 10, **kwargs)
    together = generate(twin, prompts, 10, **kwargs)
    report[key] = {"alone": alone.as_lists(), "together": together.as_lists(),
                   "logprob_gap": float((alone.logprobs - together.logprobs).abs().max())}
if "--compile" in sys.argv:
    pbrl.graphs.COMPILE_OPTIONS = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    compiled = generate(twin, prompts, 10, graphs=CudaGraphs(), **runs["sampled"])
    report["compiled"] = compiled.as_lists()
weights.__exit__(None, None, None)  # kept: still there
report["kept"] = not any(t.is_meta for t in twin.state_dict().values())
with dist.tensor_parallel_weights(twin, sharded, device):
    again = generate(twin, prompts, 10, **runs["sampled"])
report["again"] = again.as_lists()
report["freed"] = all(t.is_meta for t in twin.state_dict().values())
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)
dist.shutdown()
