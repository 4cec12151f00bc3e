"""Tiny artifacts built from nothing: a byte-level BPE tokenizer and a random Llama-config model, saved as a real
HF model directory. They let every entry point run with no download."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pbrl.checkpoint import save_model
from pbrl.model import ModelArgs, Transformer
from pbrl.tokenizer import Tokenizer, save_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|im_start|>", "<|im_end|>"]
SAMPLE_TEXT = ["Janet has 3 apples and buys 5 more. How many apples does she have? The answer is 8.",
               "Janet hat 3 Äpfel und kauft 5 weitere. Wie viele Äpfel hat sie? Die Antwort lautet 8.",
               "Janet a 3 pommes et en achète 5 de plus. Combien de pommes a-t-elle ? La réponse est 8.",
               "Janet ana tufaha 3 na ananunua 5 zaidi. Ana tufaha ngapi? Jibu ni 8.",
               "You are a helpful assistant.", "system", "user", "assistant"]


def train_tokenizer(texts: list[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (any text encodes, nothing is <unk>) with Llama 3 and ChatML special tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def build_random_model(out_dir, seed: int = 0) -> Path:
    """A ~1M-parameter random Llama 3 model with the sample-text tokenizer, as a HF directory (cached)."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    tok = Tokenizer(train_tokenizer(SAMPLE_TEXT * 4, vocab_size=512),
                    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>"})
    args = ModelArgs(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                     max_position_embeddings=1024, tie_word_embeddings=True,
                     bos_token_id=tok.token_id("<|begin_of_text|>"), eos_token_id=tok.eos_id)
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02)
    save_tokenizer(tok, out)
    save_model(model, out)
    return out
