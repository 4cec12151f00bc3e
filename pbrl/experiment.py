"""The embedded default: a miniature PB-RLSVR experiment on the toy world (pbrl/toy.py), CPU, minutes.

    python train.py                          # or: torchrun --nproc_per_node=2 train.py
    python -m pbrl.experiment --steps 10     # shorter

Every run starts from the same warm start and goes through the real training loop (pbrl/trainer.py):
  PPO + gold exact match      the baseline: rewarded with the target-language gold labels
  PB-RLSVR embedding          cosine of aligned-word-vector embeddings of response and English pivot reference
  PB-RLSVR MT                 the response translated into English (lexicon), then the same cosine
  PB-RLSVR hybrid             0.5 embedding + 0.5 agreement of the final answers with the pivot's
  PB-RLSVR hybrid, GRPO       the same reward, critic-free: each response against its prompt's other samples
Writes runs/toy/results.json, results.md (per-language accuracy) and curves.svg (reward and accuracy per step).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pbrl import distributed as dist
from pbrl.cli import positive_int
from pbrl.config import Config
from pbrl.evaluate import format_table
from pbrl.plot import svg_panels
from pbrl.toy import use_world
from pbrl.trainer import Trainer

DEFAULT_OUT = "runs/toy"
RUNS = {
    "PPO + gold exact match": {"kind": "exact_match"},
    "PB-RLSVR embedding": {"kind": "embedding"},
    "PB-RLSVR MT": {"kind": "mt"},
    "PB-RLSVR hybrid": {"kind": "hybrid"},
    "PB-RLSVR hybrid, GRPO": {"kind": "hybrid", "advantage": "grpo"},
}


def run_experiment(out: Path, steps: int, seed: int = 0, eval_every: int = 5, log=print) -> dict:
    results = {"warm start": None}
    curves = {}
    t0 = time.perf_counter()
    for name, reward in RUNS.items():
        cfg = Config()
        cfg.reward.kind = reward["kind"]
        cfg.ppo.advantage = reward.get("advantage", "gae")
        cfg.run.steps, cfg.run.seed, cfg.run.eval_every = steps, seed, eval_every
        cfg.run.checkpoint_every = None
        cfg.run.out_dir = str(out / name.lower().replace(" + ", "-").replace(",", "").replace(" ", "-"))
        cfg.data.pivot_cache = str(out / "pivot.jsonl")  # the pivot answers once for all runs
        log(f"== {name} ==")
        history = Trainer(use_world(cfg, log=log), log=log).run()
        accuracy = [h for h in history if any(k.startswith("acc/") for k in h)]
        results["warm start"] = results["warm start"] or _acc(accuracy[0])
        results[name] = _acc(accuracy[-1])
        curves[name] = [{"step": h["step"], **{k: h[k] for k in ("reward", "acc/avg") if k in h}} for h in history]
    table = format_table(results)
    summary = {"steps": steps, "seed": seed, "seconds": time.perf_counter() - t0, "accuracy": results,
               "curves": curves}
    if dist.init()[0] != 0:  # rank 0 writes the results
        return summary
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(f"Per-language accuracy (%), {steps} PPO iterations per run, seed {seed}.\n\n"
                                    f"{table}\n")
    (out / "curves.svg").write_text(svg_panels(curves, ["reward", "acc/avg"], columns=2, width=380))
    log(table)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curves.svg'} "
        f"({summary['seconds']:.0f}s in all)")
    return summary


def _acc(metrics: dict) -> dict[str, float]:
    return {k.removeprefix("acc/"): v for k, v in metrics.items() if k.startswith("acc/")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=Config().run.steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help=f"results directory, which must be empty or absent (default: {DEFAULT_OUT}, or "
                                  f"{DEFAULT_OUT}-2, -3, ... when it holds an earlier experiment)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else fresh_dir(Path(DEFAULT_OUT))
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} already holds results; choose an empty or new directory")
    dist.init()
    out = Path(dist.all_gather_objects(str(out))[0])  # rank 0's choice, made before any rank writes
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_experiment(out, args.steps, args.seed)
    finally:
        dist.shutdown()


def fresh_dir(base: Path) -> Path:
    """base, or the first of base-2, base-3, ... that is empty or absent: a rerun never touches earlier results."""
    candidates = (base if i == 1 else base.with_name(f"{base.name}-{i}") for i in range(1, 10_000))
    return next(c for c in candidates if not (c.is_dir() and any(c.iterdir())))


if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main)
