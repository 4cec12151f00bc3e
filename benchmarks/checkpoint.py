"""Training-checkpoint cost per rank: pbrl's sharded DCP save and load against the gather-on-rank-0
torch.save it replaced, and against the storage itself (plain file writes of the same bytes,
measured in the same run).

    torchrun --nproc_per_node=2 benchmarks/checkpoint.py [--layers 8] [--hidden 1024] \
        [--out /tmp/ckpt-bench]

A random actor in Llama shapes (built on the meta device, sharded with FSDP2, each rank initialising
its own rows) with AdamW states: the training state is 16 bytes per parameter (fp32 weights, both
moments, and the gradient the optimizer needs is not saved). Per rank it prints the extra peak
resident memory (VmHWM over the RSS before, reset between phases through /proc/self/clear_refs),
seconds, and bytes written.
"""
import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pbrl import distributed as dist  # noqa: E402
from pbrl.checkpoint import (latest_checkpoint, load_training_checkpoint,  # noqa: E402
                             save_training_checkpoint)
from pbrl.model import ModelArgs, Transformer  # noqa: E402


def kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())[1])


class Peak:
    """Extra peak resident memory (bytes) and seconds of the code in its block."""

    def __enter__(self):
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.rss, self.start = kib("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.extra = (kib("VmHWM") - self.rss) * 1024
        dist.barrier()


def build(args: ModelArgs, seed: int):
    """A sharded actor whose rank-local rows are random, and AdamW with its states initialised."""
    with torch.device("meta"):
        model = Transformer(args)
    dist.shard(model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed + dist.init()[0])
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0, 0.02, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("/tmp/pbrl-checkpoint-bench"))
    a = ap.parse_args()
    rank, world, _ = dist.init()
    args = ModelArgs(model_type="llama", vocab_size=32000, hidden_size=a.hidden,
                     intermediate_size=a.hidden * 4,
                     num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                     num_key_value_heads=a.hidden // 256, head_dim=64, tie_word_embeddings=False)
    model, optimizer = build(args, seed=0)
    n = sum(p.numel() for p in model.parameters())
    state_bytes = 12 * n  # what a checkpoint holds: fp32 weights and both AdamW moments
    if rank == 0:
        shutil.rmtree(a.out, ignore_errors=True)
        print(f"{n / 1e6:.0f}M parameters, {world} ranks: {state_bytes / 2**30:.2f} GiB of weights "
              f"and AdamW moments ({state_bytes / world / 2**30:.2f} GiB per rank)")
    dist.barrier()
    rows = []

    with Peak() as save:
        ckpt = save_training_checkpoint(a.out, 1, {"actor": model}, {"actor": optimizer},
                                        {"step": 1})
    written = (ckpt / f"__{rank}_0.distcp").stat().st_size
    rows.append(("DCP save (pbrl)", save, written))

    fresh, fresh_optimizer = build(args, seed=1)
    with Peak() as load:
        load_training_checkpoint(latest_checkpoint(a.out), {"actor": fresh},
                                 {"actor": fresh_optimizer}, 1)
    assert all(torch.equal(p.to_local(), q.to_local())
               for p, q in zip(model.parameters(), fresh.parameters()))
    rows.append(("DCP load (pbrl)", load, 0))
    del fresh, fresh_optimizer

    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with Peak() as gather:  # the scheme DCP replaced: everything gathered to rank 0, one torch.save
        state = {"model": get_model_state_dict(model, options=full),
                 "optim": get_optimizer_state_dict(model, optimizer, options=full)}
        if rank == 0:
            torch.save(state, a.out / "full.pt")
        del state
    saved = (a.out / "full.pt").stat().st_size if rank == 0 else 0
    rows.append(("gather to rank 0 + torch.save", gather, saved))

    blob = os.urandom(written)
    with Peak() as raw:  # the storage's own speed on this rank's share of the bytes
        with open(a.out / f"raw{rank}.bin", "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    rows.append(("plain write of the same bytes", raw, written))

    reports = dist.all_gather_objects([(name, p.extra, p.seconds, nbytes)
                                       for name, p, nbytes in rows])
    if rank == 0:
        print(f"{'phase':32} {'rank':>4} {'extra peak RSS':>15} {'seconds':>8} {'written':>10} "
              f"{'GB/s':>6}")
        for r, report in enumerate(reports):
            for name, extra, seconds, nbytes in report:
                rate = f"{nbytes / seconds / 1e9:6.2f}" if nbytes else ""
                print(f"{name:32} {r:>4} {extra / 2**30:>11.2f} GiB {seconds:>8.2f} "
                      f"{nbytes / 2**30:>6.2f} GiB {rate}")
        mine = dict((name, (extra, seconds)) for name, extra, seconds, _ in reports[0])
        print(f"rank 0 extra peak: DCP save {mine['DCP save (pbrl)'][0] / state_bytes:.2f}x of the "
              f"whole training state, gather + torch.save "
              f"{mine['gather to rank 0 + torch.save'][0] / state_bytes:.2f}x; DCP save takes "
              f"{mine['DCP save (pbrl)'][1] / mine['plain write of the same bytes'][1]:.2f}x the "
              f"plain write of its bytes")
        shutil.rmtree(a.out, ignore_errors=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
