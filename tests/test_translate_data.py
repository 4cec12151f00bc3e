"""`python -m pbrl.translate_data`: GSM8K questions into MGSM-layout training files, numbers
checked, resumable."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_here, save_hf_model, subprocess_env
from pbrl.data import load_gsm8k, load_mgsm
from pbrl.files import read_records
from pbrl.translate_data import FIELDS, translate_problems
from pbrl.translate_data import main as translate_main

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples?",
             "Ana reads 12 pages a day for 5 days. How many?",
             "A box holds 1,250 pens. 250 are sold. How many are left?",
             "Ben runs 7 km and walks 2 km. How far?",
             "Lia bakes 24 cakes and eats 6. How many remain?"]
ANSWERS = ["7", "60", "1000", "9", "18"]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"Work.\n#### {a}"}) + "\n"
                            for q, a in zip(QUESTIONS, ANSWERS)))
    return path


class Scripted:
    """A translator whose mistakes the test chooses: it drops the numbers of problems listed in
    `lose` (on the first attempt, or on every attempt for those in `always`)."""

    def __init__(self, lose=(), always=(), die_after=None):
        self.lose, self.always, self.die_after, self.calls = set(lose), set(always), die_after, []

    def __call__(self, texts, langs, temperature=0.0, seed=None):
        self.calls.append((list(texts), temperature))
        if self.die_after is not None and len(self.calls) > self.die_after:
            raise KeyboardInterrupt("killed")
        out = []
        for text, lang in zip(texts, langs):
            i = QUESTIONS.index(text)
            lost = i in self.always or (i in self.lose and temperature == 0)
            kept = " ".join(w for w in text.split() if not w[0].isdigit()) if lost else text
            out.append(f"[{lang}] " + kept)
        return out


def test_numbers_are_checked_retried_and_dropped_and_rows_stay_aligned(tmp_path, source):
    problems = load_gsm8k(source, "train")
    translator = Scripted(lose={1}, always={3})
    summary = translate_problems(translator, problems, ["de", "fr"], tmp_path / "out", batch_size=2,
                                 log=print)
    for lang in ("de", "fr"):
        assert summary[lang] == {"kept": 4, "retried": 2, "dropped": 1}
    retries = [texts for texts, temperature in translator.calls if temperature > 0]
    # one sampled retry per failing problem and language
    assert retries == [[QUESTIONS[1]], [QUESTIONS[3]]] * 2
    mgsm = load_mgsm(tmp_path / "out", ["en", "de", "fr"])
    kept = [0, 1, 2, 4]
    assert [p.question for p in mgsm["en"]] == [QUESTIONS[i] for i in kept]
    assert [p.question for p in mgsm["de"]] == [f"[de] {QUESTIONS[i]}" for i in kept]
    # row k is problem mgsm-k in every language, with the English gold answer
    for lang in ("en", "de", "fr"):
        assert [(p.id, p.answer)
                for p in mgsm[lang]] == [(f"mgsm-{k}", ANSWERS[i]) for k, i in enumerate(kept)]


def test_an_interrupted_translation_resumes(tmp_path, source):
    problems = load_gsm8k(source, "train")
    with pytest.raises(KeyboardInterrupt):
        translate_problems(Scripted(die_after=1), problems, ["de"], tmp_path / "out", batch_size=2,
                           log=print)
    assert list(read_records(tmp_path / "out" / "translations" / "de.jsonl", FIELDS)) == \
        ["gsm8k-train-0", "gsm8k-train-1"]
    again = Scripted()
    translate_problems(again, problems, ["de"], tmp_path / "out", batch_size=2, log=print)
    # only what was missing
    assert [texts for texts, _ in again.calls] == [QUESTIONS[2:4], QUESTIONS[4:]]
    assert len(load_mgsm(tmp_path / "out", ["de"])["de"]) == 5


def test_command_with_a_lexicon_and_with_a_real_model(tmp_path, source, capsys):
    """End to end in fresh processes: a word-by-word dictionary (numbers pass through, but it splits
    "1,250" into "1 , 250", which the check catches), and a tiny random instruct model through
    pbrl's sampler (its noise keeps no numbers: all retried, then dropped)."""
    lexicon = tmp_path / "lexicon"
    lexicon.mkdir()
    words = {"de": {"apples": "Äpfel", "how": "wie", "many": "viele"}}
    (lexicon / "lexicon.json").write_text(json.dumps(words))
    done = subprocess.run([sys.executable, "-m", "pbrl.translate_data", "--model", str(lexicon),
                           "--source", str(source), "--langs", "de", "--out", str(tmp_path / "a")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "translate de: 4 kept, 1 retried, 1 dropped" in done.stdout
    # unknown: dropped
    assert load_mgsm(tmp_path / "a", ["de"])["de"][0].question == "3 Äpfel 4 . wie viele Äpfel ?"
    save_hf_model(tmp_path / "model", "llama", seed=5)
    done = subprocess.run([sys.executable, "-m", "pbrl.translate_data", "--model",
                           str(tmp_path / "model"), "--source", str(source), "--langs", "sw",
                           "--out", str(tmp_path / "b"), "--limit", "3", "--max-new-tokens", "8",
                           "--device", "cpu"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "translate sw: 0 kept, 3 retried, 3 dropped (a number lost or changed)" in done.stdout
    assert "wrote 0 of 3 problems" in done.stdout
    records = read_records(tmp_path / "b" / "translations" / "sw.jsonl", FIELDS)
    assert len(records) == 3 and all(r["attempts"] == 2 and not r["numbers_kept"]
                                     for r in records.values())
    code, _, err = run_here(translate_main, ["--model", lexicon, "--source", source, "--langs",
                                             "en,de", "--out", tmp_path / "c"], capsys)
    assert code == 2 and err.startswith("error: --langs lists the target languages")


@pytest.mark.parametrize("words, says", [
    ({"de": {"apples": {"plural": "Äpfel"}}},
     "under 'de', 'apples' maps to {\"plural\": \"Äpfel\"}"),
    ({"de": ["apples", "Äpfel"]}, "under 'de', 'de' maps to [\"apples\", \"Äpfel\"]"),
    ([["apples", "Äpfel"]], "expected a JSON object, got list"),
])
def test_a_lexicon_of_another_shape_is_refused_naming_the_entry(tmp_path, source, capsys, words,
                                                                says):
    """A nested lexicon used to fail with a raw TypeError in the middle of translating."""
    lexicon = tmp_path / "lexicon"
    lexicon.mkdir()
    (lexicon / "lexicon.json").write_text(json.dumps(words, ensure_ascii=False))
    code, _, err = run_here(translate_main, ["--model", lexicon, "--source", source, "--langs",
                                             "de", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "lexicon.json: expected " in err, err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "mgsm_de.tsv").exists()
