"""Problems, prompts and answer extraction for multilingual math reasoning (MGSM, GSM8K).

A Problem carries an `id` shared across languages: line k of every MGSM language file is the same
problem, so the German prompt `mgsm-17` finds the English reference the pivot wrote for `mgsm-17`.

Answer extraction follows lm-eval's MGSM chain-of-thought tasks: the number after the last answer
phrase ("The answer is", "Die Antwort lautet", ... any MGSM language's), else the last number in the
text. It is the one implementation that both eval and the rewards use.
"""
from __future__ import annotations

import csv
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from pbrl.files import NUMBER_OR_TEXT, TEXT, check_fields, read_jsonl, read_text, resolve


@dataclass(frozen=True)
class LanguageFormat:
    name: str
    question: str  # prefix of the question, as in MGSM's native chain-of-thought exemplars
    answer: str    # prefix of the step-by-step answer
    phrase: str    # the phrase before the final number


# The prefixes and phrases of MGSM's native chain-of-thought exemplars (Shi et al. 2022; lm-eval
# mgsm_native_cot).
LANGUAGES = {
    "en": LanguageFormat("English", "Question:", "Step-by-Step Answer:", "The answer is"),
    "es": LanguageFormat("Spanish", "Pregunta:", "Respuesta paso a paso:", "La respuesta es"),
    "fr": LanguageFormat("French", "Question :", "Réponse étape par étape :", "La réponse est"),
    "de": LanguageFormat("German", "Frage:", "Schritt-für-Schritt-Antwort:", "Die Antwort lautet"),
    "ru": LanguageFormat("Russian", "Задача:", "Пошаговоерешение:", "Ответ —"),
    "zh": LanguageFormat("Chinese", "问题：", "逐步解答：", "答案是"),
    "ja": LanguageFormat("Japanese", "問題：", "ステップごとの答え：", "答えは"),
    "th": LanguageFormat("Thai", "โจทย์:", "คำตอบทีละขั้นตอน:", "คำตอบคือ"),
    "sw": LanguageFormat("Swahili", "Swali:", "Jibu la Hatua kwa Hatua:", "Jibu ni"),
    "bn": LanguageFormat("Bengali", "প্রশ্ন:", "ধাপে ধাপে উত্তর:", "উত্তর হল"),
    "te": LanguageFormat("Telugu", "ప్రశ్న:", "దశలవారీగా సమాధానం:", "సమాధానం"),
}


def prompt_format(code: str) -> LanguageFormat:
    """A language code's prompt format: its name and MGSM's question, answer and answer phrases
    (which language a text is in: rewards.language_share)."""
    if code not in LANGUAGES:
        raise ValueError(f"unknown language code {code!r}; expected one of {', '.join(LANGUAGES)}")
    return LANGUAGES[code]


@dataclass(frozen=True)
class Problem:
    id: str                 # shared across languages
    lang: str
    question: str
    # gold final answer: canonical number (see normalize_number), or a letter A-J
    answer: str
    solution: str | None = None  # worked solution, when the source has one
    choices: tuple[str, ...] | None = None  # multiple-choice options A, B, ... (MMLU-ProX)


# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------
# A number: optional sign, digits with optional thousands groups (",", ".", or a space of some
# width, each followed by exactly three digits), optional decimal part. It may not start inside
# another number ("12.5", "3,000") nor right after a letter of a script that separates words with
# spaces ("x2", "COVID19"); right after Chinese, Japanese or Thai text, which has no spaces
# between words ("答えは18です", "คำตอบคือ18"), it may. Right after an answer phrase the number
# may touch it in any script ("The answer is18"), past separators.
_SPACED_LETTERS = "A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff"
_NUMBER_BODY = r"-?\d+(?:[,.\u00a0\u202f ]\d{3})*(?:[.,]\d+)?"
_NUMBER = re.compile(rf"(?<![0-9{_SPACED_LETTERS}])(?<![0-9][.,]){_NUMBER_BODY}", flags=re.ASCII)
_NUMBER_AFTER_PHRASE = re.compile(rf"[\s:：*$€£]*({_NUMBER_BODY})", flags=re.ASCII)
# Longest first, so that of two phrases ending at the same place the longer one is matched.
_ALL_PHRASES = sorted({f.phrase for f in LANGUAGES.values()} | {"answer:"}, key=len, reverse=True)
_PHRASES = re.compile("|".join(map(re.escape, _ALL_PHRASES)), flags=re.IGNORECASE)
_CANONICAL = re.compile(r"(-?)([1-9]\d{0,2}(?:[, .]\d{3})+|\d+)(?:[.,](\d+))?", flags=re.ASCII)


