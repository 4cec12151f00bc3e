"""The quick variant of the default experiment: a smaller toy world, a short PB-RLSVR run through the real loop.
A regression guard, not a timing: reward rises, target-language accuracy rises, English does not collapse."""
import time

import kernels.cosine
import kernels.logprobs
from pbrl import toy
from pbrl.config import Config
from pbrl.evaluate import evaluate
from pbrl.rewards import Sample
from pbrl.trainer import Trainer


def test_quick_pb_rlsvr_run_improves_target_languages(tmp_path, monkeypatch):
    # The kernels' own tests run Triton's interpreter; this run uses their PyTorch path, as a CPU run does.
    monkeypatch.setattr(kernels.logprobs, "use_triton", lambda t: False)
    monkeypatch.setattr(kernels.cosine, "use_triton", lambda t: False)
    t0 = time.perf_counter()
    world = toy.build_world(0, root=tmp_path / "toy", n_train=400, n_eval=50, sft_steps=1000, width=64, layers=3,
                            log=lambda *a: None)
    monkeypatch.setattr(toy, "build_world", lambda seed, log=None: world)
    cfg = Config()
    cfg.reward.kind = "hybrid"  # no gold labels: 0.5 embedding + 0.5 agreement with the English pivot
    cfg.run.steps, cfg.run.eval_every, cfg.run.checkpoint_every = 20, 20, None
    cfg.run.out_dir = str(tmp_path / "run")
    trainer = Trainer(toy.use_world(cfg), log=lambda *a: None)
    fixed = trainer.train_problems[::8]  # a fixed set of training prompts, all target languages

    def greedy_reward() -> float:
        """Mean reward of greedy answers on the fixed prompts: the training reward without sampling noise."""
        records = evaluate(trainer.actor, trainer.tokenizer, fixed, batch_size=64, max_new_tokens=24,
                           progress=False)
        samples = [Sample(p.lang, r["response"], trainer.references[p.id]) for p, r in zip(fixed, records)]
        return float(trainer.reward_fn(samples)["reward"].mean())

    before = greedy_reward()
    history = trainer.run()
    after = greedy_reward()
    start, end = history[0], history[-1]
    print(f"quick variant: {time.perf_counter() - t0:.0f}s, target accuracy {start['acc/avg']:.1f} -> "
          f"{end['acc/avg']:.1f}, English {start['acc/en']:.1f} -> {end['acc/en']:.1f}, "
          f"greedy reward {before:.3f} -> {after:.3f}")
    assert after > before
    assert end["acc/avg"] > start["acc/avg"]
    assert end["acc/en"] >= start["acc/en"] - 10
    assert all(0 < h["entropy"] for h in history if "entropy" in h)  # no collapse to a deterministic policy


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
    with pytest.raises(FileExistsError, match=r"--out .*toy already holds results"):
        main(["--out", str(base)])
