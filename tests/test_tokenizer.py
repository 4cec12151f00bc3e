"""Chat formatting against transformers' apply_chat_template (the oracle) on the same tokenizer and template."""
import json

import pytest

from conftest import build_tokenizer
from pbrl.tokenizer import Tokenizer

# Written for these tests in the shape of the real templates: each inserts a default system prompt when the
# conversation has none, and uses the filters and globals real templates use.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# What the hand-written fallbacks promise to equal.
PLAIN_LLAMA3 = ("{{- bos_token }}{%- for m in messages %}"
                "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + "
                "'<|eot_id|>' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                "{%- endif %}")
PLAIN_CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

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


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, CHATML_TEMPLATE])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    oracle = transformers_tokenizer(template)
    ours = Tokenizer(build_tokenizer(), {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                         "chat_template": template})
    text = ours.apply_chat_template(messages, add_generation_prompt)
    assert text == oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    encoded = oracle.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    expected_ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # transformers 5: a BatchEncoding
    assert ours.encode_chat(messages, add_generation_prompt) == list(expected_ids)


@pytest.mark.parametrize("template,token", [(PLAIN_LLAMA3, "<|start_header_id|>"), (PLAIN_CHATML, "<|im_start|>")])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_fallback_formats_match_their_templates(template, token, conversation):
    """Tokenizers without a template fall back to a hand-written format, picked by special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    messages = CONVERSATIONS[conversation]
    tok = build_tokenizer()
    if token == "<|im_start|>":  # a ChatML-only vocabulary
        vocab = {t: i for t, i in tok.get_vocab().items() if "header" not in t and "begin_of" not in t}
        tok = HFTokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(sorted(vocab))}, unk_token="<|im_end|>"))
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
    assert tok.apply_chat_template(CONVERSATIONS["no-system"]).startswith("<|im_start|>system\nYou are Qwen")
    text = "Die Antwort lautet 7."
    assert tok.decode(tok.encode(text)) == text


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
