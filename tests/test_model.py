"""Logit parity with transformers' own implementations, loaded through pbrl's checkpoint loader."""
import pytest
import torch

from conftest import save_hf_model
from pbrl.checkpoint import load_model
from pbrl.model import ModelArgs, Transformer

CASES = {
    "llama3-gqa-untied": ("llama", {}),
    "llama3-gqa-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-attention-bias": ("llama", {"attention_bias": True, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0}}),
    "qwen2-qkv-bias": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-head-dim": ("qwen3", {"tie_word_embeddings": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    family, overrides = CASES[case]
    ref = save_hf_model(tmp_path, family, **overrides)
    ours = load_model(tmp_path)
    # 96 tokens > original_max_position_embeddings (32) of the llama3 cases, so the RoPE scaling
    # matters.
    x = torch.randint(0, 320, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
    assert (expected - got).abs().max().item() <= 1e-4


def test_right_padding_matches_unpadded(tmp_path):
    """A row right padded to a longer one's length gives, at its real tokens, transformers' logits
    of the row alone: causal attention alone keeps padding out of every real token's view."""
    ref = save_hf_model(tmp_path, "qwen3")
    ours = load_model(tmp_path)
    short, long = torch.randint(0, 320, (1, 9)), torch.randint(0, 320, (1, 14))
    padded = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1), long])
    with torch.no_grad():
        alone = ref(short).logits
        got = ours(padded)[:1, :9]
    assert (alone - got).abs().max().item() <= 1e-4


def test_llama3_scaling_changes_long_range_frequencies():
    """The llama3 rule (hand derivation): wavelengths shorter than old_len/high_freq_factor are
    untouched, longer than old_len/low_freq_factor are divided by factor."""
    import math
    from pbrl.model import rope_inv_freq
    base = ModelArgs(head_dim=64, rope_theta=500000.0)
    scaled = ModelArgs(head_dim=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    f0, f1 = rope_inv_freq(base), rope_inv_freq(scaled)
    wavelen = 2 * math.pi / f0
    short, long = wavelen < 8192 / 4, wavelen > 8192
    assert torch.equal(f1[short], f0[short])
    assert torch.allclose(f1[long], f0[long] / 8)
    assert short.any() and long.any()


def test_value_head_and_hidden_states(llama_dir):
    critic = load_model(llama_dir, value_head=True)
    x = torch.randint(0, 320, (2, 7))
    with torch.no_grad():
        h = critic(x, output="hidden")
        assert h.shape == (2, 7, 64)
        assert torch.allclose(critic.lm_head(h), critic(x))
        # a fresh head starts at zero
        assert torch.equal(critic(x, output="values"), torch.zeros(2, 7))
        critic.value_head.weight.fill_(1.0)
        assert torch.allclose(critic(x, output="values"), h.sum(-1) + critic.value_head.bias)


@pytest.mark.parametrize("cfg,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "RoPE type 'yarn'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "llama", "num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_unsupported_configs_are_clear_errors(cfg, message):
    full = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 4, **cfg}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelArgs.from_hf_config(full)


def test_rope_parameters_and_legacy_rope_fields_agree():
    legacy = ModelArgs.from_hf_config({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                       "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2,
                                       "rope_theta": 500000.0, "rope_scaling": {
                                           "rope_type": "llama3", "factor": 32.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}})
    new = ModelArgs.from_hf_config({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                    "intermediate_size": 16, "num_hidden_layers": 1,
                                    "num_attention_heads": 2,
                                    "rope_parameters": {"rope_type": "llama3",
                                                        "rope_theta": 500000.0,
                                                        "factor": 32.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}})
    assert legacy == new and new.rope_theta == 500000.0 and new.rope_scaling["factor"] == 32.0


def test_fused_logprobs_output_matches_log_softmax_of_logits(llama_dir):
    model = load_model(llama_dir)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 320, (3, 10), generator=g)
    labels = torch.randint(0, 320, (3, 10), generator=g)
    keep = torch.rand(3, 10, generator=g) > 0.3
    logp, entropy = model(x, output="logprobs", labels=labels, label_mask=keep, temperature=0.7)
    with torch.no_grad():
        full = (model(x) / 0.7).log_softmax(-1)
    expected = full.gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(logp[keep], expected[keep], atol=1e-5) and (logp[~keep] == 0).all()
    assert torch.allclose(entropy[keep], -(full.exp() * full).sum(-1)[keep], atol=1e-4)
    logp.sum().backward()  # gradients reach the backbone through the fused kernel
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output must be"):
        model(x, output="probs")


