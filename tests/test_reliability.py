"""A careless user's cases (issue 25): nothing trains on the wrong data, nothing overwrites what
pbrl does not own, no rank waits forever, and every error says what to do."""
import errno
import fcntl
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (metrics, no_model_loads, overrides, run_here, stalled_run,
                      subprocess_env)
from pbrl.config import load_config, parse_command_line, validate
from pbrl.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def run(*args, expect=0, env=None):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env or subprocess_env(), timeout=300)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


# ------------------------------------------------------------------------- 1. wrong training data
def test_a_language_file_with_a_row_missing_is_refused_before_any_model_loads(world, tmp_path,
                                                                              monkeypatch):
    data = shutil.copytree(world / "data", tmp_path / "data")
    lines = (data / "mgsm_de.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "mgsm_de.tsv").write_text("".join(lines[:3] + lines[4:]), encoding="utf-8")
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"row 5 of mgsm_de answers 6 but row 5 of mgsm_en "
                                         r"answers 5: the files do not line up"):
        prepare(load_config(None, overrides(world, tmp_path / "x", **{"data.path": data})))
    (data / "mgsm_de.tsv").write_text("".join(lines + lines[-1:]), encoding="utf-8")  # one extra
    with pytest.raises(ValueError, match="mgsm_de has 9 problems and mgsm_en 8"):
        prepare(load_config(None, overrides(world, tmp_path / "y", **{"data.path": data})))


@pytest.mark.parametrize("key,value", [("ppo.kl_beta", "inf"), ("ppo.weight_decay", "inf"),
                                       ("rollout.top_p", "nan"), ("ppo.critic_lr", "-inf")])
def test_every_number_must_be_finite(key, value):
    with pytest.raises(ValueError, match=f"{key} must be a finite number, got {value}"):
        validate(load_config(None, [f"--{key}", value]), world_size=1)


@pytest.mark.parametrize("args,message", [
    (["--run.out_dir", ""], "run.out_dir must name a directory, got an empty string"),
    (["--run.seed", str(2**40)], r"run.seed must be >= 0 and <= 2147483647, got 1099511627776"),
    (["--ppo.kl_horizon", "0"], "ppo.kl_horizon must be > 0, got 0"),
    (["--data.eval_langs", "en,en"], "data.eval_langs must list at least one value, each once"),
])
def test_settings_that_mean_nothing_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, args), world_size=1)


def test_a_non_finite_gradient_stops_the_run_keeping_the_last_checkpoint(world, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "run"
    trainer = prepare(load_config(None, overrides(world, out, **{
        "run.steps": 4, "run.checkpoint_every": 1})), log=lambda *a: None)
    trainer.run(2)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    real = trainer.reward

    def poisoned(samples):
        out = real(samples)
        out["reward"][0] = math.nan
        return out
    trainer.reward = poisoned
    with pytest.raises(FloatingPointError, match=r"step 3: the actor_loss's gradient norm is nan"):
        trainer.run()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # step 2 is kept
    assert not (out / "final").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2]  # strict JSON, no step 3


