"""The embedded default: a miniature PB-RLSVR experiment on the toy world (pbrl/toy.py), on a CPU.

    python train.py                                  # or: torchrun --nproc_per_node=2 train.py
    python -m pbrl.experiment --steps 10             # shorter
    python -m pbrl.experiment --arms "PB-RLSVR hybrid" --arm "hybrid, GRPO=ppo.advantage grpo ..."

Every run starts from the same warm start and goes through the real training loop (pbrl/trainer.py):
  PPO + gold exact match   the baseline, rewarded with the target-language gold labels
  English-only RLVR        ordinary RL with verifiable rewards: gold labels, English problems only
  PB-RLSVR embedding       cosine of aligned word vectors of the response and the English reference
  PB-RLSVR MT              the response translated into English (lexicon), then the same cosine
  PB-RLSVR hybrid          0.5 embedding + 0.5 agreement of the final answers with the pivot's
Each arm runs over 3 RL seeds (--seeds) from the same warm start, with RECIPE, one run per CPU at a
time (--workers). Writes runs/toy/results.json (every seed's numbers), results.md (per-language
accuracy; each arm's gain over the warm start and over English-only RLVR, with 95% bootstrap
intervals over held-out problems and seeds) and curves.svg (reward and accuracy per step: the
seeds' mean and range). docs/toy.md has the story and numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pbrl import distributed as dist
from pbrl import numerics
from pbrl.cli import Progress, natural_int, positive_int
from pbrl.config import Config, load_config, validate
from pbrl.evaluate import accuracy_by_language, format_table
from pbrl.files import fresh_dir, write_atomic
from pbrl.plot import svg_panels
from pbrl.prepare import prepare
from pbrl.toy import use_world

DEFAULT_OUT = "runs/toy"
RESULT = "result.json"  # in a run's directory once it has finished: what the experiment keeps
SPEC = "experiment.json"  # in --out: the options it was started with, which a rerun must repeat
# Every arm's recipe beyond Config's defaults: many small iterations (8 problems x 4 samples, one
# PPO epoch) gain more per CPU second than fewer big ones.
STEPS, EVAL_EVERY = 60, 30
FIDELITY_STEPS = 10  # the diagnostics in results.md: the last iterations' mean
# cosine: the learning rate decays to 10% by the last iteration, so each run ends settled rather
# than on a constant-rate step's noise (docs/toy.md, "The learning-rate schedule": at a constant
# 3e-4 the target languages swung by up to 15 points between evaluations 10 iterations apart)
RECIPE = {"rollout.samples_per_prompt": 4, "ppo.epochs": 1, "ppo.lr": 3e-4,
          "ppo.schedule": "cosine"}
GOLD, ENGLISH = "PPO + gold exact match", "English-only RLVR"
ARMS = {  # name -> its settings beyond RECIPE
    GOLD: {"reward.kind": "exact_match"},
    # ordinary RL with verifiable rewards: gold labels, English problems only
    ENGLISH: {"reward.kind": "exact_match", "data.langs": "en"},
    "PB-RLSVR embedding": {"reward.kind": "embedding"},
    "PB-RLSVR MT": {"reward.kind": "mt"},
    "PB-RLSVR hybrid": {"reward.kind": "hybrid"},
}


# the settings the driver sets for every run (its options in parentheses): an arm may not
GREEDY = "the driver (its intervals compare one greedy answer a problem)"
OWNED = {"run.out_dir": "--out", "run.steps": "--steps", "run.seed": "--seed and --seeds",
         "run.eval_every": "the driver", "run.checkpoint_every": "the driver",
         "data.pivot_cache": "the driver: one for every run, in --out",
         "run.eval_samples": GREEDY, "run.eval_temperature": GREEDY}


def slug(name: str) -> str:
    """An arm's directory name under --out."""
    return name.lower().replace(" + ", "-").replace(",", "").replace(" ", "-")


def arm_pairs(out: Path, name: str, settings: dict, steps: int, seed: int, run_seed: int,
              eval_every: int, seeds: int) -> dict:
    """One run's settings: RECIPE, the arm's, then the driver's (OWNED): the world of `seed`
    (problems, warm start, reward models, shared by every run) and the run's own directory."""
    pairs = {**RECIPE, **settings, "run.steps": steps, "run.seed": seed,
             "run.eval_every": eval_every, "run.checkpoint_every": "off",
             "data.pivot_cache": out / "pivot.jsonl"}  # the pivot answers once for all runs
    pairs["run.out_dir"] = out / slug(name) / f"seed-{run_seed}" if seeds > 1 else out / slug(name)
    return pairs


