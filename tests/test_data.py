"""Answer extraction corpus, MGSM/GSM8K loaders on fixture files, prompts."""
import json

import pytest

from pbrl.data import (LANGUAGES, extract_number, has_answer_phrase, load_gsm8k, load_mgsm,
                       mgsm_prompt, normalize_number)

REAL_MGSM = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "mgsm"
EXTRACTION = [
    ("The answer is 18.", "18"),
    ("She sells 16 - 3 - 4 = 9 eggs for $2 each, 9 * 2 = 18. The answer is 18.", "18"),
    ("The answer is 2,125.", "2125"),
    ("The answer is $1,234.50", "1234.5"),
    ("The answer is -4.", "-4"),
    ("The answer is 18.00", "18"),
    ("The answer is 0.125", "0.125"),
    ("the ANSWER is 7", "7"),
    # the number after the phrase, not the last
    ("First 3 then 5. The answer is 8. Later I said 10.", "8"),
    ("So 4 + 4 = 8, and 8 + 2 = 10", "10"),                   # no phrase: the last number
    ("There is no number here.", None),
    ("", None),
    ("The answer is unknown", None),
    ("Answer: 42", "42"),
    ("Die Antwort lautet 80.000.", "80000"),
    ("Also 3,5 Liter. Die Antwort lautet 3,5.", "3.5"),
    ("La respuesta es 5.", "5"),
    ("La réponse est 1 234.", "1234"),
    ("Ответ — 12.", "12"),
    ("答案是 25。", "25"),
    ("答えは 9 です。", "9"),
    ("คำตอบคือ 30", "30"),
    ("Jibu ni 14.", "14"),
    ("উত্তর হল 6।", "6"),
    ("సమాధానం 11.", "11"),
    ("Die Antwort lautet 7. The answer is 8.", "8"),  # the last phrase wins
    ("\u0000\ufffd garbage %%% ###", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


# Chains of thought in the style of MGSM's native exemplars, one per language, each with other
# numbers before (and sometimes after) the answer; the answer phrase is followed by the number with
# and without a space.
NATIVE_COT = {
    "en": "She has 16 - 3 - 4 = 9 eggs left and sells them for $2 each, 9 * 2 = 18. The answer "
          "is{sp}{n}.",
    "es": "Le quedan 16 - 3 - 4 = 9 huevos y los vende a 2 $ cada uno: 9 * 2 = 18. La respuesta "
          "es{sp}{n}.",
    "fr": "Il lui reste 16 - 3 - 4 = 9 œufs, vendus 2 $ pièce : 9 × 2 = 18. La réponse est{sp}{n}.",
    "de": "Es bleiben 16 - 3 - 4 = 9 Eier, je 2 $: 9 * 2 = 18. Die Antwort lautet{sp}{n}.",
    "ru": "Остаётся 16 - 3 - 4 = 9 яиц по 2 доллара: 9 * 2 = 18. Ответ —{sp}{n}.",
    "zh": "她每天剩下16-3-4=9颗蛋，每颗卖2美元，9*2=18美元。所以答案是{sp}{n}。她第2天也一样。",
    "ja": "残りは16-3-4=9個で、1個2ドルなので9*2=18ドルです。答えは{sp}{n}です。"
          "翌日も3個食べます。",
    "th": "เหลือไข่16-3-4=9ฟอง ขายฟองละ2ดอลลาร์ ได้9*2=18ดอลลาร์ คำตอบคือ{sp}{n}",
    "sw": "Anabaki na mayai 16 - 3 - 4 = 9, kila moja kwa $2: 9 * 2 = 18. Jibu ni{sp}{n}.",
    "bn": "তার কাছে 16 - 3 - 4 = 9টি ডিম থাকে, প্রতিটি 2 ডলারে: 9 * 2 = 18। উত্তর হল{sp}{n}।",
    "te": "ఆమె దగ్గర 16 - 3 - 4 = 9 గుడ్లు మిగులుతాయి, ఒక్కొక్కటి $2: 9 * 2 = 18. సమాధానం{sp}{n}.",
}


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("space", ["", " "])
@pytest.mark.parametrize("written,expected",
                         [("18", "18"), ("1,250", "1250"), ("70000", "70000"), ("-5", "-5")])
def test_extract_number_in_every_mgsm_language(lang, space, written, expected):
    text = NATIVE_COT[lang].format(sp=space, n=written)
    assert extract_number(text) == expected, text
    assert has_answer_phrase(text, lang)


@pytest.mark.parametrize("text,expected", [
    ("答えは18です", "18"), ("คำตอบคือ18", "18"), ("所以答案是18。", "18"),  # the three
    ("所以一共是18颗", "18"),                # no phrase: the last number, right after Chinese text
    ("答えは１８です", "18"),                # full-width digits
    ("উত্তর হল ১৮।", "18"),                 # Bengali digits
    ("答案是70,000美元", "70000"), ("คำตอบคือ 70,000 บาท", "70000"), ("Ответ — 70 000.", "70000"),
    ("La réponse est 70\u202f000.", "70000"), ("Die Antwort lautet 70.000 Dollar.", "70000"),
    # a number glued to a Latin word is not a number of its own
    ("x2 and COVID19", None),
    ("16-3-4=9", "9"), ("It costs 12.5 dollars.", "12.5"),
])
def test_extract_number_without_spaces_and_in_native_digits(text, expected):
    assert extract_number(text) == expected


REAL_MGSM_STYLE = "{question}\n{step}{phrase}{space}{answer}{end}"


@pytest.mark.skipif(not REAL_MGSM.is_dir(),
                    reason="the real MGSM files live in ../shared/data (not committed)")
def test_extraction_on_every_real_mgsm_problem():
    """Each real MGSM question (which holds numbers of its own), its language's answer prefix,
    phrase and gold answer: the gold answer comes back, with and without a space after the phrase,
    in all 11 languages."""
    data = load_mgsm(REAL_MGSM, list(LANGUAGES))
    for lang, problems in data.items():
        f = LANGUAGES[lang]
        end = {"zh": "。", "ja": "です。", "th": "", "bn": "।"}.get(lang, ".")
        for p in problems:
            for space in ("", " "):
                text = REAL_MGSM_STYLE.format(question=p.question, step=f.answer, phrase=f.phrase,
                                              space=space, answer=p.answer, end=end)
                assert extract_number(text) == p.answer, (lang, p.id, text)


def test_every_language_phrase_is_recognised():
    for code, f in LANGUAGES.items():
        assert extract_number(f"1 2 3. {f.phrase} 42. 7") == "42", code
        assert has_answer_phrase(f"... {f.phrase} 42.", code)
        assert not has_answer_phrase("... 42.", code)


@pytest.mark.parametrize("text,expected", [("100", "100"), ("1e5", None), ("-0", "0"), ("007", "7"),
                                           ("3,50", "3.5"), ("12abc", None), ("1.125", "1125")])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def write_tsv(path, rows):
    path.write_text("".join(f"{q}\t{a}\n" for q, a in rows), encoding="utf-8")


def test_load_mgsm_tsv_and_jsonl_share_ids(tmp_path):
    write_tsv(tmp_path / "mgsm_en.tsv",
              [("Janet has 3 apples.", "3"), ("Costs 2,125 dollars?", "2,125")])
    (tmp_path / "mgsm_de.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"question": "Janet hat 3 Äpfel.", "answer_number": 3,
         "answer": "Schritt ... Die Antwort lautet 3."},
        {"question": "Kostet 2.125 Dollar?", "answer_number": 2125}]) + "\n", encoding="utf-8")
    data = load_mgsm(tmp_path, ["en", "de"])
    assert [p.id for p in data["en"]] == [p.id for p in data["de"]] == ["mgsm-0", "mgsm-1"]
    assert data["en"][1].answer == "2125" and data["de"][1].answer == "2125"
    assert data["de"][0].solution.endswith("lautet 3.") and data["de"][0].lang == "de"
    assert mgsm_prompt(data["de"][0]) == "Frage: Janet hat 3 Äpfel.\nSchritt-für-Schritt-Antwort:"