def test_metrics_that_are_not_finite_are_written_as_null(tmp_path):
    from pbrl.loggers import Loggers
    logs = Loggers(tmp_path, ["jsonl"], "x", {})
    logs.log({"step": 1, "reward": math.nan, "kl": math.inf, "entropy": 1.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "reward": None,
                                                                    "kl": None, "entropy": 1.5}


def test_a_pivot_cache_begun_by_one_pivot_is_not_completed_by_another(tmp_path):
    from conftest import save_hf_model
    from pbrl import pivot
    from pbrl.data import Problem
    save_hf_model(tmp_path / "a", "llama", seed=1)
    save_hf_model(tmp_path / "b", "llama", seed=2, intermediate_size=128)
    problems = [Problem(f"mgsm-{i}", "en", f"Q{i}?", str(i)) for i in range(3)]
    ours = pivot.pivot_writer(tmp_path / "a", 8, False)
    cache = tmp_path / "refs.jsonl"
    record = {"id": "mgsm-0", "question": "Q0?", "reference": "0", "pivot": ours}
    cache.write_text(json.dumps(record) + "\n")
    for theirs in (pivot.pivot_writer(tmp_path / "b", 8, False),   # another model
                   pivot.pivot_writer(tmp_path / "a", 16, False)):  # another max_new_tokens
        with pytest.raises(ValueError, match="was begun by .* and would be completed by"):
            pivot.write_references(None, None, problems, cache, theirs, log=lambda m: None)
    (tmp_path / "mgsm_en.tsv").write_text("Q0?\t0\nQ1?\t1\nQ2?\t2\n")
    with pytest.raises(ValueError, match="was begun by"):  # the command line too, before loading
        pivot.main(["--model", str(tmp_path / "b"), "--data", str(tmp_path), "--out", str(cache),
                    "--max-new-tokens", "8"])


def test_a_complete_pivot_cache_is_checked_against_the_pivot_every_time(world, tmp_path):
    """A complete cache written by one pivot is refused when the run names another, though nothing
    is missing; the same model copied elsewhere is the same pivot, and a run's other rollout
    length (the experiment's arms share one cache) does not matter once the cache is complete; a
    cache written by hand (no writer recorded) is used as given."""
    from conftest import save_hf_model
    from pbrl import pivot
    stronger = tmp_path / "stronger"
    save_hf_model(stronger, "qwen2", seed=9, tie_word_embeddings=True, max_position_embeddings=256)
    cache = tmp_path / "refs.jsonl"
    writer = pivot.pivot_writer(world / "policy", 6, False)
    cache.write_text("".join(json.dumps({**r, "pivot": writer}) + "\n" for r in
                             map(json.loads, (world / "pivot.jsonl").read_text().splitlines())))
    complete = {"data.pivot_cache": cache, "run.steps": 1}
    with pytest.raises(ValueError, match="was written by .* and would be used by"):
        prepare(load_config(None, overrides(world, tmp_path / "stronger-run", **{
            **complete, "models.pivot": stronger})), log=lambda *a: None)
    prepare(load_config(None, overrides(world, tmp_path / "longer", **{
        **complete, "rollout.max_new_tokens": 7})), log=lambda *a: None)
    elsewhere = shutil.copytree(world / "policy", tmp_path / "copy")  # the same model
    prepare(load_config(None, overrides(world, tmp_path / "same", **{
        **complete, "models.pivot": elsewhere})), log=lambda *a: None)
    cache.write_text((world / "pivot.jsonl").read_text())  # by hand: no writer recorded
    prepare(load_config(None, overrides(world, tmp_path / "hand", **{
        **complete, "models.pivot": stronger})), log=lambda *a: None)


# ------------------------------------------------------------------- 2. files pbrl does not own
def test_resume_takes_over_only_a_directory_a_pbrl_run_made(world, tmp_path, monkeypatch):
    from conftest import save_hf_model
    model = tmp_path / "model"
    save_hf_model(model, "llama")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    no_model_loads(monkeypatch)
    with pytest.raises(FileExistsError, match=r"holds files no pbrl run made \(.*config.json.*\): "
                                              r"--run.resume continues a pbrl run's directory"):
        prepare(load_config(None, overrides(world, model, **{"run.resume": "true"})))
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_an_out_dir_that_cannot_be_a_directory_is_a_clear_error(world, tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    no_model_loads(monkeypatch)
    with pytest.raises(FileExistsError, match=r"file.txt/run cannot be made this run's directory"):
        prepare(load_config(None, overrides(world, tmp_path / "file.txt" / "run")))


def test_export_refuses_a_directory_it_did_not_write_and_replaces_its_own_only_when_asked(
        world, tmp_path):
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out)), log=lambda *a: None).run()
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    before = {p.name: p.read_bytes() for p in (world / "policy").iterdir()}

    def export(target, *flags):  # the command in-process (tests/test_checkpoint runs it as one)
        from pbrl.checkpoint import main
        main(["export", str(ckpt), str(target), *flags])
    with pytest.raises(FileExistsError, match="already holds files pbrl did not export"):
        export(world / "policy")
    assert {p.name: p.read_bytes() for p in (world / "policy").iterdir()} == before
    export(tmp_path / "hf")
    first = (tmp_path / "hf" / "model.safetensors.index.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="holds an earlier export; --overwrite replaces it"):
        export(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").stat().st_mtime_ns == first
    export(tmp_path / "hf", "--overwrite")
    assert (tmp_path / "hf" / "model.safetensors.index.json").stat().st_mtime_ns != first


def test_eval_checks_its_out_before_evaluating_and_never_replaces_results(world, tmp_path,
                                                                          monkeypatch):
    import eval as eval_cli
    evaluated = []
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: evaluated.append(a) or [])
    args = ["--model", str(world / "policy"), "--data", str(world / "data"), "--langs", "en,de"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="--out .*file is a file"):
        eval_cli.main([*args, "--out", str(tmp_path / "file")])
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "scores.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds results \(scores.json\)"):
        eval_cli.main([*args, "--out", str(tmp_path / "earlier")])
    assert evaluated == [] and (tmp_path / "earlier" / "scores.json").read_text() == "{}"


