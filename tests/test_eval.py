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
    for lang, q in (("en", "Janet has 3 apples."), ("de", "Janet hat 3 Äpfel."),
                    ("sw", "Janet ana tufaha 3.")):
        (data / f"mgsm_{lang}.tsv").write_text(f"{q}\t3\n{q} Und 2?\t5\n{q} 1?\t4\n",
                                               encoding="utf-8")
    out = tmp_path / "out"
    eval_cli.main(["--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"),
                   "--data", str(data), "--langs", "en,de,sw", "--limit", "2",
                   "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out)])
    printed = capsys.readouterr()
    scores = json.loads((out / "scores.json").read_text())["scores"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 * 2
    assert set(samples[0]) == {"model", "id", "lang", "prompt", "response", "extracted", "gold",
                               "correct", "sample"}
    for model in scores:  # the scores are what the samples say
        for lang in ("en", "de", "sw"):
            rows = [s for s in samples if s["model"] == model and s["lang"] == lang]
            assert scores[model][lang] == 100 * sum(s["correct"] for s in rows) / len(rows)
        assert scores[model]["avg"] == (scores[model]["de"] + scores[model]["sw"]) / 2
    assert ("| avg (non-en) |" in printed.out and "a: 6/6 (100%)" in printed.err
            and "b: 6/6 (100%)" in printed.err)


def test_accuracy_and_table():
    records = [{"lang": "en", "correct": True}, {"lang": "de", "correct": False},
               {"lang": "de", "correct": True}, {"lang": "sw", "correct": False}]
    acc = accuracy_by_language(records)
    assert acc == {"de": 50.0, "en": 100.0, "sw": 0.0, "avg": 25.0}
    table = format_table({"warm": acc, "ppo": {"en": 90.0, "de": 60.0}})
    assert (table.splitlines()[2] == "| en | 100.0 | 90.0 |"
            and table.splitlines()[-1] == "| avg (non-en) | 25.0 | - |")


def test_gsm8k_is_english_only():
    from pbrl.data import load_problems
    with pytest.raises(ValueError, match="gsm8k is English only"):
        load_problems("gsm8k", "x", ["de"], None)


def exemplar_files(root):
    from pbrl.data import prompt_format
    (root / "exemplars").mkdir(parents=True)
    for lang, solved in (("en", "Tom had {n} pens, so the answer is {n}."),
                         ("de", "Tom hatte {n} Stifte, also {n}.")):
        prefix = prompt_format(lang).answer
        (root / "exemplars" / f"mgsm_{lang}_train.tsv").write_text("".join(
            f"Q{lang}{n}: Tom has {n} pens.\t{prefix} "
            f"{solved.format(n=n)}\t{n}\n" for n in (1, 2, 3)),
            encoding="utf-8")


def test_fewshot_prompts_put_native_exemplars_first(tmp_path):
    """With a real chat template: the exemplars as earlier user/assistant turns, in the problem's
    language and order, their answer prefix not doubled; without chat, as solved prompts."""
    from conftest import REAL_TEMPLATE
    from pbrl.data import Problem, encode_prompt, prompt_format, load_mgsm_exemplars
    from pbrl.tokenizer import Tokenizer
    save_hf_model(tmp_path / "m", "llama", chat_template=REAL_TEMPLATE)
    tok = Tokenizer.from_pretrained(tmp_path / "m")
    exemplar_files(tmp_path / "data")
    shots = load_mgsm_exemplars(tmp_path / "data", ["de"], 2)
    assert shots["de"] == [("Qde1: Tom has 1 pens.", "Tom hatte 1 Stifte, also 1."),
                           ("Qde2: Tom has 2 pens.", "Tom hatte 2 Stifte, also 2.")]
    problem = Problem("mgsm-0", "de", "Wie viel ist 2 + 2?", "4")
    text = tok.decode(encode_prompt(tok, problem, chat=True, shots=shots["de"]),
                      skip_special_tokens=False)
    f = prompt_format("de")
    order = [text.index(s) for s in ("Qde1", "also 1.", "Qde2", "also 2.", "Wie viel ist 2 + 2?")]
    # two exemplar prompts and the question's
    assert order == sorted(order) and text.count(f.answer) == 3
    asked = tok.decode(encode_prompt(tok, problem, chat=True), skip_special_tokens=False)
    assert text.endswith(asked.split("Wie viel ist 2 + 2?")[1])
    plain = tok.decode(encode_prompt(tok, problem, chat=False, shots=shots["de"]))
    assert plain.startswith(f"{f.question} Qde1: Tom has 1 pens.\n{f.answer} Tom hatte 1 Stifte, "
                            f"also 1.\n\n")


def test_eval_fewshot_end_to_end_and_errors(tmp_path, capsys):
    save_hf_model(tmp_path / "m", "qwen2", seed=1)
    data = tmp_path / "mgsm"
    data.mkdir()
    for lang, q in (("en", "Janet has 3 apples."), ("de", "Janet hat 3 Äpfel.")):
        (data / f"mgsm_{lang}.tsv").write_text(f"{q}\t3\n{q} Und 2?\t5\n", encoding="utf-8")
    exemplar_files(data)
    args = ["--model", str(tmp_path / "m"), "--data", str(data), "--langs", "en,de",
            "--max-new-tokens", "3", "--out", str(tmp_path / "out")]
    eval_cli.main(args + ["--num-fewshot", "3"])
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError,
                       match=r"mgsm_en_train.tsv: 3 exemplars, fewer than the 4 asked for"):
        eval_cli.main(args + ["--num-fewshot", "4"])
    with pytest.raises(FileNotFoundError,
                       match=r"m: expected one exemplar file for en \(\*en_train\*.tsv or "
                             r"train/\*en.tsv\), found 0"):
        eval_cli.main(args + ["--num-fewshot", "1", "--fewshot-data", str(tmp_path / "m")])


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_answer():
    """The unbiased estimator against its definition: every k of the n samples, counted."""
    import itertools

    from pbrl.evaluate import pass_at_k
    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 4), (4, 4, 2), (8, 1, 8)]:
        right = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(right, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_majority_vote_and_pass_at_k_per_language_by_hand():
    from pbrl.evaluate import sampled_scores

    def rec(lang, i, extracted, gold="4"):
        return {"lang": lang, "id": f"p{i}", "extracted": extracted, "gold": gold,
                "correct": extracted == gold}
    records = [rec("de", 0, "4"), rec("de", 0, "5"), rec("de", 0, "4"),     # majority 4: right
               rec("de", 1, "5"), rec("de", 1, "4"), rec("de", 1, None),    # tie 5-4: first, 5
               rec("en", 2, None), rec("en", 2, None), rec("en", 2, "4")]   # only answer: 4
    scores = sampled_scores(records, 3)
    assert scores["maj@3"] == {"de": 50.0, "en": 100.0, "avg": 50.0}
    assert scores["pass@3"] == {"de": 100.0, "en": 100.0, "avg": 100.0}
    assert sampled_scores(records, 2)["pass@2"]["de"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="pass@4 needs at least 4 samples per problem"):
        sampled_scores(records, 4)


def test_eval_with_samples_reports_pass_at_k_and_majority_and_does_not_depend_on_batches(
        tmp_path, capsys):
    save_hf_model(tmp_path / "a", "qwen2", seed=1, tie_word_embeddings=True)
    data = tmp_path / "mgsm"
    data.mkdir()
    for lang, q in (("en", "Janet has 3 apples."), ("de", "Janet hat 3 Äpfel.")):
        (data / f"mgsm_{lang}.tsv").write_text(f"{q}\t3\n{q} Und 2?\t5\n", encoding="utf-8")

    def run(out, batch):
        eval_cli.main(["--model", str(tmp_path / "a"), "--data", str(data), "--langs", "en,de",
                       "--max-new-tokens", "6", "--batch-size", str(batch), "--samples", "3",
                       "--temperature", "1.0", "--out", str(out)])
        return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 4)
    assert one == two and len(one) == 2 * 2 * 3  # the same samples, whatever the batch
    assert [r["sample"] for r in one[:3]] == [0, 1, 2] and len({r["response"] for r in one}) > 2
    saved = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert saved["samples"] == 3 and set(saved["sampled"][str(tmp_path / "a")]) == {"pass@3",
                                                                                    "maj@3"}
    assert "pass@3" in capsys.readouterr().out
    with pytest.raises(ValueError, match="would repeat one greedy answer"):
        eval_cli.main(["--model", str(tmp_path / "a"), "--data", str(data), "--samples", "2",
                       "--out", str(tmp_path / "three")])
