"""Chat formatting against transformers' apply_chat_template (the oracle) on the same tokenizer and
template."""
import json

import pytest

from conftest import REAL_TEMPLATE, build_tokenizer
from pbrl.tokenizer import Tokenizer

# Written for these tests in the shape of the real templates: each inserts a default system prompt
# when the conversation has none, and uses the filters and globals real templates use.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = "
    "messages[0]['content'] | trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system = "
    "'You are a helpful assistant.' %}{%- endif %}{{- "
    "'<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}{%- for m in "
    "messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | "
    "trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# What the hand-written fallbacks promise to equal.
PLAIN_LLAMA3 = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + "
                "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- "
                "if add_generation_prompt %}{{- "
                "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
PLAIN_CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + "
                "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- "
                "'<|im_start|>assistant\\n' }}{%- endif %}")

CONVERSATIONS = {
    "no-system": [{"role": "user", "content": "Janet has 3 apples. How many?"}],
    "system": [{"role": "system", "content": "Answer in German."},
               {"role": "user", "content": "Wie viele Äpfel hat Janet?"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
                   {"role": "user", "content": "The answer is?"}],
}


def transformers_tokenizer(template, bos="<|begin_of_text|>", eos="<|eot_id|>"):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token=bos, eos_token=eos,
                                   chat_template=template)


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, CHATML_TEMPLATE, REAL_TEMPLATE])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    oracle = transformers_tokenizer(template)
    ours = Tokenizer(build_tokenizer(),
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                         "chat_template": template})
    text = ours.apply_chat_template(messages, add_generation_prompt)
    assert text == oracle.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    encoded = oracle.apply_chat_template(messages, tokenize=True,
                                         add_generation_prompt=add_generation_prompt)
    # transformers 5: a BatchEncoding
    expected_ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert ours.encode_chat(messages, add_generation_prompt) == list(expected_ids)


@pytest.mark.parametrize("template,token",
                         [(PLAIN_LLAMA3, "<|start_header_id|>"), (PLAIN_CHATML, "<|im_start|>")])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_fallback_formats_match_their_templates(template, token, conversation):
    """Tokenizers without a template fall back to a hand-written format, picked by special
    tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    messages = CONVERSATIONS[conversation]
    tok = build_tokenizer()
    if token == "<|im_start|>":  # a ChatML-only vocabulary
        vocab = {t: i for t, i in tok.get_vocab().items()
                 if "header" not in t and "begin_of" not in t}
        tok = HFTokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(sorted(vocab))},
                                           unk_token="<|im_end|>"))
    ours = Tokenizer(tok, {"bos_token": "<|begin_of_text|>"})
    expected = transformers_tokenizer(template).apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected


def test_no_template_and_no_known_special_tokens_is_an_error():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    ours = Tokenizer(HFTokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "a"}])


def test_bad_message_is_an_error():
    ours = Tokenizer(build_tokenizer())
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        ours.apply_chat_template([{"text": "hi"}])


def test_from_pretrained_reads_stop_ids_from_every_config(tmp_path):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|eot_id|>"}, "pad_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 4]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 6}))
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tok = Tokenizer.from_pretrained(tmp_path)
    eot, eos_text = tok.token_id("<|eot_id|>"), tok.token_id("<|endoftext|>")
    assert tok.stop_ids == [eot, 0, 6] and eot == 4 and eos_text == 0
    assert tok.eos_id == eot and tok.pad_id == eos_text
    rendered = tok.apply_chat_template(CONVERSATIONS["no-system"])
    assert rendered.startswith("<|im_start|>system\nYou are Qwen")
    text = "Die Antwort lautet 7."
    assert tok.decode(tok.encode(text)) == text


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_real_template_raises_its_own_exception_naming_the_file(tmp_path):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": REAL_TEMPLATE}))
    tok = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError,
                       match=r"tokenizer_config.json: TemplateError: Conversation roles must "
                             r"alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"},
                                 {"role": "user", "content": "b"}])


@pytest.mark.parametrize("template,message", [
    ("{{ bos_token }}\n{% for m in messages %}{{ m.content }",
     r"chat_template.jinja: syntax error on line 2"),
    ("{{ messages[0].content + undefined_thing.name }}",
     r"chat_template.jinja: UndefinedError: 'undefined_thing'"),
])
def test_broken_template_names_its_file(tmp_path, template, message):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        tok.encode_chat([{"role": "user", "content": "a"}])


def test_invalid_tokenizer_json_and_config_name_their_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json:1: not UTF-8 text"):
        Tokenizer.from_pretrained(tmp_path)


def test_ids_outside_the_tokenizer_decode_visibly():
    """A model's padded embedding rows have no token; tokenizers alone drops them without a
    trace."""
    tok = Tokenizer(build_tokenizer())
    ids = tok.encode("The answer is 42.")
    padded_id = tok.vocab_size + 5
    assert tok.decode(ids[:2] + [padded_id] + ids[2:]) == \
        tok.decode(ids[:2]) + "\ufffd" + tok.decode(ids[2:])
    assert tok.decode(ids) == "The answer is 42."


def test_tokenizer_larger_than_the_model_is_refused():
    tok = Tokenizer(build_tokenizer())
    tok.check_fits(tok.vocab_size, "m")  # equal, and a model with padded rows, are fine
    tok.check_fits(tok.vocab_size + 64, "m")
    with pytest.raises(ValueError,
                       match=rf"m: the tokenizer has {tok.vocab_size} tokens but the model embeds "
                             rf"only {tok.vocab_size - 1}"):
        tok.check_fits(tok.vocab_size - 1, "m")


# The shape of Qwen3's generation prompt: an empty reasoning block when thinking is switched off.
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' "
    "}}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if "
    "enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' "
    "}}{%- endif %}{%- endif %}")


def test_thinking_is_off_unless_asked():
    messages = CONVERSATIONS["no-system"]
    oracle = transformers_tokenizer(THINKING_TEMPLATE, eos="<|im_end|>")
    ours = Tokenizer(build_tokenizer(), {"chat_template": THINKING_TEMPLATE})
    off = ours.apply_chat_template(messages)
    assert off.endswith("<think>\n\n</think>\n\n")
    assert off == oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    ours.template_args["enable_thinking"] = True
    assert ours.apply_chat_template(messages) == oracle.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