def test_a_pivot_cache_being_written_refuses_a_second_writer(tmp_path):
    from pbrl import pivot
    cache = tmp_path / "refs.jsonl"
    with open(tmp_path / "refs.jsonl.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a first run, writing
        with pytest.raises(FileExistsError, match="is being written by another run"):
            pivot.write_references(None, None, [], cache, {}, log=lambda m: None)


def test_a_run_interrupted_while_its_pivot_wrote_continues_it(world, tmp_path):
    from pbrl.data import load_mgsm
    from pbrl.pivot import pivot_writer, read_references
    out = tmp_path / "run"
    writer = pivot_writer(world / "policy", 6, False)
    records = [json.loads(line) for line in (world / "pivot.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({**r, "pivot": writer}) + "\n"
                                                 for r in records))
    trainer = prepare(load_config(None, overrides(world, out, **{
        "data.pivot_cache": tmp_path / "refs.jsonl"})), log=lambda *a: None)
    english = load_mgsm(world / "data", ["en"])["en"]
    cached = read_references(tmp_path / "refs.jsonl")
    assert set(cached) == {p.id for p in english} and len(trainer.references) == len(english)
    assert [cached[r["id"]]["reference"] for r in records] == [r["reference"] for r in records]


# --------------------------------------------------------------------------- 3. waiting forever
def test_a_stalled_rank_makes_its_peer_exit_with_a_clear_message_within_the_timeout(world,
                                                                                    tmp_path):
    """Rank 1 stalls before its first iteration; rank 0 waits in a collective for
    run.timeout_minutes (3 s here), then exits with one line that says so. torchrun's own
    process group default (30 minutes on gloo) must not apply."""
    done = stalled_run(tmp_path, "import os, time\n"
                                 "import pbrl.trainer\n"
                                 "real = pbrl.trainer.Trainer.train_step\n"
                                 "def stalled(self):\n"
                                 "    if os.environ['RANK'] == '1':\n"
                                 "        time.sleep(120)\n"
                                 "    return real(self)\n"
                                 "pbrl.trainer.Trainer.train_step = stalled\n",
                       overrides(world, tmp_path / "run"))
    assert done.returncode != 0
    assert "error: rank 0 waited longer than the process group's timeout (0.05 minutes, " \
           "run.timeout_minutes) in a collective" in done.stderr, done.stderr[-2000:]


# ----------------------------------------------------------- 4. errors a user can act on
def test_a_torn_last_line_of_metrics_does_not_stop_a_resume(world, tmp_path):
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out, **{"run.steps": 3, "run.checkpoint_every": 1})),
            log=lambda *a: None).run(2)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "rew')  # a crash, or a full disk, mid-write
    resumed = prepare(load_config(None, overrides(world, out, **{
        "run.steps": 3, "run.checkpoint_every": 1, "run.resume": "true"})), log=lambda *a: None)
    resumed.run()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_resuming_with_other_models_says_so_and_not_that_the_checkpoint_is_damaged(world, tmp_path):
    from conftest import save_hf_model
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out)), log=lambda *a: None).run()
    bigger = tmp_path / "bigger"
    save_hf_model(bigger, "qwen2", seed=4, tie_word_embeddings=True, max_position_embeddings=256,
                  intermediate_size=128)
    with pytest.raises(ValueError, match=r"holds another actor than this run's: its "
                                         r"layers.0.mlp.gate_proj.weight has shape \[96, 64\], "
                                         r"this run's \[128, 64\]"):
        prepare(load_config(None, overrides(world, out, **{"models.policy": bigger,
                                                           "run.resume": "true"})))


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:20]),
     r"\.metadata cannot be read \(.*\); the checkpoint is damaged"),
    (lambda d: (d / "trainer.pt").write_bytes(b""), r"trainer.pt: cannot be read"),
])
def test_a_damaged_checkpoint_file_is_named(world, tmp_path, damage, message):
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out)), log=lambda *a: None).run()
    damage(sorted((out / "checkpoints").iterdir())[-1])
    with pytest.raises(ValueError, match=message):
        prepare(load_config(None, overrides(world, out, **{"run.resume": "true"})))


