"""Tokenizer (a `tokenizers` tokenizer.json) and chat formatting.

Chat prompts are rendered with the checkpoint's own Jinja chat template, in the same sandboxed
environment and with the same variables transformers and vLLM use, so a prompt here is token for
token the prompt the model was trained on. Checkpoints with no template (test and toy tokenizers)
get a hand-written Llama 3 or ChatML format, chosen by which special tokens the vocabulary has.
"""
from __future__ import annotations

import functools
import itertools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext  # loopcontrols: `import jinja2` alone does not load the submodule
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pbrl.files import read_json, read_text, resolve

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value, where: str) -> list[int]:
    """An eos_token_id setting (one id, a list of them, or absent) as a list of ids."""
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError(f"{where}: eos_token_id must be a token id or a list of token ids, got "
                         f"{value!r}")
    return list(ids)


def _template(value, source: str) -> str | None:
    """A chat_template setting: its text, or the one named 'default' of a list of named templates
    (None: there is none)."""
    if value is None:
        return None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if len(named) != len(value) or "default" not in named:
            raise ValueError(f"{source}: a list of named chat templates needs one named 'default' "
                             f"(found: {', '.join(map(str, named)) or repr(value)[:60]})")
        value = named["default"]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: the chat template is {value!r}; expected the template's text "
                         f"(or no chat_template at all, for the Llama 3 or ChatML format)")
    return value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, tokenizer_config: dict | None = None,
                 generation_config: dict | None = None, model_config: dict | None = None,
                 chat_template: str | None = None, source: str = "the chat template",
                 directory: str = "the model directory"):
        self.tok = tokenizer
        cfg = tokenizer_config or {}
        self.config = cfg
        # some configs hold named templates; the default one is used
        self.chat_template = _template(cfg.get("chat_template") if chat_template is None else
                                       chat_template, source)
        self.template_source = source  # where the template came from, for error messages
        # Extra variables for the template. Qwen3's templates think by default; reasoning tokens
        # would eat the generation budgets of rollouts, the pivot and translation, so pbrl turns
        # thinking off unless asked.
        self.template_args = {"enable_thinking": False}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        pad = _token_text(cfg.get("pad_token"))
        # eos / stop ids: the union of every place HF keeps them; generation_config lists chat
        # end-of-turn ids.
        stop = _ids((generation_config or {}).get("eos_token_id"),
                    f"{directory}/generation_config.json")
        stop += _ids((model_config or {}).get("eos_token_id"), f"{directory}/config.json")
        if self.eos_token is not None and self.token_id(self.eos_token) is not None:
            stop.insert(0, self.token_id(self.eos_token))
        if not stop:
            ends = (self.token_id("<|eot_id|>"), self.token_id("<|im_end|>"))
            stop = [i for i in ends if i is not None]
        self.stop_ids = list(dict.fromkeys(stop))
        self.eos_id = self.stop_ids[0] if self.stop_ids else None
        known_pad = pad is not None and self.token_id(pad) is not None
        self.pad_id = self.token_id(pad) if known_pad else self.eos_id

    @classmethod
    def from_pretrained(cls, path_or_id) -> "Tokenizer":
        directory = resolve(path_or_id)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (pbrl reads fast tokenizers "
                                    f"only)")
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None

        def optional(name):
            return read_json(directory / name) if (directory / name).is_file() else None

        jinja = directory / "chat_template.jinja"
        source = jinja if jinja.is_file() else directory / "tokenizer_config.json"
        return cls(tokenizer, optional("tokenizer_config.json"), optional("generation_config.json"),
                   optional("config.json"), read_text(jinja) if jinja.is_file() else None,
                   source=f"chat template of {source}", directory=str(directory))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (e.g. by a chat template) become their ids; none are
        added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """An id the tokenizer has no token for (a padded row of the model's embedding table, which
        Qwen models have) decodes to U+FFFD, like an undecodable byte: `tokenizers` would drop it
        without a trace."""
        n = self.tok.get_vocab_size(with_added_tokens=True)  # self.vocab_size
        return "".join(self.tok.decode(list(run), skip_special_tokens=skip_special_tokens) if known
                       else "\ufffd" * len(list(run))
                       for known, run in itertools.groupby(ids, lambda i: 0 <= i < n))

    def check_fits(self, model_vocab_size: int, model: str) -> None:
        """Refuse to feed a model ids its embedding table does not have. A model with more rows than
        the tokenizer has tokens is normal (Qwen3 pads 151,669 tokens to 151,936 rows)."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"{model}: the tokenizer has {self.vocab_size} tokens but the model "
                             f"embeds only {model_vocab_size} (config.json vocab_size): ids "
                             f"{model_vocab_size} and up cannot be embedded; the tokenizer belongs "
                             f"to another model")

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if self.chat_template:
            return _render(self.chat_template, self.template_source, messages=messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "",
                           eos_token=self.eos_token or "", tools=None, documents=None,
                           **self.template_args)
        if self.token_id("<|start_header_id|>") is not None:
            return _llama3(messages, add_generation_prompt, self.bos_token or "<|begin_of_text|>")
        if self.token_id("<|im_start|>") is not None:
            return _chatml(messages, add_generation_prompt)
        raise ValueError("the tokenizer has no chat template and neither Llama 3 "
                         "(<|start_header_id|>) nor ChatML (<|im_start|>) special tokens; add a "
                         "chat_template to tokenizer_config.json")

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def _llama3(messages, add_generation_prompt, bos):
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}"
                    f"<|eot_id|>" for m in messages)
    prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else ""
    return bos + turns + prompt


def _chatml(messages, add_generation_prompt):
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled(template: str, source: str) -> jinja2.Template:
    """A HF chat template compiled as transformers compiles it: sandboxed, trim_blocks and
    lstrip_blocks, `raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII text.
    Compiled once: rendering is then ~100x faster than compiling per prompt."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: syntax error on line {e.lineno}: {e.message}") from None


def _render(template: str, source: str, **variables) -> str:
    """Render a chat template; any error it raises (undefined variables, its own raise_exception,
    a division by zero...) names `source`, the file it came from."""
    compiled = _compiled(template, source)
    try:
        return compiled.render(**variables)
    except Exception as e:
        raise ValueError(f"{source}: {type(e).__name__}: {e}") from None


def save_tokenizer(tokenizer: Tokenizer, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.tok.save(str(out / "tokenizer.json"))
    config = dict(tokenizer.config)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


SPECIAL_TOKENS = ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(texts: list[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE trained on `texts` (any text encodes, nothing is <unk>) with Llama 3 and
    ChatML special tokens: the tokenizer of the tiny models that demos and tests build."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def chat_tokenizer(tok: HFTokenizer) -> Tokenizer:
    """A train_bpe tokenizer with Llama 3's chat roles: <|begin_of_text|>, <|eot_id|> ends a
    turn."""
    return Tokenizer(tok,
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                      "pad_token": "<|endoftext|>"})