def arm_config(out: Path, name: str, settings: dict, steps: int, seed: int, run_seed: int,
               eval_every: int, seeds: int, log) -> Config:
    """One run's config (arm_pairs) with the toy world built, and the run's own seed (its sampling
    noise and order)."""
    pairs = arm_pairs(out, name, settings, steps, seed, run_seed, eval_every, seeds)
    cfg = use_world(load_config(None, as_argv(pairs)), log=log)
    cfg.run.seed = run_seed
    return cfg


def as_argv(pairs: dict) -> list[str]:
    return [x for k, v in pairs.items() for x in (f"--{k}", str(v))]


def run_experiment(out: Path, steps: int, seed: int = 0, eval_every: int | str = EVAL_EVERY,
                   seeds: int = 3, arms: dict[str, dict] | None = None, workers: int = 1,
                   log=print) -> dict:
    """Every arm (default: ARMS) from the same warm start, once per RL seed (seed, seed + 1, ...);
    writes results.json (every seed's accuracies and curves, each arm's gain with its 95%
    interval), results.md and curves.svg. The first run answers the pivot's references and
    evaluates the warm start for all; the others then run `workers` at a time, each in its own
    process on one CPU thread (a run of the toy's size gains little from a second thread)."""
    arms = ARMS if arms is None else arms
    t0, computed = time.perf_counter(), numerics.describe()
    if not numerics.pinned():
        log(f"numerics: not pinned ({computed['aten']} kernels, MKL_CBWR={computed['mkl_cbwr']}): "
            f"the warm start and the tables are this machine's, not the README's (docs/toy.md)")
    jobs = experiment_jobs(out, arms, steps, seed, seeds, eval_every)
    earlier = finished_runs(jobs, log)  # an interrupted experiment's, continued
    bar = Progress(len(jobs), "toy runs", " runs", every=0)

    def finished(run: dict) -> None:
        bar.update()
        log(f"{run['arm']}, seed {run['seed']}: {format_accuracy(run['accuracy'])}")
    first = earlier.get(0) or one_run(*jobs[0], None, log)
    finished(first)
    workers = 1 if dist.init()[1] > 1 else workers  # under torchrun the ranks share each run
    todo = [i for i in range(1, len(jobs)) if i not in earlier]
    for i in range(1, len(jobs)):
        if i in earlier:
            finished(earlier[i])
    try:
        made = in_processes(one_run, [(*jobs[i], first["warm"], log if workers == 1 else None)
                                      for i in todo], workers, finished)
    except (KeyboardInterrupt, ChildProcessError):
        log(f"stopped: {bar.n} of {len(jobs)} runs finished and are kept under {out}; the same "
            f"command with --out {out} continues from them")
        raise
    runs = {**earlier, **dict(zip(todo, made))}
    done = [first, *(runs[i] for i in range(1, len(jobs)))]
    bar.close()
    accuracy = {name: {} for name in arms}  # arm -> seed -> {lang: accuracy}
    curves = {name: [] for name in arms}    # arm -> per seed, its {step, reward, acc/avg} rows
    correct = {name: [] for name in arms}   # arm -> per seed, {lang: [bool per held-out problem]}
    fidelity = {name: [] for name in arms}  # arm -> per seed, the last steps' diagnostics
    for (_, name, _, _, _, s, _, _), run in zip(jobs, done):
        accuracy[name][s] = run["accuracy"]
        curves[name].append(run["curve"])
        correct[name].append(run["correct"])
        fidelity[name].append(run.get("fidelity", {}))
    warm = [by_language(first["warm"])]
    summary = {"steps": steps, "seeds": list(range(seed, seed + seeds)), "arms": arms,
               "warm start": accuracy_by_language(first["warm"]), "accuracy": accuracy,
               "gain": {name: gain_interval(warm, correct[name]) for name in arms},
               # what English RL alone leaves for the target-language rewards: each arm against it
               "over English-only": {name: gain_interval(correct[ENGLISH], correct[name])
                                     for name in arms if ENGLISH in arms and name != ENGLISH},
               "curves": curves, "fidelity": {name: mean_dicts(f) for name, f in fidelity.items()},
               "numerics": computed, "seconds": time.perf_counter() - t0}
    if dist.init()[0] == 0:  # rank 0 writes the results
        write_results(out, summary, log)
    return summary


def experiment_jobs(out: Path, arms: dict[str, dict], steps: int, seed: int, seeds: int,
                    eval_every) -> list[tuple]:
    """Each run's arguments (one_run's), every run's settings checked first: a bad value in the
    last arm is found before the first one trains."""
    jobs = [(out, name, arms[name], steps, seed, s, eval_every, seeds)
            for name in arms for s in range(seed, seed + seeds)]
    for job in jobs:
        validate(load_config(None, as_argv(arm_pairs(*job))), dist.init()[1])
    return jobs