def test_a_step_whose_loss_holds_no_token_stops_the_run_and_says_why(world, tmp_path):
    """rollout.overlong filter when every response reaches max_new_tokens leaves no token in the
    loss: the run stops at that step naming the settings, rather than exporting an untrained policy
    after logging a null loss."""
    out = tmp_path / "run"
    trainer = prepare(load_config(None, overrides(world, out, **{
        "rollout.overlong": "filter", "rollout.max_new_tokens": 1})), log=lambda *a: None)
    with pytest.raises(ValueError, match=r"step 1: no response token takes part in the loss.*"
                                         r"rollout.max_new_tokens=1 under rollout.overlong=filter"):
        trainer.run()
    logged = out / "metrics.jsonl"
    assert not (out / "final").exists() and (not logged.exists() or not logged.read_text())


def test_a_resume_keeps_a_fixed_kl_beta_as_configured_and_the_controllers_as_it_reached(world,
                                                                                          tmp_path):
    """A fixed ppo.kl_beta is a setting: the resumed run's value holds (0.1 -> 0 stays 0, said in
    a line). The adaptive controller's coefficient is state: the checkpoint's is restored."""
    out, adaptive = tmp_path / "run", tmp_path / "adaptive"
    prepare(load_config(None, overrides(world, out, **{"run.checkpoint_every": 1})),
            log=lambda *a: None).run()
    logged = []
    resumed = prepare(load_config(None, overrides(world, out, **{
        "run.resume": "true", "run.steps": 3, "ppo.kl_beta": 0})), log=logged.append)
    assert resumed.kl.beta == 0 and resumed.step == 2
    assert any("ppo.kl_beta = 0.0 as configured (the checkpoint's run had 0.1)" in line
               for line in logged)
    extra = {"run.checkpoint_every": 1, "ppo.kl_target": 0.001, "ppo.kl_horizon": 10}
    reached = prepare(load_config(None, overrides(world, adaptive, **extra)),
                      log=lambda *a: None).run()[-1]["kl_beta"]
    again = prepare(load_config(None, overrides(world, adaptive, **{
        **extra, "run.resume": "true", "run.steps": 3})), log=lambda *a: None)
    assert reached != 0.1 and again.kl.beta == reached


