"""Every entry point as a user runs it: a fresh Python process in which transformers cannot be
imported (so an import that only transformers happens to make cannot hide a crash), on a tiny random
checkpoint that carries a real-world chat template (default system prompt, loop.last,
raise_exception)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_cli
from conftest import REAL_TEMPLATE, run_here, save_hf_model, subprocess_env
from pbrl import kernels

ROOT = Path(__file__).resolve().parents[1]
# Runs a module (-m style) or a script with transformers made unimportable.
RUNNER = ("import runpy, sys; sys.modules['transformers'] = None; target = sys.argv[1]; sys.argv = "
          "sys.argv[1:]; runpy.run_path(target, run_name='__main__') if target.endswith('.py') "
          "else runpy.run_module(target, run_name='__main__', alter_sys=True)")
QUESTIONS = {"en": "Tom has {a} pears and gets {b} more. How many pears does he have?",
             "de": "Tom hat {a} Birnen und bekommt {b} dazu. Wie viele Birnen hat er?"}


def run(target: str, *args, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", RUNNER, target, *map(str, args)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, \
        f"{target} exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_hf_model(root / "model", "llama", seed=3, chat_template=REAL_TEMPLATE,
                  tie_word_embeddings=True, max_position_embeddings=256)
    data = root / "data"
    data.mkdir()
    pairs = [(2, 3), (4, 1), (5, 5), (7, 2)]
    for lang, q in QUESTIONS.items():
        rows = "".join(f"{q.format(a=a, b=b)}\t{a + b}\n" for a, b in pairs)
        (data / f"mgsm_{lang}.tsv").write_text(rows, encoding="utf-8")
    return root


def test_generate_pivot_eval_and_train_run_in_a_fresh_process(chat_world, tmp_path,
                                                              capsys):
    model, data = chat_world / "model", chat_world / "data"
    done = run("pbrl.chat", "--model", model, "--prompt", "Wie viel ist 12 * 7?",
               "--max-new-tokens", 5)
    assert "prompt tokens" in done.stdout and "Traceback" not in done.stderr

    refs = tmp_path / "refs.jsonl"
    run("pbrl.pivot", "--model", model, "--data", data, "--out", refs, "--max-new-tokens", 4,
        "--batch-size", 3)
    records = [json.loads(line) for line in refs.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"mgsm-{i}" for i in range(4)]
    assert records[1]["question"] == QUESTIONS["en"].format(a=4, b=1)

    out = tmp_path / "eval"
    done = run("eval.py", "--model", model, "--data", data, "--langs", "en,de", "--max-new-tokens",
               4, "--out", out)
    assert "| avg (non-en) |" in done.stdout
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert set(scores[str(model)]) == {"en", "de", "avg"}
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8

    run_dir = tmp_path / "run"
    run("train.py", "--models.policy", model, "--data.path", data, "--data.langs", "de",
        "--data.pivot_cache", refs,
        "--data.eval_path", data, "--data.eval_langs", "en,de", "--reward.kind", "agreement",
        "--rollout.prompts_per_step", 2, "--rollout.samples_per_prompt", 2,
        "--rollout.max_new_tokens", 4,
        "--ppo.micro_batch_size", 4, "--run.steps", 2, "--run.out_dir", run_dir)
    steps = [json.loads(line)["step"]
             for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    saved = json.loads((run_dir / "final" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == REAL_TEMPLATE  # the final policy keeps its template
    done = run("pbrl.plot", run_dir, "--out", tmp_path / "run.svg")
    assert done.stdout.startswith(f"wrote {tmp_path / 'run.svg'} (1 runs")
    assert "<polyline" in (tmp_path / "run.svg").read_text()
    exported = tmp_path / "exported"
    done = run("pbrl.checkpoint", "export", run_dir / "checkpoints" / "step_000002", exported,
               "--dtype", "bfloat16")
    assert done.stdout.strip() == f"wrote {exported}"
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported_config = (exported / "tokenizer_config.json").read_text()
    assert exported_config == (run_dir / "final" / "tokenizer_config.json").read_text()
    # the refusals, in this process (each command ran in a fresh one above)
    from pbrl.checkpoint import main as checkpoint_main
    from train import main as train_main
    code, _, err = run_here(checkpoint_main, ["export", run_dir / "checkpoints", exported], capsys)
    assert code == 2 and err.startswith("error: ") and \
        "no DCP .metadata; expected a training checkpoint" in err
    before = (run_dir / "metrics.jsonl").read_text()
    code, _, err = run_here(train_main, [
        "--models.policy", model, "--data.path", data, "--data.langs", "de", "--data.pivot_cache",
        refs, "--data.eval_path", "", "--reward.kind", "agreement", "--run.out_dir", run_dir],
        capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: run.out_dir {run_dir} already holds a run")
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_bad_input_ends_with_one_line_not_a_traceback(chat_world, tmp_path, capsys):
    model, data = chat_world / "model", chat_world / "data"
    code, _, err = run_here(eval_cli.main, ["--model", model, "--model", tmp_path / "missing",
                                            "--data", data], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "missing' is neither a local model directory" in err
    done = run("train.py", "--models.policy", model, "--data.path", data, "--ppo.lr", "-1",
               expect=2)
    assert done.stderr.strip() == "error: ppo.lr must be > 0, got -1.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_one_sentence(chat_world):
    done = run("pbrl.chat", "--model", chat_world / "model", "--device", "cuda", expect=2)
    assert "error: device 'cuda' was asked for, but CUDA is not available here" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args,message", [
    (["--limit", "0"], "--limit: expected a positive integer, got 0"),
    (["--limit", "-1"], "--limit: expected a positive integer, got -1"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--max-new-tokens", "ten"], "--max-new-tokens: expected a positive integer, got 'ten'"),
])
def test_eval_rejects_impossible_numbers(chat_world, capsys, args, message):
    with pytest.raises(SystemExit):
        eval_cli.main(["--model", str(chat_world / "model"), "--data", str(chat_world / "data"),
                       *args])
    assert message in capsys.readouterr().err


def test_eval_checks_every_model_before_evaluating_any_and_keeps_old_outputs(chat_world, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "samples.jsonl").write_text("earlier results\n")
    evaluated = []
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: evaluated.append(a) or [])
    with pytest.raises(FileNotFoundError, match="missing' is neither a local model directory"):
        eval_cli.main(["--model", str(chat_world / "model"), "--model", str(tmp_path / "missing"),
                       "--data", str(chat_world / "data"), "--out", str(out)])
    assert evaluated == [] and (out / "samples.jsonl").read_text() == "earlier results\n"


def test_gpu_check_dry_run_writes_its_report(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py at tiny size on the CPU: every check runs end to end, so the script
    cannot rot between the sessions that have a GPU. (Kernels take their PyTorch path here;
    tests/test_kernels.py covers Triton.)"""
    out = tmp_path / "gpu.md"
    run("benchmarks/gpu_check.py", "--size", "tiny", "--device", "cpu", "--steps", 2,
        "--decode-batches", "1,4", "--new-tokens", 16, "--out", out)
    text = out.read_text()
    assert ("| linear_token_logprobs grad weight | bfloat16 | pytorch |" in text
            and "| False |" not in text)
    assert "update cosine" in text and '"update_tflops"' in text and '"steps": 2' in text
    assert '"planned_peak_gb"' in text and '"export_bf16_s"' in text and "FAILED" not in text
    assert "| sample_tokens T=1 log-prob | bfloat16 | pytorch |" in text and "| 4 | eager |" in text
    assert '"gpu_busy_ms_per_step"' in text and '"one_iteration_profiled"' in text
    assert '"update_s_vs_full"' in text and '"merged, eager"' in text  # the LoRA check
    pipe = json.loads(out.with_suffix(".json").read_text())["pipelined"]["result"]
    sides, model = pipe["rollout_side_s"] + pipe["training_side_s"], pipe["modelled_2_gpus"]
    assert sides == pytest.approx(sum(pipe["phases_s"].values()), abs=2e-3)
    longer = max(pipe["rollout_side_s"], pipe["training_side_s"])
    assert model["separate_s"] == pytest.approx(longer + pipe["stream_s"], abs=2e-3)
    assert max(model["rollout_busy"], model["training_busy"]) == \
        pytest.approx(longer / model["separate_s"], abs=0.01)
    assert pipe["stream_s"] > 0 and pipe["stream_mb"] > 0
    # --update reruns some checks and keeps the other sections of the last run (each names its
    # command); here, in this process, as the command line was tried just above.
    from benchmarks import gpu_check
    monkeypatch.setattr(kernels.logprobs, "use_triton", lambda t: False)  # as in its process
    gpu_check.main(["--size", "tiny", "--device", "cpu", "--checks", "precision", "--update",
                    "--out", str(out)])
    updated = out.read_text()
    assert updated.count("--checks precision --update") == 1 and "| 4 | eager |" in updated


