"""eval.py end to end on a fixture set with two tiny checkpoints."""
import json

import pytest

import eval as eval_cli
from conftest import save_hf_model
from pbrl.evaluate import accuracy_by_language, format_table


def test_eval_end_to_end(tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 2)):
        save_hf_model(tmp_path / name, "qwen2", seed=seed, tie_word_embeddings=True)
    data = tmp_path / "mgsm"
    data.mkdir()
    for lang, q in (("en", "Janet has 3 apples."), ("de", "Janet hat 3 Äpfel."), ("sw", "Janet ana tufaha 3.")):
        (data / f"mgsm_{lang}.tsv").write_text(f"{q}\t3\n{q} Und 2?\t5\n{q} 1?\t4\n", encoding="utf-8")
    out = tmp_path / "out"
    eval_cli.main(["--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--data", str(data),
                   "--langs", "en,de,sw", "--limit", "2", "--max-new-tokens", "4", "--batch-size", "4",
                   "--out", str(out)])
    printed = capsys.readouterr()
    scores = json.loads((out / "scores.json").read_text())["scores"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 * 2 and set(samples[0]) == {"model", "id", "lang", "prompt", "response",
                                                              "extracted", "gold", "correct"}
    for model in scores:  # the scores are what the samples say
        for lang in ("en", "de", "sw"):
            rows = [s for s in samples if s["model"] == model and s["lang"] == lang]
            assert scores[model][lang] == 100 * sum(s["correct"] for s in rows) / len(rows)
        assert scores[model]["avg"] == (scores[model]["de"] + scores[model]["sw"]) / 2
    assert "| avg (non-en) |" in printed.out and "a: 6/6 (100%)" in printed.err and "b: 6/6 (100%)" in printed.err


def test_accuracy_and_table():
    records = [{"lang": "en", "correct": True}, {"lang": "de", "correct": False}, {"lang": "de", "correct": True},
               {"lang": "sw", "correct": False}]
    acc = accuracy_by_language(records)
    assert acc == {"de": 50.0, "en": 100.0, "sw": 0.0, "avg": 25.0}
    table = format_table({"warm": acc, "ppo": {"en": 90.0, "de": 60.0}})
    assert table.splitlines()[2] == "| en | 100.0 | 90.0 |" and table.splitlines()[-1] == "| avg (non-en) | 25.0 | - |"


def test_gsm8k_is_english_only():
    from pbrl.data import load_problems
    with pytest.raises(ValueError, match="gsm8k is English only"):
        load_problems("gsm8k", "x", ["de"], None)
