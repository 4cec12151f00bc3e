"""The quick variant of the default experiment: a smaller toy world, a short PB-RLSVR run through
the real loop. A regression guard, not a timing: reward rises, target-language accuracy rises,
English does not collapse. Then the experiment driver's bookkeeping, with a stand-in trainer."""
import json
import time
from pathlib import Path

import pytest

from pbrl import kernels
from pbrl import toy
from pbrl.config import Config
from pbrl.evaluate import evaluate
from pbrl.rewards import Sample
from pbrl.prepare import prepare


def test_quick_pb_rlsvr_run_improves_target_languages(tmp_path, monkeypatch):
    # The kernels' own tests run Triton's interpreter; this run uses their PyTorch path, as a CPU
    # run does.
    monkeypatch.setattr(kernels.logprobs, "use_triton", lambda t: False)
    monkeypatch.setattr(kernels.cosine, "use_triton", lambda t: False)
    t0 = time.perf_counter()
    world = toy.build_world(0, root=tmp_path / "toy", n_train=400, n_eval=50, sft_steps=600,
                            width=64, layers=2, log=lambda *a: None)
    monkeypatch.setattr(toy, "build_world", lambda seed, log=None: world)
    cfg = Config()
    # no gold labels: 0.5 embedding + 0.5 agreement with the English pivot
    cfg.reward.kind, cfg.ppo.lr = "hybrid", 3e-4  # the default experiment's learning rate
    cfg.run.steps, cfg.run.eval_every, cfg.run.checkpoint_every = 20, 20, None
    cfg.run.out_dir = str(tmp_path / "run")
    trainer = prepare(toy.use_world(cfg), log=lambda *a: None)
    fixed = trainer.train_problems[::8]  # a fixed set of training prompts, all target languages

    def greedy_reward() -> float:
        """Mean reward of greedy answers on the fixed prompts: the training reward without sampling
        noise."""
        records = evaluate(trainer.actor.model, trainer.tokenizer, fixed, batch_size=64,
                           max_new_tokens=24, progress=False)
        samples = [Sample(p.lang, r["response"], trainer.references[p.id])
                   for p, r in zip(fixed, records)]
        return float(trainer.reward(samples)["reward"].mean())

    before = greedy_reward()
    history = trainer.run()
    after = greedy_reward()
    start, end = history[0], history[-1]
    print(f"quick variant: {time.perf_counter() - t0:.0f}s, target accuracy {start['acc/avg']:.1f} "
          f"-> {end['acc/avg']:.1f}, English {start['acc/en']:.1f} -> {end['acc/en']:.1f}, greedy "
          f"reward {before:.3f} -> {after:.3f}")
    assert after > before
    assert end["acc/avg"] > start["acc/avg"]
    assert end["acc/en"] >= start["acc/en"] - 10
    # no collapse to a deterministic policy
    assert all(0 < h["entropy"] for h in history if "entropy" in h)


def test_a_rerun_never_writes_into_earlier_results(tmp_path):
    import pytest

    from pbrl.experiment import fresh_dir, main
    base = tmp_path / "toy"
    assert fresh_dir(base) == base
    base.mkdir()
    assert fresh_dir(base) == base  # empty: still fresh
    (base / "results.md").write_text("earlier")
    (tmp_path / "toy-2").mkdir()
    (tmp_path / "toy-2" / "results.md").write_text("earlier")
    assert fresh_dir(base) == tmp_path / "toy-3"
    with pytest.raises(FileExistsError, match=r"--out .*toy already holds a finished"):
        main(["--out", str(base)])