def test_load_mgsm_errors(tmp_path):
    write_tsv(tmp_path / "mgsm_en.tsv", [("q1", "3"), ("q2", "three")])
    with pytest.raises(ValueError, match=r"mgsm_en.tsv:2: gold answer 'three' is not a number"):
        load_mgsm(tmp_path, ["en"])
    (tmp_path / "mgsm_en.tsv").write_text("q1\t3\nonly a question\n")
    with pytest.raises(ValueError,
                       match=r"mgsm_en.tsv:2: expected 'question<TAB>answer_number', got 1 column"):
        load_mgsm(tmp_path, ["en"])
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        load_mgsm(tmp_path, ["xx"])
    with pytest.raises(FileNotFoundError, match="no mgsm_fr.tsv or mgsm_fr.jsonl"):
        load_mgsm(tmp_path, ["fr"])
    (tmp_path / "mgsm_de.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError,
                       match=r"mgsm_de.jsonl:1: missing field\(s\) \['answer_number'\]"):
        load_mgsm(tmp_path, ["de"])
    write_tsv(tmp_path / "mgsm_en.tsv", [("q1", "3")])
    write_tsv(tmp_path / "mgsm_es.tsv", [("q1", "3"), ("q2", "4")])
    with pytest.raises(ValueError, match="same problems"):
        load_mgsm(tmp_path, ["en", "es"])


def test_load_mgsm_from_hub_id_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    write_tsv(tmp_path / "mgsm_sw.tsv", [("Swali moja", "1")])
    calls = []

    def fake(repo_id, repo_type=None, **kwargs):
        calls.append((repo_id, repo_type))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert load_mgsm("juletxara/mgsm", ["sw"])["sw"][0].question == "Swali moja"
    assert calls == [("juletxara/mgsm", "dataset")]