@pytest.mark.parametrize("kind,line,message", [
    ("mgsm", {"question": None, "answer_number": 3}, r"mgsm_de.jsonl:2: field 'question' is null; "
                                                     r"expected a string"),
    ("mgsm", {"question": 7, "answer_number": 3}, r"mgsm_de.jsonl:2: field 'question' is 7"),
    ("mgsm", {"question": "Wie viel?", "answer_number": None}, r"'answer_number' is null; "
                                                              r"expected a number or a string"),
    ("pivot", {"id": "mgsm-1", "question": "q", "reference": None}, r"refs.jsonl:2: field "
                                                                    r"'reference' is null"),
    ("pivot", {"id": "mgsm-1", "question": "q", "reference": 42}, r"'reference' is 42; expected "
                                                                  r"a string"),
    ("gsm8k", {"question": "q", "answer": None}, r"test.jsonl:2: field 'answer' is null"),
])
def test_fields_present_but_null_or_of_another_type_are_refused_with_file_and_line(
        tmp_path, kind, line, message):
    from pbrl.data import load_gsm8k, load_mgsm
    from pbrl.pivot import read_references
    good = {"mgsm": {"question": "Wie viel ist 2 + 2?", "answer_number": 4},
            "pivot": {"id": "mgsm-0", "question": "q", "reference": "4"},
            "gsm8k": {"question": "q", "answer": "2 + 2 = 4\n#### 4"}}[kind]
    name = {"mgsm": "mgsm_de.jsonl", "pivot": "refs.jsonl", "gsm8k": "test.jsonl"}[kind]
    (tmp_path / name).write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    read = {"mgsm": lambda: load_mgsm(tmp_path, ["de"]),
            "pivot": lambda: read_references(tmp_path / name),
            "gsm8k": lambda: load_gsm8k(tmp_path)}[kind]
    with pytest.raises(ValueError, match=message):
        read()


class RunsAShellCommand:
    """What a crafted .metadata holds: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_whose_metadata_would_run_code_is_refused_unread(world, tmp_path, capsys):
    """A .metadata crafted to run a shell command when unpickled: export and resume refuse it with
    one line and the command never runs (torch's own reader, a plain pickle.load, would run it)."""
    import pickle

    from pbrl.checkpoint import main as checkpoint_main
    out, marker = tmp_path / "run", tmp_path / "ran"
    prepare(load_config(None, overrides(world, out)), log=lambda *a: None).run()
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsAShellCommand(f"touch {marker}")))
    code, _, err = run_here(checkpoint_main, ["export", ckpt, tmp_path / "hf"], capsys)
    assert code == 2 and err.count("\n") == 1 and not marker.exists()
    assert "is not DCP metadata: it names posix.system, which DCP metadata never holds" in err
    with pytest.raises(ValueError, match="refused unread"):
        prepare(load_config(None, overrides(world, out, **{"run.resume": "true"})))
    assert not marker.exists()


def test_a_full_disk_while_checkpointing_is_named_and_keeps_the_earlier_checkpoint(world, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    trainer = prepare(load_config(None, overrides(world, out, **{
        "run.steps": 3, "run.checkpoint_every": 1})), log=lambda *a: None)
    trainer.run(1)
    real = torch.save

    def full(obj, path, *a, **k):
        if "step_000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"no space left on the device holding .*checkpoints while "
                                      r"writing .*step_000002.tmp") as raised:
        trainer.run(1)
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]


def test_a_path_that_could_be_local_says_it_is_not_here(tmp_path, monkeypatch):
    from pbrl.files import resolve
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'data/gsm8k_train': no such local file or "
                                                r"directory \(looked in .*\), and fetching it as "
                                                r"a hub id failed"):
        resolve("data/gsm8k_train", repo_type="dataset")


def test_config_files_with_a_bom_and_overrides_with_an_equals_sign(tmp_path):
    file = tmp_path / "c.toml"
    file.write_bytes("\ufeff[ppo]\nlr = 3e-5\n".encode("utf-8"))
    path, args = parse_command_line([f"--config={file}", "--ppo.epochs=3", "--run.steps", "7"])
    cfg = load_config(path, args)
    assert (cfg.ppo.lr, cfg.ppo.epochs, cfg.run.steps) == (3e-5, 3, 7)
    with pytest.raises(ValueError, match="--config comes first"):
        parse_command_line(["--ppo.lr", "1", "--config", str(file)])


