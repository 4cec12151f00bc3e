"""A decoder-only Transformer that covers Llama 3.x, Qwen2/2.5 and Qwen3.

Parameter names are Hugging Face's without the leading `model.` (`lm_head.weight` has none in
either), so checkpoints load without a renaming table (pbrl/checkpoint.py). The families differ in
four switches read from config.json: q/k/v bias (Qwen2) or q/k/v/o bias (`attention_bias`); RMSNorm
over head_dim on q and k before RoPE (Qwen3); an explicit head_dim (Qwen3); Llama 3.1's long-context
RoPE scaling. RoPE uses the half-split ("rotate_half") layout of HF checkpoints, so q/k weights load
unpermuted.

One forward, and an attention function per use:
  training, scoring  rows right padded: causal attention, no mask, so the fused kernels run
  prefill            the sampler's right-padded prompts: causal, keys and values written to a cache
  decode             one token per row at its own position, over the cache's slots up to it
  packed             sequences concatenated into one row: each over its own tokens up to itself
                     (document_causal)

Shapes: B batch, T tokens, S cache slots, H hidden, V vocab, D head_dim.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import flex_attention as fa
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from pbrl import kernels

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_NUMBER = (int, float)
_KINDS = {int: "an integer", _NUMBER: "a number", bool: "true or false", str: "a string",
          dict: "an object"}


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", factor, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        """From a HF config.json dict; whatever this model would compute wrong is refused, naming
        the key."""
        get = _getter(cfg, where)
        model_type = get("model_type", str, None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported; "
                             f"pbrl supports {SUPPORTED_MODEL_TYPES}")
        _refuse_unsupported(get, where)
        sizes = {key: get(key, int) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads")}
        bad = [k for k, v in sizes.items() if v < (0 if k == "num_hidden_layers" else 1)]
        if bad:
            raise ValueError(f"{where}: {bad[0]} must be > 0, got {sizes[bad[0]]}")
        heads = sizes["num_attention_heads"]
        kv_heads = get("num_key_value_heads", int, None) or heads
        if heads % kv_heads:
            raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        theta, scaling = _rope(get, where)
        bias = get("attention_bias", bool, False)
        return cls(
            model_type=model_type, **sizes,
            num_key_value_heads=kv_heads,
            head_dim=get("head_dim", int, None) or sizes["hidden_size"] // heads,
            rms_norm_eps=float(get("rms_norm_eps", _NUMBER, 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=get("max_position_embeddings", int, 2048),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            qkv_bias=bias or model_type == "qwen2",  # Qwen2: always q/k/v bias, never o bias
            o_bias=bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_hf_config(self, dtype: torch.dtype = torch.float32, backbone: bool = False) -> dict:
        """The config.json transformers and vLLM read back into the same architecture (a backbone
        without LM head: LlamaModel, Qwen2Model, Qwen3Model)."""
        family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[self.model_type]
        cfg = {"architectures": [family + ("Model" if backbone else "ForCausalLM")],
               "model_type": self.model_type, "hidden_act": "silu",
               "attention_bias": self.o_bias, "torch_dtype": str(dtype).removeprefix("torch.")}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                    "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id"):
            cfg[key] = getattr(self, key)
        if self.model_type == "qwen2":
            cfg["use_sliding_window"] = False
        return cfg


def _getter(cfg: dict, where: str):
    """get(key, kind, default) of a config.json dict: a missing or mistyped value names its key."""
    def get(key, kind, default=...):
        value = cfg.get(key, default)
        if value is ...:
            raise ValueError(f"{where}: missing key {key!r}")
        wrong_bool = kind is not bool and isinstance(value, bool)
        if value is not None and (not isinstance(value, kind) or wrong_bool):
            raise ValueError(f"{where}: {key} must be {_KINDS[kind]}, got {value!r}")
        return value
    return get


def _refuse_unsupported(get, where: str) -> None:
    act = get("hidden_act", str, "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")
    if get("mlp_bias", bool, False):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if get("use_sliding_window", bool, False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported; set it false "
                         f"(full attention)")


def _rope(get, where: str) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from `rope_parameters` (newer files) or the legacy fields."""
    rope = dict(get("rope_parameters", dict, None) or get("rope_scaling", dict, None) or {})
    theta = get("rope_theta", _NUMBER, rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{where}: RoPE type {rope_type!r} is not supported; pbrl supports "
                         f"'default' and 'llama3'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
        raise ValueError(f"{where}: llama3 RoPE scaling lacks {missing}")
    return theta, {"rope_type": "llama3", **{k: rope[k] for k in keys}}


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """[D/2] inverse frequencies theta^(-2i/D), with Llama 3.1's scaling when configured:
    wavelengths beyond the original context are divided by `factor`, short ones kept, the band
    between smoothed."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, (1 - smooth) * scaled / s["factor"] + smooth * scaled, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B or 1, 1, T, D]. Half-split layout: pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal(layer: int, q, k, v) -> torch.Tensor:
    """Attention of each query over itself and the keys before it. With right padding (or none) this
    is exact for every real token without a mask, the form in which flash attention takes GQA."""
    is_causal = True if q.shape[2] > 1 else False  # a plain bool even when the length is symbolic
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def document_causal(docs: torch.Tensor, prefix: torch.Tensor | None = None,
                    flex: bool | None = None):
    """The attention of sequences packed into one row, docs [T] numbering each token's sequence
    0, 1, ... in order: each token attends to its own sequence's tokens up to itself, and to all of
    sequence prefix[t] (-1: none; an earlier sequence: a prompt its samples share). FlexAttention
    with a block mask (on CUDA, the default there: compiled into one fused kernel that skips the
    blocks no token sees), else SDPA over each sequence's slice (a dense [T, T] mask would compute
    every pair)."""
    prefix = torch.full_like(docs, -1) if prefix is None else prefix
    if docs.is_cuda if flex is None else flex:
        t = len(docs)
        blocks = fa.create_block_mask(
            lambda b, h, q, k: ((docs[q] == docs[k]) & (q >= k)) | (prefix[q] == docs[k]), None,
            None, t, t, device=docs.device)
        def attend(layer, q, k, v):  # inside a compiled block, dynamo compiles flex itself
            fused = q.is_cuda and not torch.compiler.is_compiling()
            attention = compiled_flex_attention() if fused else fa.flex_attention
            return attention(q, k, v, block_mask=blocks, enable_gqa=q.shape[1] != k.shape[1])
        return attend
    ends = torch.unique_consecutive(docs, return_counts=True)[1].cumsum(0).tolist()
    spans = list(zip([0, *ends[:-1]], ends))
    seen = [(spans[p] if p >= 0 else (0, 0)) for p in prefix[[a for a, _ in spans]].tolist()]
    return lambda layer, q, k, v: torch.cat(
        [prefixed_causal(layer, q[:, :, a:b], k, v, a, b, *p) for (a, b), p in zip(spans, seen)],
        dim=2)


def prefixed_causal(layer: int, q, k, v, a: int, b: int, pa: int, pb: int) -> torch.Tensor:
    """The queries of slice a:b over the keys of slice pa:pb (all of them) and of a:b (causally)."""
    if pa == pb:
        return causal(layer, q, k[:, :, a:b], v[:, :, a:b])
    keys, values = (torch.cat((x[:, :, pa:pb], x[:, :, a:b]), dim=2) for x in (k, v))
    seen = torch.arange(pb - pa + b - a, device=q.device) <= \
        torch.arange(pb - pa, pb - pa + b - a, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=seen,
                                          enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q, keys, values, positions) -> torch.Tensor:
    """One query per row, q [B, heads, 1, D], over its row's cache slots 0..positions[b]: on CUDA
    the Triton kernel, which reads only those (kernels.decode_attention), elsewhere masked SDPA
    over every slot of the cache it is given."""
    if triton_decoding(q):
        return kernels.decode_attention(q[:, :, 0], keys, values, positions + 1)[:, :, None]
    seen = torch.arange(keys.shape[2], device=q.device) <= positions[:, None, None, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=seen,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def triton_decoding(q: torch.Tensor) -> bool:
    return q.is_cuda and kernels.dispatch.triton is not None


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process (uncompiled it runs unfused)."""
    return torch.compile(fa.flex_attention)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 and cast back before the scale, as the reference implementations do.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class KVCache:
    """Keys and values of every layer, k[layer] and v[layer] [B, kv_heads, S, D]: row b's token at
    position p is stored in slot p."""

    def __init__(self, args: ModelArgs, rows: int, slots: int, dtype: torch.dtype, device):
        shape = (rows, args.num_key_value_heads, slots, args.head_dim)
        layers = range(args.num_hidden_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]

    def upto(self, slots: int) -> "KVCache":
        """Slots 0..slots - 1 of every layer, as views."""
        return self._view((slice(None), slice(None), slice(slots)))

    def rows(self, n: int) -> "KVCache":
        """The first n rows of every layer, as views: the same addresses for the same n."""
        return self._view(slice(n))

    def _view(self, index) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[index] for k in self.k], [v[index] for v in self.v]
        return view


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.head_dim = layer, args.head_dim
        h, d = args.hidden_size, args.head_dim
        heads, kv = args.num_attention_heads, args.num_key_value_heads
        self.q_proj = nn.Linear(h, heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, kv * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, kv * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(heads * d, h, bias=args.o_bias)
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None

    def forward(self, x, cos, sin, attend):
        """x [B, T, H] -> [B, T, H]; attend(layer, q, k, v) [B, heads, T, D] is the attention
        proper."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return self.o_proj(attend(self.layer, q, k, v).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)
        self.compiled_forward = None  # set by Transformer.compile_blocks

    def forward(self, x, cos, sin, attend):
        # Run inside this module's call, so FSDP's hooks and activation checkpointing wrap either
        # body.
        if self.compiled_forward is not None and attend is causal:
            return self.compiled_forward(self, x, cos, sin, attend)
        return block_forward(self, x, cos, sin, attend)


def block_forward(block: Block, x, cos, sin, attend):
    """One pre-norm transformer block: x [B, T, H] -> [B, T, H]."""
    x = x + block.self_attn(block.input_layernorm(x), cos, sin, attend)
    return x + block.mlp(block.post_attention_layernorm(x))


def pad_rows(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ids [B, L] right padded with pad_id, and mask [B, L] (True on real tokens)."""
    ids = pad_sequence([torch.tensor(row, dtype=torch.long) for row in rows], batch_first=True,
                       padding_value=pad_id)
    return ids, torch.arange(ids.shape[1]) < torch.tensor([len(row) for row in rows])[:, None]


class Transformer(nn.Module):
    """model(input_ids) -> logits [B, T, V]; fused token log-probs, values (of the scalar head
    critics have) or hidden states through forward's `output`; prefill and decode for the
    sampler."""

    def __init__(self, args: ModelArgs, lm_head: bool = True, value_head: bool = False):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False) if lm_head else None
        self.value_head = nn.Linear(args.hidden_size, 1) if value_head else None
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # Recompute each block in backward instead of keeping its activations (same gradients).
        self.activation_checkpointing = False
        self.tie_weights()

    def tie_weights(self):
        if self.lm_head is not None and self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def compile_blocks(self, **options) -> None:
        """Every block's causal forward through one torch.compile of block_forward (dynamic shapes,
        shared by all blocks): norms, RoPE and the MLP's activation fuse. Decoding compiles apart
        (pbrl/cudagraphs.py)."""
        compiled = torch.compile(block_forward, dynamic=True, **options)
        for layer in self.layers:
            layer.compiled_forward = compiled

    def forward(self, input_ids: torch.Tensor, output: str = "logits", labels=None, label_mask=None,
                temperature: float = 1.0, positions=None, attend=causal):
        """input_ids [B, T] (right padded, or not padded) -> by `output`:
          'logits'   [B, T, V]
          'hidden'   final normed hidden states [B, T, H]
          'logprobs' (log-probs, entropies) [B, T] fp32 of labels [B, T] under
                     softmax(logits / temperature), by the fused kernel (the logits are never
                     held); 0 where label_mask [B, T] is False
          'values'   [B, T] fp32 from the value head
        positions [B or 1, T] (default 0..T-1) set RoPE's angles; attend(layer, q, k, v) is the
        attention (prefill and decode bring theirs). Every use goes through forward, whose FSDP
        hooks gather."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = self.norm(self._blocks(input_ids, positions, attend))
        if self.lm_head is None and output in ("logits", "logprobs"):
            raise RuntimeError("this model has no LM head (a bare backbone, e.g. an embedder)")
        if output == "hidden":
            return h
        if output == "values":  # (a LoRA critic's head is fp32 on a base of the compute dtype)
            # not a view of FSDP's output
            head = self.value_head
            return head(h.to(head.weight.dtype)).squeeze(-1).to(torch.float32, copy=True)
        if output == "logits":
            return self.lm_head(h)
        if output == "logprobs":
            keep = torch.ones_like(labels,
                                   dtype=torch.bool) if label_mask is None else label_mask.bool()
            logp, entropy = kernels.linear_token_logprobs(h[keep], self.lm_head.weight,
                                                          labels[keep], temperature)
            zeros = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
            return zeros.masked_scatter(keep, logp), zeros.masked_scatter(keep, entropy)
        raise ValueError(f"output must be 'logits', 'hidden', 'logprobs' or 'values', got "
                         f"{output!r}")

    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prompts [B, T] (right padded) -> hidden states [B, T, H]; their keys and values fill the
        cache's slots 0..T-1 (a padding slot is written over by the row's first decoded token)."""
        t = input_ids.shape[1]

        def attend(layer, q, k, v):
            cache.k[layer][:, :, :t] = k
            cache.v[layer][:, :, :t] = v
            return causal(layer, q, k, v)
        return self(input_ids, output="hidden", attend=attend)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row: ids [B] at positions [B] (also their cache slots) -> logits [B, V].
        Row b attends to slots 0..positions[b]. No shape depends on the step: compiled, it is one
        CUDA graph."""
        rows = torch.arange(len(ids), device=ids.device)

        def attend(layer, q, k, v):  # q, k, v [B, heads, 1, D]
            keys, values = cache.k[layer], cache.v[layer]
            keys[rows, :, positions], values[rows, :, positions] = k[:, :, 0], v[:, :, 0]
            return decode_attention(q, keys, values, positions)
        return self(ids[:, None], positions=positions[:, None], attend=attend)[:, 0]

    def _blocks(self, input_ids, positions, attend) -> torch.Tensor:
        """The embeddings through every block; positions [B or 1, T] set RoPE's angles."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        x = self.embed_tokens(input_ids)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, attend, use_reentrant=False) if recompute else \
                layer(x, cos, sin, attend)
        return x


def empty_like(model: Transformer, dtype: torch.dtype, device) -> Transformer:
    """A Transformer of model's architecture and heads (model may be sharded), with uninitialised
    parameters in dtype on device and its RoPE frequencies computed: to copy a model's parameters
    into."""
    with torch.device("meta"):
        twin = Transformer(model.args, lm_head=model.lm_head is not None,
                           value_head=model.value_head is not None)
    twin.to(dtype).to_empty(device=device)
    twin.tie_weights()
    twin.inv_freq = rope_inv_freq(model.args).to(device)
    return twin.eval()


def random_llama(vocab_size: int, width: int, layers: int, seed: int,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 max_position_embeddings: int = 512) -> Transformer:
    """A small Llama-config model with N(0, 0.02) weights, unit norms and tied embeddings (demo,
    toy)."""
    args = ModelArgs(vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=width // 4, rope_theta=10000.0,
                     max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                     bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, param in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(param, std=0.02)
    return model
