"""The embedded default: a miniature PB-RLSVR experiment on the toy world (pbrl/toy.py), on a CPU.

    python train.py                                  # or: torchrun --nproc_per_node=2 train.py
    python -m pbrl.experiment --steps 10             # shorter
    python -m pbrl.experiment --arms "PB-RLSVR hybrid, GRPO" --arm "NAME=key value ..."

Every run starts from the same warm start and goes through the real training loop (pbrl/trainer.py):
  PPO + gold exact match   the baseline, rewarded with the target-language gold labels
  PB-RLSVR embedding       cosine of aligned word vectors of the response and the English reference
  PB-RLSVR MT              the response translated into English (lexicon), then the same cosine
  PB-RLSVR hybrid          0.5 embedding + 0.5 agreement of the final answers with the pivot's
  PB-RLSVR hybrid, GRPO    the same reward, critic-free: each response against its prompt's others
Each arm runs over 3 RL seeds (--seeds) from the same warm start, with RECIPE. Writes
runs/toy/results.json (every seed's numbers), results.md (per-language accuracy, each arm's gain
over the warm start with a 95% bootstrap interval over held-out problems and seeds) and curves.svg
(reward and accuracy per step: the seeds' mean and range). docs/toy.md has the story and numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pbrl import distributed as dist
from pbrl.cli import natural_int, positive_int
from pbrl.config import Config, load_config
from pbrl.evaluate import accuracy_by_language, format_table
from pbrl.files import fresh_dir
from pbrl.plot import svg_panels
from pbrl.setup import prepare
from pbrl.toy import use_world

DEFAULT_OUT = "runs/toy"
# Every arm's recipe beyond Config's defaults: many small iterations (8 problems x 4 samples, one
# PPO epoch) gain more per CPU second than fewer big ones.
STEPS = 80
RECIPE = {"rollout.samples_per_prompt": 4, "ppo.epochs": 1}
GOLD = "PPO + gold exact match"
ARMS = {  # name -> its settings beyond RECIPE
    GOLD: {"reward.kind": "exact_match"},
    "PB-RLSVR embedding": {"reward.kind": "embedding"},
    "PB-RLSVR MT": {"reward.kind": "mt"},
    "PB-RLSVR hybrid": {"reward.kind": "hybrid"},
    "PB-RLSVR hybrid, GRPO": {"reward.kind": "hybrid", "ppo.advantage": "grpo"},
}


def arm_config(out: Path, name: str, settings: dict, steps: int, seed: int, run_seed: int,
               eval_every: int, seeds: int, log) -> Config:
    """One run's config: RECIPE, the arm's settings, the world of `seed` (problems, warm start,
    reward models, shared by every run), and the run's own seed (its sampling noise and order)."""
    pairs = {**RECIPE, **settings, "run.steps": steps, "run.seed": seed,
             "run.eval_every": eval_every, "run.checkpoint_every": "off",
             "data.pivot_cache": out / "pivot.jsonl"}  # the pivot answers once for all runs
    slug = name.lower().replace(" + ", "-").replace(",", "").replace(" ", "-")
    pairs["run.out_dir"] = out / slug / f"seed-{run_seed}" if seeds > 1 else out / slug
    cfg = use_world(load_config(None, [x for k, v in pairs.items() for x in (f"--{k}", str(v))]),
                    log=log)
    cfg.run.seed = run_seed
    return cfg


def run_experiment(out: Path, steps: int, seed: int = 0, eval_every: int = 20, seeds: int = 3,
                   arms: dict[str, dict] | None = None, log=print) -> dict:
    """Every arm (default: ARMS) from the same warm start, once per RL seed (seed, seed + 1, ...);
    writes results.json (every seed's accuracies and curves, each arm's gain with its 95%
    interval), results.md and curves.svg."""
    arms = ARMS if arms is None else arms
    accuracy = {name: {} for name in arms}  # arm -> seed -> {lang: accuracy}
    curves = {name: [] for name in arms}    # arm -> per seed, its {step, reward, acc/avg} rows
    correct = {name: [] for name in arms}   # arm -> per seed, {lang: [bool per held-out problem]}
    warm_records = None                     # the warm start's eval (step 0: the same for every run)
    t0 = time.perf_counter()
    for name, settings in arms.items():
        for s in range(seed, seed + seeds):
            log(f"== {name}" + (f", seed {s}" if seeds > 1 else "") + " ==")
            trainer = prepare(arm_config(out, name, settings, steps, seed, s, eval_every, seeds,
                                         log), log=log)
            if warm_records is not None:  # the same warm start and held-out problems: not redone
                trainer.eval_records[0] = warm_records
            history = trainer.run()
            evaluated = [h for h in history if any(k.startswith("acc/") for k in h)]
            accuracy[name][s] = _acc(evaluated[-1])
            curves[name].append([{"step": h["step"], **{k: h[k] for k in ("reward", "acc/avg")
                                                        if k in h}} for h in history])
            correct[name].append(by_language(trainer.eval_records[steps]))
            warm_records = warm_records or trainer.eval_records[0]
    summary = {"steps": steps, "seeds": list(range(seed, seed + seeds)), "arms": arms,
               "warm start": accuracy_by_language(warm_records), "accuracy": accuracy,
               "gain": {name: gain_interval(by_language(warm_records), correct[name])
                        for name in arms}, "curves": curves, "seconds": time.perf_counter() - t0}
    if dist.init()[0] == 0:  # rank 0 writes the results
        write_results(out, summary, log)
    return summary