def test_gain_interval_is_paired_over_problems_and_seeds():
    from pbrl.experiment import gain_interval
    wrong = {"en": [True] * 40, "de": [False] * 40, "sw": [False] * 40}
    right = [{"en": [True] * 40, "de": [True] * 40, "sw": [True] * 40}] * 3
    # every resample: +100
    assert gain_interval([wrong], right) == {"mean": 100.0, "low": 100.0, "high": 100.0}
    warm = {"en": [True] * 40, "de": [False] * 20 + [True] * 20, "sw": [False] * 40}
    noisy = [{"en": [True] * 40, "de": [i % k == 0 for i in range(40)],
              "sw": [i % k == 1 for i in range(40)]} for k in (2, 3, 4)]
    g = gain_interval([warm], noisy)
    exact = 100 * (sum(sum(s["de"]) + sum(s["sw"]) for s in noisy) / (3 * 80) - 20 / 80)
    assert (g["mean"] == pytest.approx(exact) and g["low"] < exact < g["high"]
            and g["high"] - g["low"] < 40)
    # one arm against another: both sides' seeds are resampled, the problems paired
    same = gain_interval(noisy, noisy[::-1])
    assert same["mean"] == pytest.approx(0) and same["low"] < 0 < same["high"]
    base = [{lang: [i % 3 == j for i in range(40)] for lang in ("en", "de", "sw")}
            for j in range(3)]  # seeds alike in accuracy, not in which problems they solve
    better = [{lang: [x or i % 5 == 4 for i, x in enumerate(s[lang])] for lang in s} for s in base]
    exact = 100 * sum(sum(b[lang]) - sum(s[lang]) for b, s in zip(better, base)
                      for lang in ("de", "sw")) / (3 * 80)
    g = gain_interval(base, better)
    assert g["mean"] == pytest.approx(exact) and 0 < g["low"] < exact < g["high"]


def test_seeds_give_mean_rows_and_a_shaded_range():
    import xml.etree.ElementTree as ET

    from pbrl.experiment import mean_rows
    from pbrl.plot import svg_panels
    seeds = [[{"step": s, "reward": 0.1 * s + d} for s in range(4)] for d in (0.0, 0.2, 0.4)]
    mean = mean_rows(seeds)
    assert [round(r["reward"], 6) for r in mean] == [0.2, 0.3, 0.4, 0.5]
    svg = ET.fromstring(svg_panels({"arm": mean}, ["reward"], bands={"arm": seeds}))
    [band] = svg.iter("{http://www.w3.org/2000/svg}polygon")
    assert len(band.get("points").split()) == 8  # the top edge forward, the bottom edge back


def test_run_experiment_over_seeds_writes_every_seed_and_the_intervals(tmp_path, monkeypatch):
    """The experiment's bookkeeping with a stand-in trainer (the real loop is the quick test's):
    each arm runs once per seed in its own directory with its own run.seed, results.json keeps every
    seed, results.md the intervals, curves.svg a band per arm and panel."""
    import json
    import xml.etree.ElementTree as ET

    import pbrl.experiment as experiment
    runs, given, worlds = stand_in(monkeypatch)
    summary = experiment.run_experiment(tmp_path, steps=4, seed=0, seeds=3, log=lambda *a: None)
    assert len(runs) == 3 * len(experiment.ARMS) and {seed for _, seed, _ in runs} == {0, 1, 2}
    # every run from the same world and warm start: only the RL seed varies
    assert set(worlds) == {0}
    assert given == [False] + [True] * (len(runs) - 1)  # the warm start is evaluated once
    assert (len({out for out, _, _ in runs}) == len(runs)
            and runs[1][0].endswith("ppo-gold-exact-match/seed-1"))
    saved = json.loads((tmp_path / "results.json").read_text())
    arm = "PB-RLSVR hybrid"
    assert saved["accuracy"][arm] == {"0": {"avg": 50.0, "de": 50.0, "sw": 50.0, "en": 50.0},
                                      "1": {"avg": 60.0, "de": 60.0, "sw": 60.0, "en": 60.0},
                                      "2": {"avg": 70.0, "de": 70.0, "sw": 70.0, "en": 70.0}}
    # 60 - 30
    assert saved["warm start"]["avg"] == 30.0 and saved["gain"][arm]["mean"] == pytest.approx(30.0)
    assert (saved["gain"][arm]["low"] < 30.0 < saved["gain"][arm]["high"]
            and summary["seeds"] == [0, 1, 2])
    # every arm alike: +30 over the warm start, +0 over English-only RL
    assert f"| {arm} | +30.0 [+" in (tmp_path / "results.md").read_text()
    # the last iterations' diagnostics, mean over seeds 0.5, 0.6, 0.7; a check no step logged: -
    assert f"| {arm} | 60.0 | - | 0.0 | - |" in (tmp_path / "results.md").read_text()
    assert saved["over English-only"][arm]["mean"] == 0 and experiment.ENGLISH not in \
        saved["over English-only"]
    svg = ET.parse(tmp_path / "curves.svg").getroot()
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}polygon"))) == 2 * len(experiment.ARMS)


def test_runs_go_to_worker_processes_or_stay_here():
    import os

    from pbrl.experiment import in_processes
    finished = []
    pids = in_processes(os.getpid, [()] * 3, workers=2, done=finished.append)
    assert len(pids) == 3 and os.getpid() not in pids and sorted(finished) == sorted(pids)
    assert in_processes(os.getpid, [()] * 2, workers=1, done=finished.append) == [os.getpid()] * 2