def test_load_gsm8k(tmp_path):
    rows = [{"question": "Q1?", "answer": "2 + 2 = 4\n#### 4"},
            {"question": "Q2?", "answer": "x\n#### 1,000"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = load_gsm8k(tmp_path)
    assert [(p.id, p.answer, p.solution) for p in problems] == [("gsm8k-test-0", "4", "2 + 2 = 4"),
                                                               ("gsm8k-test-1", "1000", "x")]
    row = {"question": "Q", "answer": "no marker"}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="row 1: answer has no '#### <number>' final line"):
        load_gsm8k(tmp_path)


@pytest.mark.skipif(not REAL_MGSM.is_dir(),
                    reason="the real MGSM files live in ../shared/data (not committed)")
def test_real_mgsm_loads_in_all_languages():
    data = load_mgsm(REAL_MGSM, list(LANGUAGES))
    assert all(len(ps) == 250 for ps in data.values())
    assert data["de"][2].answer == data["en"][2].answer == "70000"  # '80.000 US-Dollar' problem
    assert all(data[lang][k].answer == data["en"][k].answer for lang in LANGUAGES
               for k in range(250))


@pytest.mark.parametrize("text,expected", [
    ("The answer is (B).", "B"), ("Answer: C", "C"), ("Die Antwort lautet **D**", "D"),
    ("Jibu ni (c)", "C"), ("I think (A) is wrong, (E) is right", "E"),
    ("A cat. The answer is J", "J"), ("no letter here", None),
    ("The answer is a tricky one: (F)", "F"), ("La respuesta es (G)", "G"), ("", None)])
def test_extract_choice(text, expected):
    from pbrl.data import extract_choice
    assert extract_choice(text) == expected


def test_load_mmlu_prox_jsonl_layouts_and_errors(tmp_path):
    from pbrl.data import is_correct, load_mmlu_prox, prompt
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "test.jsonl").write_text(json.dumps(
        {"question_id": 7, "question": "Was ist 2+2?", "options": ["3", "4", "5"],
         "answer": "B"}) + "\n")
    (tmp_path / "mmlu_prox_sw.jsonl").write_text(json.dumps(
        {"question_id": 7, "question": "2+2 ni?", "option_0": "3", "option_1": "4",
         "option_2": "N/A", "answer": "(B)"}) + "\n")
    data = load_mmlu_prox(tmp_path, ["de", "sw"])
    de, sw = data["de"][0], data["sw"][0]
    assert (de.id == sw.id == "mmlux-7" and de.choices == ("3", "4", "5")
            and sw.choices == ("3", "4"))
    assert (sw.answer == "B" and is_correct(de, "... Die Antwort lautet (B)")
            and not is_correct(de, "(C)"))
    assert "A. 3\nB. 4\nC. 5" in prompt(de) and prompt(de).endswith("Schritt-für-Schritt-Antwort:")
    (tmp_path / "de" / "test.jsonl").write_text(json.dumps(
        {"question": "q", "options": ["3", "4"], "answer": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: answer 'E' is not one of the option letters AB"):
        load_mmlu_prox(tmp_path, ["de"])
    with pytest.raises(FileNotFoundError, match="mmlu_prox_fr.jsonl"):
        load_mmlu_prox(tmp_path, ["fr"])


def test_mgsm_files_with_a_bom_a_trailing_blank_line_or_bad_bytes(tmp_path):
    (tmp_path / "mgsm_en.tsv").write_text("\ufeffJanet has 3 apples.\t3\nAnd 2 more?\t5\n\n",
                                          encoding="utf-8")
    problems = load_mgsm(tmp_path, ["en"])["en"]
    assert [(p.question, p.answer)
            for p in problems] == [("Janet has 3 apples.", "3"), ("And 2 more?", "5")]
    # a blank line inside would shift every id
    (tmp_path / "mgsm_en.tsv").write_text("q1\t3\n\nq3\t5\n")
    with pytest.raises(ValueError,
                       match=r"mgsm_en.tsv:2: expected 'question<TAB>answer_number', got 0 column"):
        load_mgsm(tmp_path, ["en"])
    (tmp_path / "mgsm_en.tsv").write_bytes("q1\t3\nÄpfel\t5\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"mgsm_en.tsv:2: not UTF-8 text"):
        load_mgsm(tmp_path, ["en"])
    (tmp_path / "mgsm_en.tsv").unlink()
    (tmp_path / "mgsm_en.jsonl").write_bytes(b'{"question": "q", "answer_number": 3}\n{"question": '
                                             b'"\xe4"}\n')
    with pytest.raises(ValueError, match=r"mgsm_en.jsonl:2: not UTF-8 text"):
        load_mgsm(tmp_path, ["en"])