def test_experiment_command_gives_in_its_workers_the_numbers_of_runs_made_in_turn(tmp_path,
                                                                                  monkeypatch):
    """python -m pbrl.experiment --workers 2 (its first run in its own process, the others two at a
    time in worker processes of one thread) gives the numbers the same runs give made in turn in
    this process: same seed, same numbers, wherever a run goes."""
    from pbrl import toy
    from pbrl.experiment import run_experiment
    monkeypatch.delenv("TRITON_INTERPRET")  # a CPU user's kernels, as in the command's processes
    world = toy.build_world(0, root=tmp_path / "toy", n_train=60, n_eval=10, sft_steps=200,
                            width=32, layers=1, log=lambda *a: None)
    paths = {key: str(path) for key, path in toy.artifacts(world).items()}  # not 'toy': no build
    arms = {"gold": {"reward.kind": "exact_match", **paths},
            "hybrid": {"reward.kind": "hybrid", "rollout.max_new_tokens": 16, **paths},
            "English": {"reward.kind": "exact_match", "data.langs": "en", **paths}}
    here = run_experiment(tmp_path / "here", steps=2, seeds=1, arms=arms, eval_every="off",
                          log=lambda *a: None)
    specs = [f"{name}={' '.join(f'{k} {v}' for k, v in settings.items())}"
             for name, settings in arms.items()]
    done = run("pbrl.experiment", "--steps", 2, "--seeds", 1, "--workers", 2, "--out",
               tmp_path / "command", *[x for spec in specs for x in ("--arm", spec)])
    saved = json.loads((tmp_path / "command" / "results.json").read_text())
    assert saved["accuracy"] == json.loads(json.dumps(here["accuracy"]))
    # both computed on the pinned numerics (pbrl/numerics.py), which the results name
    assert {k: saved["numerics"][k] for k in ("aten", "mkl_cbwr")} == \
        {k: here["numerics"][k] for k in ("aten", "mkl_cbwr")} == {"aten": "AVX2",
                                                                   "mkl_cbwr": "AVX2,STRICT"}
    results = (tmp_path / "command" / "results.md").read_text()
    assert "AVX2 ATen kernels, MKL_CBWR=AVX2,STRICT" in results
    assert saved["curves"] == here["curves"] and here["curves"]["hybrid"][0][-1]["reward"] > 0
    assert all(f"{name}, seed 0: " in done.stdout for name in arms)