def stand_in(monkeypatch) -> tuple[list, list, list]:
    """Replaces the experiment's trainer by a stand-in whose numbers follow from its run.seed, and
    its world by the config as given; returns the lists it fills: each run's (out_dir, seed,
    reward), whether each was handed the warm start's eval, each world's seed."""
    import pbrl.experiment as experiment
    runs, given, worlds = [], [], []

    class StandIn:  # what prepare returns: a Trainer
        def __init__(self, cfg, log=None):
            self.cfg, self.out = cfg, Path(cfg.run.out_dir)
            self.out.mkdir(parents=True)  # a real run claims its directory: a second is refused
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict()))
            self.eval_records = {}
            runs.append((cfg.run.out_dir, cfg.run.seed, cfg.reward.kind))

        def run(self):
            # the warm start's eval, handed over by the experiment
            given.append(0 in self.eval_records)
            s = self.cfg.run.seed

            def right(k):  # eval records: the first k of 10 problems right in every language
                return [{"id": f"mgsm-{i}", "lang": lang, "correct": i < k}
                        for lang in ("en", "de", "sw") for i in range(10)]
            self.eval_records = {0: right(3), 4: right(5 + s)}
            last = {k: 50.0 + 10 * s for k in ("acc/avg", "acc/de", "acc/sw", "acc/en")}
            first = {k: 30.0 for k in last}
            fidelity = {"fidelity/de/in_language": 0.5 + 0.1 * s, "fidelity/de/copy": 0.0}
            return [{"step": 0, **first}] + \
                [{"step": t, "reward": 0.1 * t + s, **fidelity} for t in range(1, 4)] + \
                [{"step": 4, "reward": 0.4 + s, **last, **fidelity}]
    monkeypatch.setattr(experiment, "prepare", StandIn)
    monkeypatch.setattr(experiment, "use_world",
                        lambda cfg, log=None: worlds.append(cfg.run.seed) or cfg)
    return runs, given, worlds