def one_run(out: Path, name: str, settings: dict, steps: int, seed: int, run_seed: int,
            eval_every: int | str, seeds: int, warm_records: list[dict] | None,
            log=None) -> dict:
    """One arm's run for one RL seed: its final accuracy per language, its curve (reward and
    accuracy per step), each held-out problem's correctness, and the warm start's eval records
    (given, or made by this run)."""
    log = log or (lambda *a: None)
    log(f"== {name}" + (f", seed {run_seed}" if seeds > 1 else "") + " ==")
    trainer = prepare(arm_config(out, name, settings, steps, seed, run_seed, eval_every, seeds,
                                 log), log=log)
    if warm_records is not None:  # the same warm start and held-out problems: not redone
        trainer.eval_records[0] = warm_records
    history = trainer.run()
    evaluated = [h for h in history if any(k.startswith("acc/") for k in h)]
    curve = [{"step": h["step"], **{k: h[k] for k in ("reward", "acc/avg") if k in h}}
             for h in history]
    last = [h for h in history if "reward" in h][-FIDELITY_STEPS:]  # the diagnostics at the end
    fidelity = mean_dicts([{k: v for k, v in h.items() if k.startswith("fidelity/")}
                           for h in last])
    result = {"arm": name, "seed": run_seed, "accuracy": _acc(evaluated[-1]), "curve": curve,
              "fidelity": fidelity,
              "correct": by_language(trainer.eval_records[steps]), "warm": trainer.eval_records[0]}
    if dist.init()[0] == 0:  # what a rerun of an interrupted experiment takes instead of the run
        with write_atomic(trainer.out / RESULT) as tmp:
            tmp.write_text(json.dumps(result))
    return result


def finished_runs(jobs: list[tuple], log) -> dict[int, dict]:
    """The runs of `jobs` (by index) that an earlier, interrupted call finished: their results,
    each checked against the configuration the run would have now. A run that did not finish is
    moved aside (kept, never reused)."""
    out, done = jobs[0][0], {}
    for i, job in enumerate(jobs):
        run_dir = Path(arm_pairs(*job)["run.out_dir"])
        if not run_dir.exists():
            continue
        if not (run_dir / RESULT).is_file():
            aside = fresh_dir(run_dir.with_name(run_dir.name + ".unfinished"))
            run_dir.rename(aside)
            log(f"{run_dir} did not finish: moved to {aside}; it runs again")
            continue
        now = json.loads(json.dumps(arm_config(*job, log=lambda *a: None).to_dict(), default=str))
        saved = json.loads((run_dir / "config.json").read_text())
        if now != saved:
            differ = sorted(f"{section}.{key}" for section in now for key in now[section]
                            if saved.get(section, {}).get(key) != now[section][key])
            raise FileExistsError(f"--out {out}: {run_dir} holds a finished run of other settings "
                                  f"({', '.join(differ[:3]) or 'its config.json'}); continue "
                                  f"with the options it was started with, or choose another "
                                  f"--out")
        done[i] = json.loads((run_dir / RESULT).read_text())
    if done:
        log(f"continuing {out}: {len(done)} of {len(jobs)} runs finished earlier")
    return done


def in_processes(fn, calls: list[tuple], workers: int, done) -> list:
    """[fn(*args) for args in calls], `workers` at a time in processes of their own with one CPU
    thread and no output (here, in turn, when workers is 1); done(result) as each finishes."""
    if workers == 1:
        return [(result, done(result))[0] for result in (fn(*args) for args in calls)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    if not calls:
        return []
    pool = ProcessPoolExecutor(min(workers, len(calls)), multiprocessing.get_context("spawn"),
                               initializer=_quiet_worker)
    try:
        futures = [pool.submit(fn, *args) for args in calls]
        for future in futures:
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or done(f.result()))
        results = [future.result() for future in futures]
    except (KeyboardInterrupt, BrokenProcessPool) as e:  # Ctrl-C, or a worker was killed
        for child in multiprocessing.active_children():
            child.terminate()  # the workers stop now, not when their runs end
        pool.shutdown(cancel_futures=True)  # its manager reaps them (a second reaper would race)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ChildProcessError("a worker process died (killed, or out of memory) before its "
                                "run finished") from None
    pool.shutdown()
    return results


def _quiet_worker() -> None:
    import os
    import signal
    import sys

    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    sys.stdout = sys.stderr = open(os.devnull, "w")