@pytest.mark.parametrize("module,argv,message", [
    ("pbrl.memory", ["--gpus", "-1"], "--gpus: expected a positive integer, got -1"),
    ("pbrl.chat", ["--temperature", "inf"],
     "--temperature: expected a finite number >= 0, got inf"),
    ("pbrl.chat", ["--top-p", "0"], "--top-p: expected a number in (0, 1], got 0.0"),
])
def test_command_line_numbers_are_checked(module, argv, message, capsys):
    """argparse refuses the number before the command does anything (tests/test_entrypoints.py
    runs each command in a fresh process)."""
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("langs", ["de,de", "", ","])
def test_language_lists_name_each_language_once(langs, capsys):
    import eval as eval_cli
    from pbrl.translate_data import main as translate
    for main in (eval_cli.main, translate):
        with pytest.raises(SystemExit) as stop:
            main(["--model", "m", "--source", "s", "--out", "o", "--langs", langs])
        assert stop.value.code == 2
        assert ("--langs: expected comma-separated language codes, at least one, each once; got "
                f"{langs!r}") in capsys.readouterr().err


def test_plot_refuses_a_metric_no_run_has(tmp_path):
    from pbrl.plot import main
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    with pytest.raises(ValueError, match="--metrics: no run logged 'rewrad'; they logged: reward"):
        main([str(tmp_path / "run"), "--out", str(tmp_path / "x.svg"), "--metrics", "rewrad"])