@pytest.mark.parametrize("output", ["logprobs", "values"])
def test_activation_checkpointing_gives_identical_gradients(output):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64, qk_norm=True)
    model = Transformer(args, value_head=True)
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False  # right padding in one row
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            out = model(ids, output=output, labels=ids.roll(-1, 1), label_mask=mask) \
                if output == "logprobs" else model(ids, output=output)
        loss = out[0].sum() + out[1].sum() if output == "logprobs" else out.sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["saved"] = sum(saved)
    # far fewer activations kept for backward
    assert grads[1].pop("saved") < grads[0].pop("saved") / 2
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_training_and_prefill_attend_without_a_mask_and_a_decoding_step_with_one(monkeypatch):
    """What each SDPA call gets decides the CUDA kernel: flash attention takes GQA but no mask.
    Training and prefill pass none (right padding: causal attention is exact); a decoding step, one
    query per row over its own filled slots, passes a [B, 1, 1, S] mask. Outputs equal the full
    forward's."""
    import torch.nn.functional as F

    from pbrl.model import KVCache
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=64)
    model = Transformer(args).eval()
    ids = torch.randint(0, 64, (2, 7))
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        calls.append((None if attn_mask is None else tuple(attn_mask.shape), is_causal, enable_gqa,
                      k.shape[1] == q.shape[1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        full = model(ids)
        assert set(calls) == {(None, True, True, False)}  # causal, GQA, no mask: flash on CUDA
        calls.clear()
        cache = KVCache(args, 2, 12, torch.float32, "cpu")
        hidden = model.prefill(ids[:, :5], cache)
        assert set(calls) == {(None, True, True, False)}
        calls.clear()
        # Row 0 continues at position 5; row 1's prompt is 4 tokens (its slot 4 is padding, written
        # over).
        logits = model.decode(torch.tensor([ids[0, 5], ids[1, 4]]), torch.tensor([5, 4]), cache)
        assert set(calls) == {((2, 1, 1, 12), False, True, False)}
    assert torch.allclose(model.lm_head(hidden), full[:, :5], atol=1e-5)
    assert torch.allclose(logits, full[:, [5, 4]].diagonal().T, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_eager_outputs_and_gradients_with_one_graph_for_all(checkpointing):
    """compile_blocks (AOT autograd tracing here, inductor's code generation is for CUDA): the same
    logits and gradients as eager, with and without activation checkpointing, for unpadded and
    right-padded batches of different shapes; every block runs the same compiled code (no
    recompilation per block or per length)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64, qk_norm=True)
    eager, compiled = Transformer(args), Transformer(args)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)
    for model in (eager, compiled):
        model.activation_checkpointing = checkpointing
    for b, t, pad in ((3, 10, None), (2, 13, "right"), (4, 7, "right"), (3, 11, None)):
        ids = torch.randint(0, 64, (b, t))
        mask = torch.ones(b, t, dtype=torch.bool)
        if pad == "right":
            mask[1, t - 4:] = False
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(ids)
            (logits * mask[..., None]).square().sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results.append((logits.detach(), grads))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-5), (t, pad)
        for name, grad in results[0][1].items():
            assert torch.allclose(grad, results[1][1][name], atol=1e-5), (t, pad, name)
    # One graph whatever the shapes; not one per block.
    assert counters["stats"]["unique_graphs"] == 1