def test_train_help_lists_every_setting_with_its_default_choices_and_meaning():
    """python train.py --help (and -h): every field of every section, read from the dataclasses
    and the registries, so a new setting or choice shows without touching train.py."""
    import dataclasses

    from pbrl.config import Config
    text = run("train.py", "--help").stdout
    assert run("train.py", "-h").stdout == text
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in text
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata["help"].strip(), f"{section.name}.{f.name} has no help"
            line = next((x for x in text.splitlines()
                         if x.startswith(f"  --{section.name}.{f.name} (default ")), None)
            assert line, f"--{section.name}.{f.name} missing from train.py --help"
            for choice in f.metadata["choices"] or ():
                assert choice in line, (choice, line)
    assert "--ppo.advantage (default gae; gae | grpo | rloo | reinforce_pp" in text
    assert "--rollout.top_p (default off; > 0 and <= 1 or off)" in text


@pytest.mark.parametrize("module", ["eval", "pbrl.chat", "pbrl.pivot", "pbrl.memory",
                                    "pbrl.plot", "pbrl.translate_data", "pbrl.experiment",
                                    "pbrl.checkpoint"])
def test_every_other_entry_point_answers_help(module, capsys):
    """Their argparse --help, in this process (each runs in a fresh one elsewhere here)."""
    import importlib
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
