import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_hf_model
from pbrl.checkpoint import INDEX_FILE, load_model, save_model
from pbrl.model import Transformer


def logits(model, x):
    with torch.no_grad():
        return model(x)


X = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_roundtrip_is_exact_and_transformers_reads_it(tmp_path, tied):
    from transformers import AutoModelForCausalLM
    save_hf_model(tmp_path / "src", "qwen3", tie_word_embeddings=tied)
    model = Transformer.from_pretrained(tmp_path / "src")
    save_model(model, tmp_path / "out", source_dir=tmp_path / "src")
    again = Transformer.from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (hf(X).logits - logits(model, X)).abs().max() <= 1e-5


def test_sharded_save_and_load(tmp_path):
    save_hf_model(tmp_path / "src", "llama")
    model = Transformer.from_pretrained(tmp_path / "src")
    save_model(model, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert torch.equal(logits(Transformer.from_pretrained(tmp_path / "out"), X), logits(model, X))


def test_dtype_conversion(llama_dir):
    model = load_model(llama_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = load_model(llama_dir)
    assert (logits(model, X).float() - logits(ref, X)).abs().max() < 0.1


def test_bare_backbone_without_prefix_or_lm_head_loads(tmp_path):
    """Embedding checkpoints (Qwen3Model) carry no `model.` prefix and no LM head."""
    from transformers import Qwen3Model
    from conftest import hf_config, randomize
    hf = randomize(Qwen3Model(hf_config("qwen3"))).eval()
    hf.save_pretrained(tmp_path)
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "model.safetensors"))
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.lm_head is None
    with torch.no_grad():
        assert (hf(X).last_hidden_state - ours.hidden_states(X)).abs().max() <= 1e-4
    with pytest.raises(RuntimeError, match="no LM head"):
        ours(X)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_model_type(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'mamba' is not supported; pbrl supports \('llama'"):
        Transformer.from_pretrained(llama_dir)


def test_truncated_safetensors(llama_dir):
    file = llama_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        Transformer.from_pretrained(llama_dir)


def test_truncated_tensor_data(llama_dir):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        Transformer.from_pretrained(llama_dir)


def test_missing_tensor(llama_dir):
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file)
    with pytest.raises(KeyError, match=r"missing tensors \['layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(llama_dir)


def test_unexpected_tensor(llama_dir):
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    state["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    save_file(state, file)
    with pytest.raises(KeyError, match="unexpected tensors.*rotary"):
        Transformer.from_pretrained(llama_dir)


def test_shape_mismatch(llama_dir):
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, file)
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \[65\], config.json implies \[64\]"):
        Transformer.from_pretrained(llama_dir)


def test_missing_shard_file(tmp_path):
    save_hf_model(tmp_path / "src", "llama")
    save_model(Transformer.from_pretrained(tmp_path / "src"), tmp_path / "out", max_shard_bytes=40_000)
    next((tmp_path / "out").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lists shard files that are missing"):
        Transformer.from_pretrained(tmp_path / "out")


def test_bad_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local model directory nor a hub id"):
        Transformer.from_pretrained(str(tmp_path / "nope"))


def test_hub_id_goes_through_snapshot_download(monkeypatch, llama_dir):
    """Hub ids are resolved by huggingface_hub; here it answers with a local snapshot (no network)."""
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(llama_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = Transformer.from_pretrained("org/tiny-llama")
    assert calls == ["org/tiny-llama"] and model.args.model_type == "llama"
