"""The embedded default: a miniature PB-RLSVR experiment on the toy world (pbrl/toy.py), CPU, minutes.

    python train.py                          # or: torchrun --nproc_per_node=2 train.py
    python -m pbrl.experiment --steps 10     # shorter

Every run starts from the same warm start and goes through the real training loop (pbrl/trainer.py):
  PPO + gold exact match      the baseline: rewarded with the target-language gold labels
  PB-RLSVR embedding          cosine of aligned-word-vector embeddings of response and English pivot reference
  PB-RLSVR MT                 the response translated into English (lexicon), then the same cosine
  PB-RLSVR hybrid             0.5 embedding + 0.5 agreement of the final answers with the pivot's
  PB-RLSVR hybrid, GRPO       the same reward, critic-free: each response against its prompt's other samples
Each arm runs over 3 RL seeds (--seeds) from the same warm start, with RECIPE. Writes runs/toy/results.json (every
seed's numbers), results.md (per-language accuracy, each arm's gain over the warm start with a 95% bootstrap
interval over held-out problems and seeds) and curves.svg (reward and accuracy per step: the seeds' mean and range).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pbrl import distributed as dist
from pbrl.cli import positive_int
from pbrl.config import load_config
from pbrl.evaluate import accuracy_by_language, format_table
from pbrl.plot import svg_panels
from pbrl.toy import use_world
from pbrl.setup import prepare

DEFAULT_OUT = "runs/toy"
# Every arm's recipe beyond Config's defaults: many small iterations (8 problems x 4 samples, one PPO epoch) gain
# more per CPU second than fewer big ones; 3 seeds x 5 arms then take ~7 minutes of 2 CPU cores (plus ~2.5 for the
# world).
STEPS = 80
RECIPE = {"rollout.samples_per_prompt": 4, "ppo.epochs": 1}
GOLD = "PPO + gold exact match"
RUNS = {
    GOLD: {"kind": "exact_match"},
    "PB-RLSVR embedding": {"kind": "embedding"},
    "PB-RLSVR MT": {"kind": "mt"},
    "PB-RLSVR hybrid": {"kind": "hybrid"},
    "PB-RLSVR hybrid, GRPO": {"kind": "hybrid", "advantage": "grpo"},
}


def run_experiment(out: Path, steps: int, seed: int = 0, eval_every: int = 20, seeds: int = 3, log=print) -> dict:
    """Every arm of RUNS from the same warm start, once per RL seed (seed, seed + 1, ...); writes results.json
    (every seed's accuracies and curves, each arm's gain with its 95% interval), results.md and curves.svg."""
    accuracy = {name: {} for name in RUNS}   # arm -> seed -> {lang: accuracy}
    curves = {name: [] for name in RUNS}     # arm -> one list of {step, reward, acc/avg} rows per seed
    correct = {name: [] for name in RUNS}    # arm -> per seed: {lang: [bool per held-out problem]}
    warm_records = None                      # the warm start's eval records (step 0: the same for every run)
    t0 = time.perf_counter()
    for name, reward in RUNS.items():
        for s in range(seed, seed + seeds):
            cfg = load_config(None, [x for key, value in RECIPE.items() for x in (f"--{key}", str(value))])
            cfg.reward.kind = reward["kind"]
            cfg.ppo.advantage = reward.get("advantage", "gae")
            cfg.run.steps, cfg.run.seed, cfg.run.eval_every = steps, seed, eval_every
            cfg.run.checkpoint_every = None
            slug = name.lower().replace(" + ", "-").replace(",", "").replace(" ", "-")
            cfg.run.out_dir = str(out / slug / f"seed-{s}" if seeds > 1 else out / slug)
            cfg.data.pivot_cache = str(out / "pivot.jsonl")  # the pivot answers once for all runs
            log(f"== {name}" + (f", seed {s}" if seeds > 1 else "") + " ==")
            cfg = use_world(cfg, log=log)  # the world of `seed` (problems, warm start, reward models) for every run
            cfg.run.seed = s               # the run's own seed: its sampling noise and problem order
            trainer = prepare(cfg, log=log)
            if warm_records is not None:  # the same warm start and held-out problems: its eval is not redone
                trainer.eval_records[0] = warm_records
            history = trainer.run()
            accuracy[name][s] = _acc([h for h in history if any(k.startswith("acc/") for k in h)][-1])
            curves[name].append([{"step": h["step"], **{k: h[k] for k in ("reward", "acc/avg") if k in h}}
                                 for h in history])
            correct[name].append(by_language(trainer.eval_records[steps]))
            warm_records = warm_records or trainer.eval_records[0]
    warm, warm_acc = by_language(warm_records), accuracy_by_language(warm_records)
    gains = {name: gain_interval(warm, correct[name]) for name in RUNS}
    means = {"warm start": warm_acc, **{name: {k: sum(a[k] for a in accuracy[name].values()) / seeds
                                                for k in warm_acc} for name in RUNS}}
    table = format_table(means)
    gold = gains[GOLD]["mean"]
    lines = []
    for name, g in gains.items():
        share = f"{100 * g['mean'] / gold:.0f}%" if gold > 0 else "-"
        lines.append(f"| {name} | {g['mean']:+.1f} | [{g['low']:+.1f}, {g['high']:+.1f}] | {share} | "
                     f"{means[name]['en'] - warm_acc['en']:+.1f} |")
    gain_table = "\n".join(["| arm | gain in avg (non-en) accuracy | 95% interval | of gold's gain | English |",
                            "|---|---|---|---|---|", *lines])
    summary = {"steps": steps, "seeds": list(range(seed, seed + seeds)), "seconds": time.perf_counter() - t0,
               "warm start": warm_acc, "accuracy": accuracy, "gain": gains, "curves": curves}
    if dist.init()[0] != 0:  # rank 0 writes the results
        return summary
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(
        f"Per-language accuracy (%), {steps} PPO iterations per run, mean over seeds {summary['seeds']}.\n\n"
        f"{table}\n\nGain over the warm start, 95% interval by bootstrap over held-out problems (paired with the "
        f"warm start) and seeds.\n\n{gain_table}\n")
    mean_curves = {name: mean_rows(runs) for name, runs in curves.items()}
    (out / "curves.svg").write_text(svg_panels(mean_curves, ["reward", "acc/avg"], columns=2, width=380,
                                               bands=curves if seeds > 1 else None))
    log(table)
    log(gain_table)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curves.svg'} "
        f"({summary['seconds']:.0f}s in all)")
    return summary


def by_language(records: list[dict]) -> dict[str, list[bool]]:
    """Eval records -> per language, each problem's correctness in id order."""
    out = {}
    for r in sorted(records, key=lambda r: (r["lang"], int(r["id"].rsplit("-", 1)[-1]))):
        out.setdefault(r["lang"], []).append(bool(r["correct"]))
    return out