def write_results(out: Path, summary: dict, log) -> None:
    """results.json, results.md (the two tables) and curves.svg, from run_experiment's summary."""
    warm, seeds = summary["warm start"], len(summary["seeds"])
    means = {"warm start": warm, **{name: {k: sum(a[k] for a in by_seed.values()) / seeds
                                           for k in warm}
                                    for name, by_seed in summary["accuracy"].items()}}
    table = format_table(means)
    gold = summary["gain"][GOLD]["mean"] if GOLD in summary["gain"] else 0.0
    lines = ["| arm | gain in avg (non-en) accuracy, 95% interval | of gold's gain "
             "| over English-only RLVR | English |", "|---|---|---|---|---|"]
    for name, g in summary["gain"].items():
        share = f"{100 * g['mean'] / gold:.0f}%" if gold > 0 else "-"
        over = summary["over English-only"].get(name)
        lines.append(f"| {name} | {interval(g)} | {share} | {interval(over) if over else '-'} "
                     f"| {means[name]['en'] - warm['en']:+.1f} |")
    gain_table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(
        f"Per-language accuracy (%), {summary['steps']} PPO iterations per run, mean over seeds "
        f"{summary['seeds']}; computed with {numerics_line(summary['numerics'])}.\n\n{table}"
        f"\n\nGain over the warm start and over English-only RLVR, "
        f"95% intervals by bootstrap over held-out problems (paired) and each side's seeds."
        f"\n\n{gain_table}\n\nThe responses of the last {FIDELITY_STEPS} iterations to "
        f"target-language prompts, mean over seeds (%):\n\n{fidelity_table(summary['fidelity'])}"
        f"\n")
    curves = summary["curves"]
    mean_curves = {name: mean_rows(runs) for name, runs in curves.items()}
    (out / "curves.svg").write_text(svg_panels(mean_curves, ["reward", "acc/avg"], columns=2,
                                               width=380, bands=curves if seeds > 1 else None))
    log(table)
    log(gain_table)
    log(fidelity_table(summary["fidelity"]))
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curves.svg'} "
        f"({summary['seconds']:.0f}s in all)")


def numerics_line(d: dict[str, str]) -> str:
    return (f"{d['aten']} ATen kernels, MKL_CBWR={d['mkl_cbwr']}, {d['threads']} threads in the "
            f"first run, torch {d['torch']}")


