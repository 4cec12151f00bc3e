"""Translators, text in one language to another: what the MT reward (pbrl/rewards.py) and the
training data builder (pbrl/translate_data.py) both use.

    Translator          an instruct model, prompted, decoded greedily by pbrl's sampler
    LexiconTranslator   word by word through a dictionary (a baseline; the toy world's translator)
A translator is called as translator(texts, langs, temperature=0.0, seed=None) -> texts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from pbrl.checkpoint import load_pretrained
from pbrl.data import prompt_format
from pbrl.files import read_json
from pbrl.model import Transformer
from pbrl.sampler import generate
from pbrl.tokenizer import Tokenizer

TRANSLATE_PROMPT = ("Translate the following {language} text into English. Keep every number. "
                    "Reply with the translation only.\n\n{text}")
# texts translated at once (the memory planner counts this batch's KV cache)
TRANSLATE_BATCH_SIZE = 16
LEXICON_FILE = "lexicon.json"


class Translator:
    """Translates with an instruct model through pbrl's own sampler (greedy, chat-formatted)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_new_tokens: int = 512,
                 batch_size: int = TRANSLATE_BATCH_SIZE, prompt: str = TRANSLATE_PROMPT):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, texts: list[str], langs: list[str], temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        """The prompt's {language} is each text's language (its source, for the default prompt)."""
        out, tok = [], self.tokenizer
        for start in range(0, len(texts), self.batch_size):
            batch = zip(texts[start:start + self.batch_size], langs[start:start + self.batch_size])
            prompts = [tok.encode_chat([{"role": "user", "content": self.prompt.format(
                language=prompt_format(lang).name, text=text)}]) for text, lang in batch]
            done = generate(self.model, prompts, self.max_new_tokens, stop_ids=tok.stop_ids,
                            pad_id=tok.pad_id or 0, temperature=temperature,
                            seed=None if seed is None else seed + start)
            out += [tok.decode(ids) for ids in done.as_lists()]
        return out


class LexiconTranslator:
    """Word by word through a lexicon {lang: {word (lowercase): word}}; numbers and symbols pass
    through and unknown words are dropped. Deterministic: temperature and seed are ignored."""
    _WORD = re.compile(r"\w+|[^\w\s]")

    def __init__(self, words: dict[str, dict[str, str]]):
        self.words = words

    def __call__(self, texts: list[str], langs: list[str], temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        out = []
        for text, lang in zip(texts, langs):
            table = self.words.get(lang, {})
            kept = [table.get(t.lower(), t if not t.isalpha() or lang == "en" else "")
                    for t in self._WORD.findall(text)]
            out.append(" ".join(w for w in kept if w))
        return out


def load_translator(path_or_id, dtype=None, device=None, max_new_tokens: int = 512,
                    prompt: str = TRANSLATE_PROMPT):
    """A directory with lexicon.json is a LexiconTranslator (its table for a language maps that
    language's words: into English for rewards, from English for the data builder); anything else an
    instruct model (Translator) prompted with `prompt`."""
    lexicon = Path(path_or_id) / LEXICON_FILE
    if lexicon.is_file():
        return LexiconTranslator(checked_lexicon(read_json(lexicon), lexicon))
    model, tokenizer = load_pretrained(path_or_id, dtype=dtype, device=device)
    return Translator(model, tokenizer, max_new_tokens=max_new_tokens, prompt=prompt)


def checked_lexicon(words, where) -> dict[str, dict[str, str]]:
    """words, refused (naming `where` and the first bad entry) unless it is {lang: {word: word}}
    with text for every word."""
    if not isinstance(words, dict):
        raise ValueError(f"{where}: expected {{language: {{word: translation}}}}, got a "
                         f"{type(words).__name__}")
    for lang, table in words.items():
        bad = [(w, t) for w, t in table.items() if not isinstance(t, str)] \
            if isinstance(table, dict) else [(lang, table)]
        if bad:
            raise ValueError(f"{where}: expected {{language: {{word: translation}}}} with text "
                             f"translations; under {lang!r}, {bad[0][0]!r} maps to "
                             f"{json.dumps(bad[0][1], ensure_ascii=False)[:60]}")
    return words