def write_results(out: Path, summary: dict, log) -> None:
    """results.json, results.md (the two tables) and curves.svg, from run_experiment's summary."""
    warm, seeds = summary["warm start"], len(summary["seeds"])
    means = {"warm start": warm, **{name: {k: sum(a[k] for a in by_seed.values()) / seeds
                                           for k in warm}
                                    for name, by_seed in summary["accuracy"].items()}}
    table = format_table(means)
    gold = summary["gain"][GOLD]["mean"] if GOLD in summary["gain"] else 0.0
    lines = ["| arm | gain in avg (non-en) accuracy | 95% interval | of gold's gain | English |",
             "|---|---|---|---|---|"]
    for name, g in summary["gain"].items():
        share = f"{100 * g['mean'] / gold:.0f}%" if gold > 0 else "-"
        lines.append(f"| {name} | {g['mean']:+.1f} | [{g['low']:+.1f}, {g['high']:+.1f}] | {share} "
                     f"| {means[name]['en'] - warm['en']:+.1f} |")
    gain_table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(
        f"Per-language accuracy (%), {summary['steps']} PPO iterations per run, mean over seeds "
        f"{summary['seeds']}.\n\n{table}\n\nGain over the warm start, 95% interval by bootstrap "
        f"over held-out problems (paired with the warm start) and seeds.\n\n{gain_table}\n")
    curves = summary["curves"]
    mean_curves = {name: mean_rows(runs) for name, runs in curves.items()}
    (out / "curves.svg").write_text(svg_panels(mean_curves, ["reward", "acc/avg"], columns=2,
                                               width=380, bands=curves if seeds > 1 else None))
    log(table)
    log(gain_table)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curves.svg'} "
        f"({summary['seconds']:.0f}s in all)")


def by_language(records: list[dict]) -> dict[str, list[bool]]:
    """Eval records -> per language, each problem's correctness in id order."""
    out = {}
    for r in sorted(records, key=lambda r: (r["lang"], int(r["id"].rsplit("-", 1)[-1]))):
        out.setdefault(r["lang"], []).append(bool(r["correct"]))
    return out


def gain_interval(warm: dict[str, list[bool]], arm: list[dict[str, list[bool]]], n_boot: int = 4000,
                  seed: int = 0) -> dict[str, float]:
    """The gain (percentage points) of the average target-language accuracy over the warm start, its
    mean over the arm's seeds and a 95% percentile-bootstrap interval: each replicate draws the
    held-out problems of each language with replacement (the same draw for the warm start and every
    seed: the comparison is paired) and the seeds with replacement."""
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
    """Per-seed rows of the same steps -> one row per step with each metric's mean over the
    seeds."""
    out = []
    for rows in zip(*runs):
        keys = set.intersection(*(set(r) for r in rows)) - {"step"}
        means = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        out.append({"step": rows[0]["step"], **means})
    return out


def _acc(metrics: dict) -> dict[str, float]:
    return {k.removeprefix("acc/"): v for k, v in metrics.items() if k.startswith("acc/")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=STEPS)
    ap.add_argument("--seed", type=natural_int, default=0)
    ap.add_argument("--seeds", type=positive_int, default=3,
                    help="RL seeds per arm (seed, seed + 1, ...), all from the same warm start; "
                         "intervals need >= 3")
    ap.add_argument("--arms", action="append", metavar="NAME",
                    help=f"run only these arms (repeat); of: {'; '.join(ARMS)}")
    ap.add_argument("--arm", action="append", metavar="NAME=KEY VALUE ...", default=[],
                    help="an arm of your own: a name, then config overrides, e.g. "
                         "'hybrid, DAPO=reward.kind hybrid ppo.advantage grpo ppo.eps_high 0.28'")
    ap.add_argument("--out",
                    help=f"results directory, which must be empty or absent (default: "
                         f"{DEFAULT_OUT}, or {DEFAULT_OUT}-2, -3, ... when it holds an earlier "
                         f"experiment)")
    args = ap.parse_args(argv)
    arms = choose_arms(args.arms, args.arm)
    out = Path(args.out) if args.out else fresh_dir(Path(DEFAULT_OUT))
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} already holds results; choose an empty or new "
                              f"directory")
    with dist.process_group():
        out = Path(dist.all_gather_objects(str(out))[0])  # rank 0's choice, before any writes
        out.mkdir(parents=True, exist_ok=True)
        run_experiment(out, args.steps, args.seed, seeds=args.seeds, arms=arms)


def choose_arms(names: list[str] | None, custom: list[str]) -> dict[str, dict]:
    """ARMS by name (all when none is named and no arm of one's own is given), then the
    `NAME=key value ...` arms, each checked as a config before anything runs."""
    unknown = [n for n in names or [] if n not in ARMS]
    if unknown:
        raise ValueError(f"--arms: no arm {unknown[0]!r}; the arms are: {'; '.join(ARMS)}")
    arms = {n: ARMS[n] for n in names or ([] if custom else ARMS)}
    for spec in custom:
        name, _, rest = spec.partition("=")
        words = rest.split()
        if not name.strip() or len(words) % 2:
            raise ValueError(f"--arm {spec!r}: expected NAME=key value [key value ...]")
        settings = dict(zip(words[::2], words[1::2]))
        # a bad key fails
        load_config(None, [x for k, v in settings.items() for x in (f"--{k}", v)])
        arms[name.strip()] = settings
    return arms





if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main)