def ascii_digits(text: str) -> str:
    """Decimal digits of any script (Bengali '১৮', full-width '１８', ...) as ASCII digits; nothing
    else changes (so string offsets stay valid)."""
    return re.sub(r"\d", lambda m: str(unicodedata.digit(m.group())), text)


def normalize_number(text: str) -> str | None:
    """Canonical form of a written number, or None. Three-digit groups after ',', '.' or a space are
    thousands ('2,125' and '80.000' -> '2125' and '80000', '1,234.50' -> '1234.5'); any other ',' or
    '.' is the decimal point ('3,5' -> '3.5', '0.125' stays); trailing zeros go ('18.00' -> '18').
    The one ambiguity, '1.125' in English, reads as thousands: MGSM's answers are integers."""
    s = ascii_digits(text).strip().replace("\u00a0", " ").replace("\u202f", " ")
    s = s.lstrip("$€£").rstrip(".")
    m = _CANONICAL.fullmatch(s)
    if m is None:
        return None
    sign, whole, fraction = m.groups()
    digits = sign + re.sub(r"[, .]", "", whole) + ("." + fraction if fraction else "")
    value = Decimal(digits).normalize()
    out = format(value, "f")
    return "0" if out == "-0" else out


def _after_last_phrase(text: str) -> int:
    """Offset just after the last answer phrase of any MGSM language ('The answer is', '答えは',
    ...), or -1."""
    return max((m.end() for m in _PHRASES.finditer(text)), default=-1)


def extract_number(response: str) -> str | None:
    """The final numeric answer of a response, canonical, or None when it has no number: the first
    number after the last answer phrase, else the last number of the text."""
    text = ascii_digits(response)
    cut = _after_last_phrase(text)
    if cut >= 0:
        found = _NUMBER_AFTER_PHRASE.match(text, cut) or _NUMBER.search(text, cut)
        if found:
            return normalize_number(found.group(found.lastindex or 0))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def written_numbers(text: str) -> list[str]:
    """Every number written in a text (digits of any script), in canonical form."""
    return [n for n in map(normalize_number, _NUMBER.findall(ascii_digits(text))) if n is not None]


def has_answer_phrase(response: str, lang: str) -> bool:
    """The response states its final answer with the language's phrase followed by a number."""
    phrase = re.escape(prompt_format(lang).phrase)
    return re.search(phrase + r"\s*[:：]?\s*\$?-?\d", response, flags=re.IGNORECASE) is not None


LETTERS = "ABCDEFGHIJ"
# '(b)' or a standalone capital 'B': a bare lowercase letter is too often an article or a word
# ('a').
_LETTER = re.compile(r"\(([A-Ja-j])\)|(?<![A-Za-z])([A-J])(?![A-Za-z])")


def extract_choice(response: str) -> str | None:
    """The chosen letter A-J: the first standalone letter after the last answer phrase ('The answer
    is (B)', 'Answer: C', 'Die Antwort lautet **D**'), else the last parenthesised letter '(E)',
    else None."""
    cut = _after_last_phrase(response)
    if cut >= 0:
        found = _LETTER.search(response, cut)
        if found:
            return (found.group(1) or found.group(2)).upper()
    parenthesised = re.findall(r"\(([A-Ja-j])\)", response)
    return parenthesised[-1].upper() if parenthesised else None


