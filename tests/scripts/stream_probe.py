"""Run under torchrun (3 ranks, gloo) by tests/test_pipeline.py: what pbrl/pipeline.py streams.
Ranks 0-1 train (the model of argv[1] sharded by FSDP2 between them, in fp32), rank 2 decodes (a
whole copy in bf16, the compute dtype, and decoding through CudaGraphs' compiled step, aot_eager).
Three times: the training ranks take an optimizer step and stream the weights; the rollout ranks
receive them. Every tensor a training rank gathers while streaming is tracked by a weak reference
to its storage. Each rank writes to argv[2]/rank-N-step-K.pt what it holds after each stream
(training ranks: the weights gathered after it, in bf16; rollout ranks: their parameters), and
rank-N.json: the most gathered tensors alive at once; a rollout rank's, whether its parameters
kept their addresses and whether its compiled decoding equals its eager decoding."""
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

import pbrl.cudagraphs
from pbrl import distributed as dist
from pbrl.checkpoint import load_model
from pbrl.cudagraphs import CudaGraphs
from pbrl.pipeline import receive_weights, stream_weights
from pbrl.sampler import Sampling, complete

out = Path(sys.argv[2])
dist.init()
device = torch.device("cpu")
trains, rank, world, stream, pairs, _ = dist.split(1, device)
me = torch.distributed.get_rank()
report = {"most_alive": 0}
alive, real_full_tensor = [], DTensor.full_tensor


def full_tensor(self, *args, **kwargs):  # every tensor streaming gathers, and how many live
    whole = real_full_tensor(self, *args, **kwargs)
    # gloo's worker thread lets go of the previous broadcast's tensor a moment after the
    # broadcast returns (without this pause rank 0 counts 2 alive, once per run or so)
    time.sleep(0.02)
    alive[:] = [ref for ref in alive if not ref.expired()]
    alive.append(StorageWeakRef(whole.untyped_storage()))
    report["most_alive"] = max(report["most_alive"], len(alive))
    return whole


if trains:
    model = dist.shard(load_model(sys.argv[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = SimpleNamespace(actor=SimpleNamespace(model=model), dtype=torch.bfloat16, rank=rank,
                              stream=stream)
else:
    model = load_model(sys.argv[1], dtype=torch.bfloat16).requires_grad_(False)
    worker = SimpleNamespace(actor=SimpleNamespace(model=model), stream=stream, tp_twin=None)
    addresses = [p.data_ptr() for p in model.parameters()]
    pbrl.cudagraphs.COMPILE_OPTIONS = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    graphs, same = CudaGraphs(), []
    sampling = Sampling(8, 2, 1.0, None, None, torch.tensor([17]), 0)
    prompts, seeds = [[5, 17, 33, 2], [8, 3]], torch.arange(4)
for step in range(3):
    if trains:
        loss = model(torch.tensor([[3, 5, 7, 9 + step + rank]])).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        DTensor.full_tensor = full_tensor
        stream_weights(trainer, {})
        DTensor.full_tensor = real_full_tensor
        held = {n: dist.whole_parameter(model, n, torch.bfloat16) for n, _ in
                model.named_parameters()}
    else:
        receive_weights(worker)
        held = {n: p.detach().clone() for n, p in model.named_parameters()}
        eager = complete(model, prompts, sampling, seeds)
        compiled = complete(model, prompts, sampling, seeds, 128, graphs)
        same.append(eager.as_lists() == compiled.as_lists())
    torch.save(held, out / f"rank-{me}-step-{step}.pt")
if not trains:
    report["kept_addresses"] = addresses == [p.data_ptr() for p in model.parameters()]
    report["compiled_equals_eager"] = same
(out / f"rank-{me}.json").write_text(json.dumps(report))
dist.shutdown()
