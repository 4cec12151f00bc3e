"""Run under torchrun by tests/test_tensor_parallel.py: every rank builds the same random model
(argv[1]: a HF checkpoint) and decodes alone (its whole copy); then all ranks as one
tensor-parallel group on a twin refreshed from the FSDP-sharded model; then groups of 2 (a 2-D
mesh), each decoding its members' different prompts together, eagerly and through the compiled
step (aot_eager, fullgraph), and evaluating its share of problems on its twin as the trainer does.
Rank 0 writes a JSON report to argv[2]: the tokens and log-probs of each way, the largest tensor
any rank held of each twin weight against the whole, and the bytes of its shards."""
import json
import sys

import torch
import torch.distributed as c10d
from torch.distributed.tensor import DTensor

import pbrl.cudagraphs
from pbrl import distributed as dist
from pbrl.checkpoint import load_model
from pbrl.data import Problem
from pbrl.evaluate import evaluate
from pbrl.cudagraphs import CudaGraphs
from pbrl.sampler import Sampling, complete, generate
from pbrl.tokenizer import Tokenizer

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
weights.__exit__(None, None, None)  # kept: still there
report["kept"] = not any(t.is_meta for t in twin.state_dict().values())
with dist.tensor_parallel_weights(twin, sharded, device):
    again = generate(twin, prompts, 10, **runs["sampled"])
report["again"] = again.as_lists()
report["freed"] = all(t.is_meta for t in twin.state_dict().values())
# A 2-D mesh: groups of 2 (dp = world / 2), each decoding its members' different prompts together,
# eagerly and through the compiled step
pairs = dist.tensor_parallel_group(2, device)
half = dist.tensor_parallel_twin(sharded, pairs, torch.float32, device)
mine = prompts[rank % 2 * 2:rank % 2 * 2 + 2]  # the two ranks of a pair hold different prompts
seeds = torch.arange(4) + 100 * rank
sampling = Sampling(10, 2, 1.0, None, None, torch.tensor([17, 40]), 0)
alone = complete(whole, mine, sampling, seeds).as_lists()
pbrl.cudagraphs.COMPILE_OPTIONS = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
graphs = CudaGraphs()
with dist.tensor_parallel_weights(half, sharded, device, keep=True):
    ours = [dist.decode_together(pairs, mine, seeds, lambda p, s, g=g: complete(
        half, p, sampling, s, graphs=g)).as_lists() for g in (None, graphs)]
# the trainer's evaluation under TP: each group evaluates its share on the twin, in lockstep
tokenizer = Tokenizer.from_pretrained(sys.argv[1])
problems = [Problem(f"p{i}", "de", f"Was ist {i} + {i}?", str(2 * i)) for i in range(6)]
share = problems[rank // 2::world // 2]
with dist.tensor_parallel_weights(half, sharded, device):
    evaluated = evaluate(half, tokenizer, share, max_new_tokens=6, progress=False)
same = ours == [alone, alone] and evaluated == evaluate(whole, tokenizer, share, max_new_tokens=6,
                                                        progress=False)
report["groups_of_two"] = [None] * world
c10d.all_gather_object(report["groups_of_two"], same)
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)
dist.shutdown()