def is_correct(problem: Problem, response: str) -> bool:
    extracted = extract_choice(response) if problem.choices else extract_number(response)
    return extracted is not None and extracted == problem.answer


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------
def prompt(problem: Problem) -> str:
    """The user message for a problem: multiple choice or open numeric answer."""
    return mmlu_prompt(problem) if problem.choices else mgsm_prompt(problem)


def encode_prompt(tokenizer, problem: Problem, chat: bool = True,
                  shots: list[tuple[str, str]] = ()) -> list[int]:
    """A problem's prompt as token ids: the user turn of the tokenizer's chat template (or the plain
    text), the one encoding that rollouts, eval, the pivot and the toy warm start share. `shots`,
    (question, step-by-step solution) exemplars in the problem's language, come first: as earlier
    user and assistant turns, or as solved prompts."""
    asked = [(mgsm_prompt(Problem("", problem.lang, q, "")), solution) for q, solution in shots]
    if chat:
        turns = [m for q, solution in asked for m in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": solution})]
        return tokenizer.encode_chat(turns + [{"role": "user", "content": prompt(problem)}])
    shown = "".join(f"{q} {solution}\n\n" for q, solution in asked)
    return tokenizer.encode(shown + prompt(problem))


def load_mgsm_exemplars(path_or_id, langs: list[str], k: int) -> dict[str, list[tuple[str, str]]]:
    """The first k of MGSM's native chain-of-thought exemplars per language, as (question,
    solution): a TSV per language (`question<TAB>solution[<TAB>...]`, no header) named
    `*{lang}_train*.tsv` or `train/*{lang}.tsv` under a directory or a hub dataset's files. A
    solution's leading step-by-step answer prefix is dropped (the prompt writes it)."""
    root = resolve_dataset(path_or_id)
    out = {}
    for lang in langs:
        f = prompt_format(lang)
        files = sorted({*root.rglob(f"*{lang}_train*.tsv"), *root.rglob(f"train/*{lang}.tsv")})
        if len(files) != 1:
            raise FileNotFoundError(f"{root}: expected one exemplar file for {lang} "
                                    f"(*{lang}_train*.tsv or train/*{lang}.tsv), found "
                                    f"{len(files)}: {[str(x) for x in files][:4]}")
        rows = [line.split("\t") for line in read_text(files[0]).splitlines() if line.strip()]
        bad = next((i for i, row in enumerate(rows, start=1) if len(row) < 2), None)
        if bad is not None:
            raise ValueError(f"{files[0]}:{bad}: expected question<TAB>solution")
        if len(rows) < k:
            raise ValueError(f"{files[0]}: {len(rows)} exemplars, fewer than the {k} asked for")
        out[lang] = [(q.strip(), s.strip().removeprefix(f.answer).strip()) for q, s, *_ in rows[:k]]
    return out


def mmlu_prompt(problem: Problem) -> str:
    """The question, its options as 'A. ...' lines, then the language's step-by-step answer prefix;
    the model is expected to end with the answer phrase and a letter."""
    f = prompt_format(problem.lang)
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(problem.choices))
    return f"{f.question} {problem.question}\n{options}\n({f.phrase} (X))\n{f.answer}"


def mgsm_prompt(problem: Problem) -> str:
    """lm-eval's native chain-of-thought format, zero-shot: the question after the language's
    question prefix, then the language's step-by-step answer prefix, which the model continues
    (ending, ideally, with the language's answer phrase; extraction falls back to the last number
    when it does not)."""
    f = prompt_format(problem.lang)
    return f"{f.question} {problem.question}\n{f.answer}"


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------
def resolve_dataset(path_or_id: str | Path) -> Path:
    """A local directory or file as is; 'org/name' is a hub dataset, fetched with huggingface_hub
    (its data files)."""
    return resolve(path_or_id, repo_type="dataset",
                   allow_patterns=("*.tsv", "*.jsonl", "*.json", "*.parquet"))