@pytest.mark.parametrize("argv, says", [
    (["--arm", "hybrid, mine"], "expected NAME=key value"),
    (["--arm", "mine=reward.kind"], "expected NAME=key value"),
    (["--arms", "PB-RLSVR MT", "--arms", "PB-RLSVR MT"], "share a name"),
    (["--arm", "A B=reward.kind mt", "--arm", "a-b=reward.kind embedding"], "share a name"),
    (["--arm", "../../elsewhere=reward.kind mt"], "its directory under --out would be"),
    (["--arm", ".hidden=reward.kind mt"], "its directory under --out would be"),
    (["--arm", "mine=run.steps 5"], "run.steps is set for every run by --steps"),
    (["--arm", "mine=run.out_dir /tmp/elsewhere"], "run.out_dir is set for every run by --out"),
    (["--arm", "mine=run.seed 3"], "run.seed is set for every run by --seed"),
    (["--arm", "mine=data.pivot_cache p.jsonl"], "data.pivot_cache is set for every run"),
    (["--arm", "mine=run.eval_samples 4"], "run.eval_samples is set for every run by the driver"),
    (["--arm", "mine=reward.kind nonsense"], "reward.kind"),
])
def test_arms_that_cannot_run_as_written_are_refused_before_anything(tmp_path, capsys, argv,
                                                                       says):
    """A duplicate or escaping name, a spec without '=', a setting the driver owns: one line, exit
    2, no directory made (the driver used to replace such settings silently)."""
    from conftest import run_here
    from pbrl.experiment import main
    code, _, err = run_here(main, [*argv, "--out", tmp_path / "out"], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_every_arm_is_checked_before_the_first_run_trains(tmp_path, monkeypatch):
    """A value that only the run's checks refuse, in the last arm, fails before the first arm
    trains (it used to surface after the first arm's minutes)."""
    import pbrl.experiment as experiment
    runs, _, _ = stand_in(monkeypatch)
    arms = {"fine": {"reward.kind": "hybrid"},
            "grouped with one sample": {"ppo.advantage": "grpo",
                                        "rollout.samples_per_prompt": "1"}}
    with pytest.raises(ValueError, match="samples_per_prompt"):
        experiment.run_experiment(tmp_path, steps=4, seeds=1, arms=arms, log=lambda *a: None)
    assert runs == []


def test_an_interrupted_experiment_continues_from_its_finished_runs(tmp_path, monkeypatch):
    """Rerun on the same --out, an experiment runs only what did not finish (an unfinished run's
    directory is moved aside, not reused or deleted) and writes the same results; a finished run
    whose configuration differs from what it would be now is refused, naming the setting."""
    import pbrl.experiment as experiment
    runs, _, _ = stand_in(monkeypatch)
    arms = {"gold": experiment.ARMS[experiment.GOLD], "hybrid": {"reward.kind": "hybrid"}}

    def experiment_run():
        return experiment.run_experiment(tmp_path, steps=4, seeds=2, arms=arms,
                                         log=lambda *a: None)
    whole = experiment_run()
    assert len(runs) == 4
    for name in ("results.md", "results.json", "curves.svg"):  # as if stopped before the end
        (tmp_path / name).unlink()
    (tmp_path / "hybrid" / "seed-1" / experiment.RESULT).unlink()  # stopped during this run
    runs.clear()
    again = experiment_run()
    assert [(Path(out).parent.name, Path(out).name) for out, _, _ in runs] == \
        [("hybrid", "seed-1")]
    assert (tmp_path / "hybrid" / "seed-1.unfinished" / "config.json").is_file()
    assert again["accuracy"] == whole["accuracy"]
    assert again["gain"] == whole["gain"]
    # a finished run made with other settings is not taken for this experiment's
    (tmp_path / "results.md").unlink()
    saved = tmp_path / "gold" / "seed-0" / "config.json"
    config = json.loads(saved.read_text())
    config["ppo"]["lr"] = 1e-3
    saved.write_text(json.dumps(config))
    with pytest.raises(FileExistsError, match=r"holds a finished run of other settings \(ppo.lr\)"):
        experiment_run()


def test_out_continues_only_an_interrupted_experiment_of_the_same_options(tmp_path):
    from pbrl.experiment import SPEC, check_out
    spec = {"steps": 60, "seed": 0, "seeds": 3, "arms": {"gold": {"reward.kind": "exact_match"}}}
    check_out(tmp_path / "absent", spec)
    (tmp_path / SPEC).write_text(json.dumps(spec))
    check_out(tmp_path, spec)  # the same options: continued
    with pytest.raises(FileExistsError, match=r"other options \(steps: 60 there\)"):
        check_out(tmp_path, {**spec, "steps": 10})
    (tmp_path / SPEC).unlink()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files no experiment wrote"):
        check_out(tmp_path, spec)


def _die_or_wait(folder: str, i: int) -> int:
    """A worker's job: the first kills its own process, the others would take a minute."""
    import os
    import signal
    Path(folder, str(i)).write_text(str(os.getpid()))
    if i == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    return i


def test_a_killed_worker_stops_the_others_at_once(tmp_path):
    import os

    from pbrl.experiment import in_processes
    start = time.monotonic()
    with pytest.raises(ChildProcessError, match="a worker process died"):
        in_processes(_die_or_wait, [(str(tmp_path), i) for i in range(3)], workers=2,
                     done=lambda r: None)
    assert time.monotonic() - start < 45
    for worker in tmp_path.iterdir():  # every worker that started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(int(worker.read_text()), 0)


def test_ctrl_c_stops_the_workers_at_once(tmp_path):
    """SIGINT to the experiment's process (the terminal's Ctrl-C reaches the workers too, which
    leave it to their parent): exit 130 with one line, within seconds, no worker left behind."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env
    (tmp_path / "slow.py").write_text(
        "import os\nimport time\nfrom pathlib import Path\n\n\ndef work(folder, i):\n"
        "    Path(folder, str(i)).write_text(str(os.getpid()))\n    time.sleep(60)\n")
    code = ("import slow; from pbrl.cli import run_main\n"
            "from pbrl.experiment import in_processes\n"
            f"run_main(lambda argv: in_processes(slow.work, [({str(tmp_path)!r}, 0), "
            f"({str(tmp_path)!r}, 1)], 2, print))")
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}:{tmp_path}"}
    # as a terminal starts it: SIGINT at its default (a shell without job control starts its
    # background commands with SIGINT ignored, which Python then leaves ignored)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):  # both workers run
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "error: interrupted (Ctrl-C)", err
    assert time.monotonic() - start < 20
    for worker in ("0", "1"):  # each worker process is gone, not orphaned and still sleeping
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / worker).read_text()), 0)