def mean_dicts(rows: list[dict]) -> dict[str, float]:
    """Each key's mean over the rows that have it."""
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def fidelity_table(fidelity: dict[str, dict[str, float]]) -> str:
    """Per arm, the target languages' mean share (%) of responses in the prompt's language, in
    English, copying the pivot's reference and with a final number (rollout.diagnostics)."""
    checks = {"in_language": "in the prompt's language", "english": "in English",
              "copy": "copying the reference", "extracted": "with a final number"}
    lines = ["| arm | " + " | ".join(checks.values()) + " |", "|---|" + "---|" * len(checks)]
    for name, values in fidelity.items():
        cells = []
        for check in checks:
            mine = [v for k, v in values.items() if k.endswith(f"/{check}")
                    and not k.startswith("fidelity/en/")]
            cells.append(f"{100 * sum(mine) / len(mine):.1f}" if mine else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_accuracy(acc: dict[str, float]) -> str:
    return ", ".join(f"{lang} {value:.1f}" for lang, value in acc.items())


def interval(g: dict[str, float]) -> str:
    return f"{g['mean']:+.1f} [{g['low']:+.1f}, {g['high']:+.1f}]"


def by_language(records: list[dict]) -> dict[str, list[bool]]:
    """Eval records -> per language, each problem's correctness in id order."""
    out = {}
    for r in sorted(records, key=lambda r: (r["lang"], int(r["id"].rsplit("-", 1)[-1]))):
        out.setdefault(r["lang"], []).append(bool(r["correct"]))
    return out


def gain_interval(base: list[dict[str, list[bool]]], arm: list[dict[str, list[bool]]],
                  n_boot: int = 4000, seed: int = 0) -> dict[str, float]:
    """How much higher (percentage points) the arm's average target-language accuracy is than the
    base's (the warm start, or another arm), as the mean over each side's seeds and a 95%
    percentile-bootstrap interval: each replicate draws the held-out problems of each language with
    replacement (the same draw for both sides: the comparison is paired) and each side's seeds with
    replacement."""
    import numpy as np
    langs = [lang for lang in base[0] if lang != "en"]
    b, a = ([[s[lang] for lang in langs] for s in side] for side in (base, arm))
    b, a = np.array(b, dtype=float), np.array(a, dtype=float)  # [seeds, languages, problems]
    rng = np.random.default_rng(seed)
    n_langs, n_problems = b.shape[1:]
    draws = []
    for _ in range(n_boot):
        problems = rng.integers(0, n_problems, (n_langs, n_problems))
        means = [np.take_along_axis(x[rng.integers(0, len(x), len(x))],
                                    problems[None].repeat(len(x), 0), axis=2).mean()
                 for x in (a, b)]
        draws.append(100 * (means[0] - means[1]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(100 * (a.mean() - b.mean())), "low": float(low), "high": float(high)}


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
    ap.add_argument("--workers", type=positive_int, default=default_workers(),
                    help="runs at a time, each in its own process on one CPU thread (default: "
                         "the CPUs this process may use, at most 8); 1 runs them here, in turn")
    ap.add_argument("--out",
                    help=f"results directory: empty or absent, or an interrupted experiment's "
                         f"(the same options continue it) (default: {DEFAULT_OUT}, or "
                         f"{DEFAULT_OUT}-2, -3, ... when it holds an earlier experiment)")
    args = ap.parse_args(argv)
    numerics.pin()  # before torch computes anything: the same tables on every x86-64 CPU
    arms = choose_arms(args.arms, args.arm)
    out = Path(args.out) if args.out else fresh_dir(Path(DEFAULT_OUT))
    spec = {"steps": args.steps, "seed": args.seed, "seeds": args.seeds, "arms": arms}
    check_out(out, spec)
    with dist.process_group():
        out = Path(dist.all_gather_objects(str(out))[0])  # rank 0's choice, before any writes
        experiment_jobs(out, arms, args.steps, args.seed, args.seeds, EVAL_EVERY)  # nothing made
        if dist.init()[0] == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / SPEC).write_text(json.dumps(spec, indent=1))
        dist.barrier()
        run_experiment(out, args.steps, args.seed, seeds=args.seeds, arms=arms,
                       workers=args.workers)


def check_out(out: Path, spec: dict) -> None:
    """--out is empty or absent, or holds an interrupted experiment of these very options (which
    this call continues); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; the results are a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "results.md").exists():
        raise FileExistsError(f"--out {out} already holds a finished experiment's results; choose "
                              f"an empty or new directory")
    if not (out / SPEC).is_file():
        raise FileExistsError(f"--out {out} holds files no experiment wrote; choose an empty or "
                              f"new directory")
    earlier, now = json.loads((out / SPEC).read_text()), json.loads(json.dumps(spec))
    if earlier != now:
        differ = [k for k in now if earlier.get(k) != now[k]]
        raise FileExistsError(f"--out {out} holds an interrupted experiment of other options "
                              f"({', '.join(differ)}: {earlier.get(differ[0])!r} there); continue "
                              f"it with its own options, or choose another --out")


def default_workers() -> int:
    import os
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 8))


def choose_arms(names: list[str] | None, custom: list[str]) -> dict[str, dict]:
    """ARMS by name (all when none is named and no arm of one's own is given), then the
    `NAME=key value ...` arms, each checked as a config before anything runs: a name used twice,
    a name that is no directory name, a spec without '=' or a setting the driver owns (OWNED) is
    refused."""
    unknown = [n for n in names or [] if n not in ARMS]
    if unknown:
        raise ValueError(f"--arms: no arm {unknown[0]!r}; the arms are: {'; '.join(ARMS)}")
    chosen = [(n, ARMS[n]) for n in names or ([] if custom else ARMS)]
    for spec in custom:
        name, eq, rest = spec.partition("=")
        words = rest.split()
        if not eq or not name.strip() or len(words) % 2:
            raise ValueError(f"--arm {spec!r}: expected NAME=key value [key value ...]")
        settings = dict(zip(words[::2], words[1::2]))
        owned = [k for k in settings if k in OWNED]
        if owned:
            raise ValueError(f"--arm {spec!r}: {owned[0]} is set for every run by "
                             f"{OWNED[owned[0]]}, not by an arm")
        load_config(None, as_argv(settings))  # a bad key or value fails now
        chosen.append((name.strip(), settings))
    seen = {}
    for name, _ in chosen:
        where = slug(name)
        if where in ("", ".", "..") or any(c in where for c in "/\\") or where.startswith("."):
            raise ValueError(f"arm {name!r}: its directory under --out would be {where!r}; name "
                             f"arms with letters, digits, spaces, '-', '+' or ','")
        if where in seen:
            raise ValueError(f"arms {seen[where]!r} and {name!r} share a name (or its directory "
                             f"{where!r} under --out); give each arm its own")
        seen[where] = name
    return dict(chosen)


if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main)