def load_problems(task: str, path_or_id, langs: list[str],
                  limit: int | None = None) -> list[Problem]:
    """The first `limit` problems (all when None) of each language of a task (mgsm, gsm8k or
    mmlu_prox), language after language."""
    if task == "mgsm":
        by_lang = load_mgsm(path_or_id, langs)
    elif task == "mmlu_prox":
        by_lang = load_mmlu_prox(path_or_id, langs)
    elif task == "gsm8k":
        if langs != ["en"]:
            raise ValueError(f"gsm8k is English only; got languages {','.join(langs)}")
        by_lang = {"en": load_gsm8k(path_or_id)}
    else:
        raise ValueError(f"unknown task {task!r}; expected mgsm, gsm8k or mmlu_prox")
    return [p for lang in langs for p in by_lang[lang][:limit]]


def _gold(raw, where: str) -> str:
    value = normalize_number(str(raw))
    if value is None:
        raise ValueError(f"{where}: gold answer {raw!r} is not a number")
    return value


def load_mgsm(path_or_id, langs: list[str]) -> dict[str, list[Problem]]:
    """MGSM per language from `mgsm_{lang}.tsv` (question<TAB>answer_number, no header) or
    `mgsm_{lang}.jsonl` (question, answer_number, optional answer) in a directory or hub dataset.
    Row k is problem 'mgsm-k' in every language, so the files must line up row by row: the same
    number of rows and the same gold answer on each (a row missing in one file would pair every
    later problem with another problem's English reference); the first row that differs is an
    error."""
    root = resolve_dataset(path_or_id)
    out = {}
    for lang in langs:
        prompt_format(lang)
        tsv, jsonl = root / f"mgsm_{lang}.tsv", root / f"mgsm_{lang}.jsonl"
        if tsv.is_file():
            out[lang] = _read_mgsm_tsv(tsv, lang)
        elif jsonl.is_file():
            rows = read_jsonl(jsonl, required={"question": TEXT, "answer_number": NUMBER_OR_TEXT})
            if not rows:
                raise ValueError(f"{jsonl}: no problems (an empty file)")
            out[lang] = [Problem(f"mgsm-{i}", lang, r["question"],
                                 _gold(r["answer_number"], f"{jsonl}:{i + 1}"),
                                 r.get("answer") or None)
                         for i, r in enumerate(rows)]
        else:
            raise FileNotFoundError(f"{root}: no mgsm_{lang}.tsv or mgsm_{lang}.jsonl")
    for lang in langs[1:]:
        _check_aligned(root, langs[0], out[langs[0]], lang, out[lang])
    return out


def _check_aligned(root, first: str, a: list[Problem], lang: str, b: list[Problem]) -> None:
    """Two languages' files hold the same problems, row by row."""
    for k, (p, q) in enumerate(zip(a, b)):
        if p.answer != q.answer:
            raise ValueError(f"{root}: row {k + 1} of mgsm_{lang} answers {q.answer} but row "
                             f"{k + 1} of mgsm_{first} answers {p.answer}: the files do not line "
                             f"up (a row missing, added or moved in one of them?); row k must be "
                             f"problem k in every language")
    if len(a) != len(b):
        raise ValueError(f"{root}: mgsm_{lang} has {len(b)} problems and mgsm_{first} {len(a)}; "
                         f"MGSM languages must hold the same problems (ids are row numbers)")


def _read_mgsm_tsv(file: Path, lang: str) -> list[Problem]:
    lines = read_text(file).splitlines()
    while lines and not lines[-1].strip():  # a trailing blank line is not a problem
        lines.pop()
    problems = []
    rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    for line_no, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip():
            raise ValueError(f"{file}:{line_no}: expected 'question<TAB>answer_number', got "
                             f"{len(row)} column(s)")
        gold = _gold(row[1], f"{file}:{line_no}")
        problems.append(Problem(f"mgsm-{line_no - 1}", lang, row[0].strip(), gold))
    if not problems:
        raise ValueError(f"{file}: no problems (an empty file)")
    return problems


