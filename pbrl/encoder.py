"""Encoder sentence embedders, hand-written: BERT and XLM-RoBERTa (LaBSE, multilingual-e5, BGE-M3,
paraphrase-multilingual-mpnet's kin), loaded from a Hugging Face / sentence-transformers directory.

Post-norm blocks: x = LayerNorm(x + Attention(x)), x = LayerNorm(x + FFN(x)), bidirectional
attention over the real tokens (padding masked), learned absolute positions (XLM-RoBERTa counts
them from pad_token_id + 1 and skips padding, as fairseq did), token types (all 0: one segment),
exact (erf) GELU. The parameters carry Hugging Face's names, so a checkpoint loads by name (with or
without a `bert.` / `roberta.` prefix; the pooler, which sentence embedders do not use, is
skipped). pbrl/rewards.py's Embedder pools and normalises what `forward` returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pbrl.checkpoint import _open, read_tensors, weight_files
from pbrl.files import read_json

ENCODERS = ("bert", "xlm-roberta")  # config.json's model_type of the encoders pbrl reads


@dataclass
class EncoderArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "EncoderArgs":
        if cfg.get("model_type") not in ENCODERS:
            raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} is not an encoder "
                             f"pbrl reads ({', '.join(ENCODERS)})")
        unsupported = {"hidden_act": (cfg.get("hidden_act", "gelu"), "gelu"),
                       "position_embedding_type":
                           (cfg.get("position_embedding_type", "absolute"), "absolute")}
        for key, (value, ours) in unsupported.items():
            if value != ours:
                raise ValueError(f"{where}: {key} {value!r}; pbrl's encoder implements {ours!r}")
        try:
            return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None

    def parameter_count(self) -> int:
        """Weights and biases (the pooler not counted: it is not loaded)."""
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h
        block = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
        return embeddings + 2 * h + n * block


class SelfAttention(nn.Module):
    def __init__(self, a: EncoderArgs):
        super().__init__()
        self.heads = a.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(a.hidden_size, a.hidden_size)
                                            for _ in range(3))

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for f in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return out.transpose(1, 2).reshape(b, t, -1)


class Dense(nn.Module):
    """A projection, then (with its residual) the post-norm: HF's `*.output` modules."""

    def __init__(self, inputs: int, a: EncoderArgs):
        super().__init__()
        self.dense = nn.Linear(inputs, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, a: EncoderArgs):
        super().__init__()
        self.self = SelfAttention(a)
        self.output = Dense(a.hidden_size, a)


class Intermediate(nn.Module):
    def __init__(self, a: EncoderArgs):
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.intermediate_size)


class Layer(nn.Module):
    def __init__(self, a: EncoderArgs):
        super().__init__()
        self.attention, self.intermediate = Attention(a), Intermediate(a)
        self.output = Dense(a.intermediate_size, a)

    def forward(self, x, mask):
        x = self.attention.output(self.attention.self(x, mask), x)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class Embeddings(nn.Module):
    def __init__(self, a: EncoderArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)


class Encoder(nn.Module):
    """ids [B, T] (right padded), mask [B, T] bool -> the last layer's hidden states [B, T, H]."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """BERT: 0, 1, 2, ...; XLM-RoBERTa: pad_token_id + 1, + 2, ... over the real tokens."""
        if self.args.model_type == "bert":
            return torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return torch.cumsum(mask.long(), 1) * mask + self.args.pad_token_id

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(self.positions(mask)) + \
            e.token_type_embeddings(torch.zeros_like(ids))
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def is_encoder(directory: Path) -> bool:
    config = Path(directory) / "config.json"
    return config.is_file() and read_json(config).get("model_type") in ENCODERS


def load_encoder(directory, dtype: torch.dtype | None = None, device=None) -> Encoder:
    """An Encoder from a HF directory: each expected tensor by name (a `bert.`/`roberta.` prefix
    dropped, the pooler skipped), checked as checkpoint.read_tensors checks a decoder's; a
    missing one is an error."""
    directory = Path(directory)
    args = EncoderArgs.from_hf_config(read_json(directory / "config.json"),
                                      where=str(directory / "config.json"))
    with torch.device("meta"):
        model = Encoder(args)
    expected = dict(model.state_dict())

    def ours(stored: str) -> str:
        return stored.removeprefix("bert.").removeprefix("roberta.")
    files = weight_files(directory)
    missing = sorted(set(expected) - {ours(name) for name in files})
    if missing:
        raise KeyError(f"{directory}: not a {args.model_type} checkpoint pbrl can read; missing "
                       f"tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    state = read_tensors(files, expected, dtype, device, None, ours)
    model.load_state_dict(state, assign=True)
    return model.eval()


# sentence-transformers' modules after the pooling, by modules.json's "type"
DENSE = "sentence_transformers.models.Dense"
KNOWN_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                 DENSE, "sentence_transformers.models.Normalize")
ACTIVATIONS = {"torch.nn.modules.activation.Tanh": torch.tanh,
               "torch.nn.modules.linear.Identity": lambda x: x}


class DenseHead(nn.Module):
    """sentence-transformers' Dense module (LaBSE's 768 -> 768 tanh after the CLS pooling)."""

    def __init__(self, linear: nn.Linear, activation):
        super().__init__()
        self.linear, self.activation = linear, activation

    def forward(self, x):
        return self.activation(self.linear(x))


def dense_configs(directory) -> list[tuple[Path, dict]]:
    """The Dense modules a sentence-transformers directory applies after pooling, by its
    modules.json: each one's directory and config.json (a Normalize changes no cosine); a module of
    another type, or an activation pbrl does not implement, is refused."""
    directory = Path(directory)
    if not (directory / "modules.json").is_file():
        return []
    modules = read_json_list(directory / "modules.json")
    unknown = [m.get("type") for m in modules if m.get("type") not in KNOWN_MODULES]
    if unknown:
        raise ValueError(f"{directory / 'modules.json'}: pbrl's embedder applies "
                         f"{', '.join(t.rsplit('.', 1)[-1] for t in KNOWN_MODULES)}; this one "
                         f"also asks for {unknown[0]}")
    out = []
    for m in modules:
        if m["type"] == DENSE:
            where = directory / m["path"]
            cfg = read_json(where / "config.json")
            if cfg.get("activation_function") not in ACTIVATIONS:
                raise ValueError(f"{where / 'config.json'}: activation "
                                 f"{cfg.get('activation_function')!r}; pbrl implements "
                                 f"{', '.join(ACTIVATIONS)}")
            out.append((where, cfg))
    return out


def after_pooling(directory, dtype=None, device=None) -> list[nn.Module]:
    """The Dense modules (dense_configs) with their weights, in the order they apply."""
    out = []
    for where, cfg in dense_configs(directory):
        linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
        with _open(where / "model.safetensors") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
        out.append(DenseHead(linear, ACTIVATIONS[cfg["activation_function"]])
                   .to(device=device, dtype=dtype))
    return out


def read_json_list(path: Path) -> list[dict]:
    import json
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, list) or not all(isinstance(m, dict) and "type" in m for m in value):
        raise ValueError(f"{path}: expected a list of modules, each with a 'type'")
    return value