def gain_interval(warm: dict[str, list[bool]], arm: list[dict[str, list[bool]]], n_boot: int = 4000,
                  seed: int = 0) -> dict[str, float]:
    """The gain (percentage points) of the average target-language accuracy over the warm start, its mean over the
    arm's seeds and a 95% percentile-bootstrap interval: each replicate draws the held-out problems of each
    language with replacement (the same draw for the warm start and every seed: the comparison is paired) and the
    seeds with replacement."""
    import numpy as np
    langs = [lang for lang in warm if lang != "en"]
    w = np.array([warm[lang] for lang in langs], dtype=float)                  # [L, P]
    a = np.array([[s[lang] for lang in langs] for s in arm], dtype=float)     # [S, L, P]
    rng = np.random.default_rng(seed)
    n_langs, n_problems = w.shape
    draws = []
    for _ in range(n_boot):
        problems = rng.integers(0, n_problems, (n_langs, n_problems))
        seeds = rng.integers(0, len(arm), len(arm))
        picked = np.take_along_axis(a[seeds], problems[None].repeat(len(seeds), 0), axis=2)
        draws.append(100 * (picked.mean() - np.take_along_axis(w, problems, axis=1).mean()))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(100 * (a.mean() - w.mean())), "low": float(low), "high": float(high)}


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Per-seed rows of the same steps -> one row per step with each metric's mean over the seeds."""
    out = []
    for rows in zip(*runs):
        keys = set.intersection(*(set(r) for r in rows)) - {"step"}
        out.append({"step": rows[0]["step"], **{k: sum(r[k] for r in rows) / len(rows) for k in keys}})
    return out


def _acc(metrics: dict) -> dict[str, float]:
    return {k.removeprefix("acc/"): v for k, v in metrics.items() if k.startswith("acc/")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=positive_int, default=3,
                    help="RL seeds per arm (seed, seed + 1, ...), all from the same warm start; intervals need >= 3")
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
        run_experiment(out, args.steps, args.seed, seeds=args.seeds)
    finally:
        dist.shutdown()


def fresh_dir(base: Path) -> Path:
    """base, or the first of base-2, base-3, ... that is empty or absent: a rerun never touches earlier results."""
    candidates = (base if i == 1 else base.with_name(f"{base.name}-{i}") for i in range(1, 10_000))
    return next(c for c in candidates if not (c.is_dir() and any(c.iterdir())))


if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main)