def test_empty_data_files_are_refused(tmp_path):
    from pbrl.data import load_mgsm
    (tmp_path / "mgsm_en.tsv").write_text("")
    with pytest.raises(ValueError, match=r"mgsm_en.tsv: no problems \(an empty file\)"):
        load_mgsm(tmp_path, ["en"])
    (tmp_path / "mgsm_en.tsv").unlink()
    (tmp_path / "mgsm_en.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"mgsm_en.jsonl: no problems \(an empty file\)"):
        load_mgsm(tmp_path, ["en"])


def test_a_chat_template_that_fails_on_its_own_names_its_file():
    from conftest import build_tokenizer
    from pbrl.tokenizer import Tokenizer
    tok = Tokenizer(build_tokenizer(), {"chat_template": "{{ 1 / 0 }}"},
                    source="chat template of /x/tokenizer_config.json")
    with pytest.raises(ValueError, match=r"/x/tokenizer_config.json: ZeroDivisionError"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------- 7. the probe's odd inputs
@pytest.mark.parametrize("content, says", [
    ("", "no step logged (the file is empty)"),
    ('{"reward": 0.1}\n{"step": 2, "reward": 0.2}\n', ':1: expected a JSON object with a '
                                                       'whole-number "step"'),
    ('{"step": 1, "reward": 0.1}\n{"step": "2", "reward": 0.2}\n', ":2: expected a JSON object"),
    ('[1, 2]\n', ":1: expected a JSON object"),
])
def test_plot_refuses_metrics_it_cannot_place_with_file_and_line(tmp_path, capsys, content, says):
    from pbrl.plot import main
    (tmp_path / "metrics.jsonl").write_text(content)
    code, _, err = run_here(main, [tmp_path, "--out", tmp_path / "p.svg"], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.svg").exists()


def test_plot_leaves_out_nan_points_and_says_which(tmp_path, capsys):
    from pbrl.plot import main
    rows = [{"step": 1, "reward": float("nan")}, {"step": 2, "reward": 0.5},
            {"step": 3, "reward": float("inf")}, {"step": 4, "reward": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_here(main, [tmp_path, "--out", tmp_path / "p.svg",
                                     "--metrics", "reward"], capsys)
    assert code == 0 and "reward is NaN or infinite at steps 1, 3" in err
    import re
    coordinates = re.findall(r' (?:points|d|x\d?|y\d?)="([^"]*)"', (tmp_path / "p.svg").read_text())
    assert coordinates and not any("nan" in c.lower() or "inf" in c for c in coordinates)


def test_an_old_subcommand_of_pbrl_data_fails_and_says_where_it_went():
    done = run("-m", "pbrl.data", "translate", expect=2)
    assert "python -m pbrl.translate_data" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from pbrl.chat import build_random_model
    return build_random_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.mark.parametrize("file, key, value, says", [
    ("generation_config.json", "eos_token_id", "2", "generation_config.json: eos_token_id must "
                                                    "be a token id or a list of token ids"),
    ("config.json", "eos_token_id", [2, "3"], "config.json: eos_token_id must be a token id"),
    ("tokenizer_config.json", "chat_template", "", "the chat template is ''"),
    ("tokenizer_config.json", "chat_template", [{"name": "tool_use", "template": "{{ x }}"}],
     "needs one named 'default' (found: tool_use)"),
    ("tokenizer_config.json", "chat_template", ["{{ x }}"], "needs one named 'default'"),
])
def test_chat_refuses_odd_tokenizer_settings_naming_the_file(chat_model, tmp_path, capsys, file,
                                                             key, value, says):
    """A string eos id used to fail deep in torch; an empty or unnamed list template used to be
    replaced silently by a format guessed from the special tokens."""
    from pbrl.chat import main
    model = shutil.copytree(chat_model, tmp_path / "model")
    settings = json.loads((model / file).read_text()) if (model / file).is_file() else {}
    (model / file).write_text(json.dumps({**settings, key: value}))
    code, _, err = run_here(main, ["--model", model, "--max-new-tokens", 2], capsys)
    assert code == 2 and says in err and str(model) in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("device, says", [("mps", "unknown device 'mps'"),
                                          ("cuda:99", "device 'cuda:99' was asked for")])
def test_chat_refuses_a_device_it_cannot_use_before_loading(chat_model, capsys, device, says):
    from pbrl.chat import main
    code, _, err = run_here(main, ["--model", chat_model, "--device", device], capsys)
    assert code == 2 and says in err and "model.safetensors" not in err, err


def test_a_full_disk_while_appending_to_a_cache_names_the_file_and_keeps_its_records(
        tmp_path, monkeypatch, capsys):
    """The pivot and translation caches are appended batch by batch; the disk filling up mid-batch
    used to end in an error naming no file, and the torn line's repair rewrote the whole file."""
    from pbrl import files
    from pbrl.cli import run_main
    from pbrl.pivot import FIELDS
    cache = tmp_path / "pivot.jsonl"
    rows = [{"id": f"p{i}", "question": "q", "reference": "r", "answer": "1", "pivot": {}}
            for i in range(3)]
    files.append_records(cache, rows[:2], FIELDS)
    with cache.open("a") as f:
        f.write('{"id": "p2", "quest')  # the batch a crash tore
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda argv: files.append_records(cache, rows[2:], FIELDS), [])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and str(cache) in err and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr(os, "fsync", real_fsync)
    kept = files.read_records(cache, FIELDS)
    assert {"p0", "p1"} <= set(kept)  # the records before the failed batch are all there


def damage(model_dir: Path, how: str) -> None:
    """Rewrite a model directory's weights: a shard map that points a tensor at a file without it,
    an integer tensor, a NaN."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    if how == "wrong shard map":
        (model_dir / "model.safetensors").unlink()
        half = len(names) // 2
        for i, part in enumerate((names[:half], names[half:])):
            save_file({k: tensors[k] for k in part},
                      model_dir / f"model-0000{i + 1}-of-00002.safetensors")
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": dict.fromkeys(names, "model-00001-of-00002.safetensors")}))
        return
    name = next(n for n in names if "embed" in n)
    if how == "int32":
        tensors[name] = (tensors[name] * 100).to(torch.int32)
    else:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, model_dir / "model.safetensors")


@pytest.mark.parametrize("how, says", [
    ("wrong shard map", "model.safetensors.index.json maps tensor"),
    ("int32", "is stored as I32; model weights are floating point"),
    ("nan", "holds NaN or infinite values; the checkpoint is damaged"),
])
def test_damaged_weights_are_refused_at_load_naming_the_tensor(chat_model, tmp_path, capsys, how,
                                                               says):
    """A wrong shard map and int32 weights used to end in raw library errors; NaN weights loaded
    silently and generated noise."""
    from pbrl.chat import main
    model = shutil.copytree(chat_model, tmp_path / "model")
    damage(model, how)
    code, _, err = run_here(main, ["--model", model, "--max-new-tokens", 2], capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_export_refuses_a_training_checkpoint_with_nan_weights(tmp_path, capsys):
    """A checkpoint of NaN weights used to export into a HF directory that loads and emits
    noise."""
    from conftest import save_hf_model
    from pbrl.checkpoint import load_model, main, save_training_checkpoint
    save_hf_model(tmp_path / "src", "llama")
    model = load_model(tmp_path / "src", dtype=torch.float32)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    ckpt = save_training_checkpoint(tmp_path / "run", 1, {"actor": model},
                                    {"actor": torch.optim.AdamW(model.parameters())},
                                    {"step": 1}, source_dir=tmp_path / "src")
    code, _, err = run_here(main, ["export", ckpt, tmp_path / "hf"], capsys)
    assert code == 2 and "'actor.model.layers.0.mlp.up_proj.weight' holds NaN" in err, err
    assert not (tmp_path / "hf" / "config.json").exists()


@pytest.mark.parametrize("argv, says", [
    (["--ppo.kl_target", "0.1", "--ppo.kl_beta", "0"], "ppo.kl_target adapts ppo.kl_beta"),
    (["--ppo.advantage", "grpo", "--rollout.samples_per_prompt", "1"], "samples_per_prompt"),
])
def test_the_planner_refuses_what_train_refuses(capsys, argv, says):
    """python -m pbrl.memory applies the run's checks: no plan for a config train.py refuses."""
    from pbrl.memory import main
    code, out, err = run_here(main, ["--gpus", 1, *argv], capsys)
    assert code == 2 and says in err and "per GPU" not in out, err


def test_a_complete_pivot_cache_serves_when_the_pivot_is_not_here_and_says_so(tmp_path):
    """A cache that holds every reference needs no pivot: a run on a machine without the pivot's
    checkpoint uses it and says its writer went unchecked; a cache that lacks references needs
    the pivot, and its absence is the error."""
    from pbrl.config import Config
    from pbrl.data import Problem
    from pbrl.files import append_records
    from pbrl.pivot import FIELDS
    from pbrl.prepare import pivot_references
    english = [Problem(f"mgsm-{i}", "en", f"question {i}", str(i)) for i in range(3)]
    cache = tmp_path / "pivot.jsonl"
    append_records(cache, [{"id": p.id, "question": p.question, "reference": f"The answer is "
                            f"{p.answer}.", "answer": p.answer, "pivot": {"model": "elsewhere"}}
                           for p in english[:2]], FIELDS)
    cfg, lines = Config(), []
    cfg.models.pivot = str(tmp_path / "not-here")
    with pytest.raises(FileNotFoundError):
        pivot_references(cfg, cache, english, torch.float32, torch.device("cpu"), lines.append)
    refs = pivot_references(cfg, cache, english[:2], torch.float32, torch.device("cpu"),
                            lines.append)
    assert refs == {"mgsm-0": "The answer is 0.", "mgsm-1": "The answer is 1."}
    assert lines == [f"pivot cache {cache}: complete; its writer is not checked "
                     f"({tmp_path / 'not-here'} is not here)"]
