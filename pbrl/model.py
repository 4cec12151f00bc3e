"""A decoder-only Transformer that covers Llama 3.x, Qwen2/2.5 and Qwen3.

Module and parameter names follow Hugging Face's so that a checkpoint's tensors load without renaming: the HF key
of every parameter is ours with a `model.` prefix, except `lm_head.weight` (see pbrl/checkpoint.py).

The three families differ in four switches, all read from config.json:
  - bias on q/k/v (Qwen2) or on q/k/v/o (Llama's and Qwen3's `attention_bias`);
  - RMSNorm over head_dim on q and k, after projection and before RoPE (Qwen3);
  - an explicit head_dim that may differ from hidden_size / num_heads (Qwen3);
  - RoPE frequencies with the 'llama3' long-context scaling (Llama 3.1+).
RoPE uses the half-split ("rotate_half") layout of HF checkpoints, so q/k weights load unpermuted.

Shapes: B batch, T new tokens, S key slots (cached + new), H hidden, V vocab, D head_dim.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import kernels

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_NUMBER = (int, float)


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
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", factor, low/high_freq_factor, original_...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        """Build from a HF config.json dict; reject anything this model would silently compute wrong, and name the
        key of a missing or mistyped value."""
        names = {int: "an integer", _NUMBER: "a number", bool: "true or false", str: "a string", dict: "an object"}

        def get(key, kind, default=...):
            value = cfg.get(key, default)
            if value is ...:
                raise ValueError(f"{where}: missing key {key!r}")
            if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                raise ValueError(f"{where}: {key} must be {names[kind]}, got {value!r}")
            return value

        model_type = get("model_type", str, None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{where}: model_type {model_type!r} is not supported; "
                             f"pbrl supports {SUPPORTED_MODEL_TYPES}")
        act = get("hidden_act", str, "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is")
        if get("mlp_bias", bool, False):
            raise ValueError(f"{where}: mlp_bias=true is not supported")
        if get("use_sliding_window", bool, False):
            raise ValueError(f"{where}: use_sliding_window=true is not supported; set it false (full attention)")
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
        rope = dict(get("rope_parameters", dict, None) or get("rope_scaling", dict, None) or {})
        theta = get("rope_theta", _NUMBER, rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{where}: RoPE type {rope_type!r} is not supported; pbrl supports 'default' and 'llama3'")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ValueError(f"{where}: llama3 RoPE scaling lacks {missing}")
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        bias = get("attention_bias", bool, False)
        return cls(
            model_type=model_type,
            vocab_size=sizes["vocab_size"],
            hidden_size=sizes["hidden_size"],
            intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=get("head_dim", int, None) or sizes["hidden_size"] // heads,
            rms_norm_eps=float(get("rms_norm_eps", _NUMBER, 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=get("max_position_embeddings", int, 2048),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            qkv_bias=bias or model_type == "qwen2",  # Qwen2 always has q/k/v bias and never o bias
            o_bias=bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_hf_config(self, dtype: torch.dtype = torch.float32, backbone: bool = False) -> dict:
        """The config.json that transformers and vLLM read back into the same architecture (a backbone without
        LM head: LlamaModel, Qwen2Model, Qwen3Model)."""
        family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[self.model_type]
        arch = family + ("Model" if backbone else "ForCausalLM")
        cfg = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "qwen2":
            cfg["use_sliding_window"] = False
        return cfg


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """[D/2] inverse frequencies theta^(-2i/D), with Llama 3.1's wavelength-dependent scaling when configured:
    long wavelengths (beyond the original context) are divided by `factor`, short ones kept, and the band
    between interpolated smoothly."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, (1 - smooth) * scaled / s["factor"] + smooth * scaled, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, 1, T, D]. Half-split layout: pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, as the reference implementations do (one fused op
        # for x * rsqrt(mean(x^2) + eps)).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: k[layer], v[layer] are [B, kv_heads, max_len, D].

    Slots are written in order; `forward(..., cache=c, start=s)` writes the T new tokens at slots s..s+T-1 and
    attends over slots 0..s+T-1. With `start` a 1-element tensor (one token per row), it writes that slot and
    attends over all max_len slots under the caller's validity mask: the static shapes of a compiled step."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]

    def rows(self, n: int) -> "KVCache":
        """The first n rows of every layer's keys and values, as views: the same addresses for the same n."""
        view = copy.copy(self)
        view.k, view.v = [k[:n] for k in self.k], [v[:n] for v in self.v]
        return view


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int):
        """mask: None when causal attention is exact (no padding before a real token; or a single query that
        sees every slot), else a boolean [B, 1, T, S] (see attention_mask_4d)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if isinstance(start, torch.Tensor):  # a static decoding step: write slot `start`, attend over every slot
            cache.k[self.layer].index_copy_(2, start, k)
            cache.v[self.layer].index_copy_(2, start, v)
            k, v = cache.k[self.layer], cache.v[self.layer]
        elif cache is not None:
            cache.k[self.layer][:, :, start:start + t] = k
            cache.v[self.layer][:, :, start:start + t] = v
            k, v = cache.k[self.layer][:, :, :start + t], cache.v[self.layer][:, :, :start + t]
        gqa = self.n_kv != self.n_heads
        # Each case in the form a fused kernel accepts (on CUDA): flash attention takes GQA but no mask; the
        # memory-efficient kernel takes a mask but not GQA, so K/V heads are repeated (far smaller than the
        # [B, H, T, S] fp32 scores the math fallback would hold); one decoding query is small on any kernel.
        if mask is None:
            causal = True if t > 1 else False  # a plain bool also when t is symbolic (compiled, dynamic shapes)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        elif t > 1:
            if gqa:
                k, v = (z.repeat_interleave(self.n_heads // self.n_kv, dim=1) for z in (k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


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

    def forward(self, x, cos, sin, mask, cache, start):
        # The compiled body runs inside this module's call, so FSDP's hooks around it (gather, free, reduce) and
        # activation checkpointing work unchanged.
        if self.compiled_forward is not None and cache is None:
            return self.compiled_forward(self, x, cos, sin, mask)
        return block_forward(self, x, cos, sin, mask, cache, start)


def block_forward(block: Block, x, cos, sin, mask, cache=None, start=0):
    """One pre-norm transformer block: x [B, T, H] -> [B, T, H]."""
    x = x + block.self_attn(block.input_layernorm(x), cos, sin, mask, cache, start)
    return x + block.mlp(block.post_attention_layernorm(x))


def pad_rows(rows: list[list[int]], side: str = "left", length: int | None = None,
             pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> ids [B, L] (pad_id in the padding) and mask [B, L] (True on real tokens),
    L = length or the longest row. Left padding puts every row's last token in the same column (prompts, whose next
    token is generated there); right padding puts every first token in column 0."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows) if length is None else length
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = True
    return ids, mask


def attention_mask_4d(valid: torch.Tensor, t: int) -> torch.Tensor:
    """valid [B, S] marks real tokens among the S key slots; the T queries are the last T slots.
    Returns a boolean [B, 1, T, S] mask: causal in slot order, padding keys hidden. A padding query may see
    itself, so that no row of the softmax is empty (its output is never used)."""
    s = valid.shape[1]
    q_slot = torch.arange(s - t, s, device=valid.device)[:, None]
    k_slot = torch.arange(s, device=valid.device)[None, :]
    allowed = (k_slot <= q_slot)[None] & valid[:, None, :]
    return (allowed | (k_slot == q_slot)[None])[:, None]


class Transformer(nn.Module):
    """model(input_ids) -> logits [B, T, V]; other outputs (hidden states, fused token log-probs, values of the
    optional scalar value head used by critics) through forward's `output` argument."""

    def __init__(self, args: ModelArgs, lm_head: bool = True, value_head: bool = False):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False) if lm_head else None
        self.value_head = nn.Linear(args.hidden_size, 1) if value_head else None
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # Recompute each block's activations in backward instead of keeping them (training memory for one
        # block's recomputation; gradients are unchanged).
        self.activation_checkpointing = False
        self.tie_weights()

    def compile_blocks(self, **options) -> None:
        """Run every block's forward without a KV cache (training, scoring, prefill-free passes) through one
        torch.compile of block_forward (dynamic shapes: any batch and length; the blocks share the compiled code):
        norms, RoPE and the MLP's activation fuse into few kernels. Decoding is compiled separately (pbrl.sampler)."""
        compiled = torch.compile(block_forward, dynamic=True, **options)
        for layer in self.layers:
            layer.compiled_forward = compiled

    def tie_weights(self):
        if self.lm_head is not None and self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, start: int = 0,
                output: str = "logits", labels: torch.Tensor | None = None, label_mask: torch.Tensor | None = None,
                temperature: float = 1.0):
        """input_ids [B, T] -> by `output`:
          'logits'   [B, T, V]
          'hidden'   final normed hidden states [B, T, H]
          'logprobs' (log-probs, entropy), each [B, T] fp32, of labels [B, T] under softmax(logits / temperature),
                     through the fused kernel: the [B, T, V] logits are never held. Only positions where
                     label_mask [B, T] is true are computed; the others are 0.
          'values'   [B, T] fp32 from the value head (critics).
        Every output goes through forward, so FSDP's hooks gather the parameters each one uses.

        attention_mask [B, start + T] (1 = real token, 0 = padding) covers the cached slots and the new ones;
        None means no padding. position_ids [B, T] default to the count of real tokens before each slot, so
        left-padded rows get RoPE positions 0, 1, ... from their first real token. cache/start: see KVCache; a
        tensor `start` is a static decoding step (see _backbone)."""
        h = self._backbone(input_ids, attention_mask, position_ids, cache, start)
        if output == "hidden":
            return h
        if output == "values":
            if self.value_head is None:
                raise RuntimeError("this model has no value head; load it with value_head=True")
            return self.value_head(h).squeeze(-1).to(torch.float32, copy=True)  # not a view of FSDP's output
        if self.lm_head is None:
            raise RuntimeError("this model has no LM head (a bare backbone such as an embedding model); "
                               "use output='hidden'")
        if output == "logits":
            return self.lm_head(h)
        if output == "logprobs":
            if labels is None or labels.shape != input_ids.shape:
                raise ValueError(f"output='logprobs' needs labels of shape {list(input_ids.shape)}")
            keep = torch.ones_like(labels, dtype=torch.bool) if label_mask is None else label_mask.bool()
            logp, entropy = kernels.linear_token_logprobs(h[keep], self.lm_head.weight, labels[keep], temperature,
                                                          return_entropy=True)
            out_logp = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
            out_entropy = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
            return out_logp.masked_scatter(keep, logp), out_entropy.masked_scatter(keep, entropy)
        raise ValueError(f"output must be 'logits', 'hidden', 'logprobs' or 'values', got {output!r}")

    def hidden_states(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self(input_ids, output="hidden", **kwargs)

    def values(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self(input_ids, output="values", **kwargs)

    def _backbone(self, input_ids, attention_mask, position_ids, cache, start) -> torch.Tensor:
        b, t = input_ids.shape
        if isinstance(start, torch.Tensor):
            # A static decoding step (pbrl.sampler.decode_step): one token per row written at cache slot `start`
            # (a 1-element tensor), attention over all of the cache's slots with attention_mask [B, max_len] marking
            # the valid ones, positions given: no shape depends on the step and nothing syncs with the host.
            mask, valid = attention_mask[:, None, None, :], None
        elif attention_mask is None:
            valid = torch.ones(b, start + t, dtype=torch.bool, device=input_ids.device)
        else:
            valid = attention_mask.bool()
            if valid.shape != (b, start + t):
                raise ValueError(f"attention_mask must be [B, start + T] = {[b, start + t]}, got {list(valid.shape)}")
        if valid is not None:
            if position_ids is None:
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            # No mask where causal attention alone is exact: no padding before any real token (none at all, or
            # right padding: a real query only sees earlier slots, all real) and the new tokens start at slot 0;
            # or one query that sees every slot. Then the fused kernels run (flash attention on CUDA, GQA
            # included). The check costs one host sync per forward.
            pad_before_token = attention_mask is not None and bool((valid[:, 1:] & ~valid[:, :-1]).any())
            mask = attention_mask_4d(valid, t) if pad_before_token or (t > 1 and start > 0) else None
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start)
        return self.norm(x)


def empty_like(model: Transformer, dtype: torch.dtype, device) -> Transformer:
    """A Transformer of model's architecture and heads (model may be FSDP-sharded) with uninitialised parameters in
    dtype on device, and its RoPE frequencies computed: for copying a model's parameters into."""
    with torch.device("meta"):
        twin = Transformer(model.args, lm_head=model.lm_head is not None, value_head=model.value_head is not None)
    twin.to(dtype).to_empty(device=device)
    twin.tie_weights()
    twin.inv_freq = rope_inv_freq(model.args).to(device)
    return twin.eval()


def random_llama(vocab_size: int, width: int, layers: int, seed: int, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, max_position_embeddings: int = 512) -> Transformer:
    """A small Llama-config model with N(0, 0.02) weights, unit norms and tied embeddings (demo and toy models)."""
    args = ModelArgs(vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, rope_theta=10000.0,
                     max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                     bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, param in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(param, std=0.02)
    return model