def load_gsm8k(path_or_id, split: str = "test") -> list[Problem]:
    """GSM8K (English) from `{split}.jsonl` or `{split}*.parquet` (question, answer with the final
    number after '####'), a file given directly, or the hub dataset's files (openai/gsm8k:
    main/{split}-*.parquet, which needs pyarrow). Ids 'gsm8k-{split}-k'."""
    root = resolve_dataset(path_or_id)
    candidates = [root] if root.is_file() else [root / f"{split}.jsonl",
                                                *sorted(root.rglob(f"{split}*.jsonl")),
                                                *sorted(root.rglob(f"{split}*.parquet"))]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{root}: no {split}.jsonl or {split}*.parquet")
    problems = []
    for i, row in enumerate(_read_rows(file, required={"question": TEXT, "answer": TEXT})):
        if "####" not in row["answer"]:
            raise ValueError(f"{file}: row {i + 1}: answer has no '#### <number>' final line")
        solution, final = row["answer"].rsplit("####", 1)
        gold = _gold(final, f"{file}: row {i + 1}")
        problems.append(Problem(f"gsm8k-{split}-{i}", "en", row["question"], gold,
                                solution.strip()))
    return problems


def load_mmlu_prox(path_or_id, langs: list[str], split: str = "test") -> dict[str, list[Problem]]:
    """MMLU-ProX per language: `{lang}/{split}*.jsonl` (or .parquet, read with pyarrow when it is
    installed) or `mmlu_prox_{lang}.jsonl`, rows with question, options (a list) or
    option_0..option_9, and answer (a letter). Ids 'mmlux-{question_id}' (shared across languages),
    or the row number when there is no question_id."""
    root = resolve_dataset(path_or_id)
    out = {}
    for lang in langs:
        prompt_format(lang)
        folder = root / lang
        files = [root / f"mmlu_prox_{lang}.jsonl"] if not folder.is_dir() else \
            sorted(folder.glob(f"{split}*.jsonl")) + sorted(folder.glob(f"{split}*.parquet"))
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"{root}: no {lang}/{split}*.jsonl, {lang}/{split}*.parquet or "
                                    f"mmlu_prox_{lang}.jsonl")
        problems = []
        for file in files:
            required = {"question": TEXT, "answer": NUMBER_OR_TEXT}
            for i, row in enumerate(_read_rows(file, required)):
                where = f"{file}: row {i + 1}"
                options = row.get("options")
                if options is None:
                    options = [row[k] for k in (f"option_{j}" for j in range(10))
                               if row.get(k) not in (None, "")]
                options = [o for o in options if o not in (None, "", "N/A")]
                answer = str(row["answer"]).strip().strip("()")
                if not 2 <= len(options) <= 10:
                    raise ValueError(f"{where}: expected 2 to 10 options, got {len(options)}")
                if answer not in LETTERS[:len(options)]:
                    raise ValueError(f"{where}: answer {row['answer']!r} is not one of the option "
                                     f"letters {LETTERS[:len(options)]}")
                qid = row.get("question_id", len(problems))
                problems.append(Problem(f"mmlux-{qid}", lang, row["question"], answer,
                                        row.get("cot_content") or None, tuple(options)))
        out[lang] = problems
    return out


def _read_rows(file: Path, required: dict[str, tuple]) -> list[dict]:
    if file.suffix == ".jsonl":
        return read_jsonl(file, required)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{file}: reading parquet needs pyarrow (pip install pyarrow), or "
                          f"convert it to JSONL") \
            from None
    rows = pq.read_table(file).to_pylist()
    return [check_fields(row, f"{file}: row {i + 1}", required) for i, row in enumerate(rows)]


if __name__ == "__main__":  # its old subcommands moved: a command must not pass doing nothing
    import sys
    print("error: pbrl.data is a library, not a command; translated data sets are built by "
          "python -m pbrl.translate_data (see its --help)", file=sys.stderr)
    sys.exit(2)
