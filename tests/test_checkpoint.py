import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_hf_model, subprocess_env
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
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out", source_dir=tmp_path / "src")
    again = load_model(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (hf(X).logits - logits(model, X)).abs().max() <= 1e-5


def test_sharded_save_and_load(tmp_path):
    save_hf_model(tmp_path / "src", "llama")
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert torch.equal(logits(load_model(tmp_path / "out"), X), logits(model, X))


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
    ours = load_model(tmp_path)
    assert ours.lm_head is None
    with torch.no_grad():
        assert (hf(X).last_hidden_state - ours(X, output="hidden")).abs().max() <= 1e-4
    with pytest.raises(RuntimeError, match="no LM head"):
        ours(X)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_model_type(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError,
                       match=r"model_type 'mamba' is not supported; pbrl supports \('llama'"):
        load_model(llama_dir)


def test_truncated_safetensors(llama_dir):
    file = llama_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(llama_dir)


def test_truncated_tensor_data(llama_dir):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(llama_dir)


def test_missing_tensor(llama_dir):
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, file)
    with pytest.raises(KeyError, match=r"missing tensors \['layers.1.mlp.up_proj.weight'\]"):
        load_model(llama_dir)


def test_unexpected_tensor(llama_dir):
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    state["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    save_file(state, file)
    with pytest.raises(KeyError, match="unexpected tensors.*rotary"):
        load_model(llama_dir)


def test_shape_mismatch(llama_dir):
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, file)
    with pytest.raises(ValueError,
                       match=r"tensor 'model.norm.weight' has shape \[65\], config.json implies "
                             r"\[64\]"):
        load_model(llama_dir)


def test_missing_shard_file(tmp_path):
    save_hf_model(tmp_path / "src", "llama")
    save_model(load_model(tmp_path / "src"), tmp_path / "out", max_shard_bytes=40_000)
    next((tmp_path / "out").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lists shard files that are missing"):
        load_model(tmp_path / "out")


def test_bad_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local model directory nor a hub id"):
        load_model(str(tmp_path / "nope"))


def test_hub_id_goes_through_snapshot_download(monkeypatch, llama_dir):
    """Hub ids are resolved by huggingface_hub; here it answers with a local snapshot (no
    network)."""
    import huggingface_hub
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(llama_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("org/tiny-llama")
    assert calls == ["org/tiny-llama"] and model.args.model_type == "llama"


def test_untied_checkpoint_without_lm_head_is_refused(llama_dir):
    """tie_word_embeddings=false and no lm_head.weight: the output layer is missing, not 'a
    backbone'."""
    file = llama_dir / "model.safetensors"
    state = load_file(file)
    del state["lm_head.weight"]
    save_file(state, file)
    with pytest.raises(KeyError,
                       match="no lm_head.weight, and config.json has tie_word_embeddings=false"):
        load_model(llama_dir)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("hidden_size"), r"config.json: missing key 'hidden_size'"),
    (lambda c: c.update(num_hidden_layers="2"),
     r"config.json: num_hidden_layers must be an integer, got '2'"),
    (lambda c: c.update(rms_norm_eps=[1e-5]),
     r"config.json: rms_norm_eps must be a number, got \[1e-05\]"),
    (lambda c: c.update(tie_word_embeddings="no"),
     r"config.json: tie_word_embeddings must be true or false"),
    (lambda c: c.update(vocab_size=0), r"config.json: vocab_size must be > 0, got 0"),
    (lambda c: c.update(rope_scaling="llama3"), r"config.json: rope_scaling must be an object"),
])
def test_config_json_errors_name_the_file_and_key(llama_dir, edit, message):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    edit(cfg)
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_model(llama_dir)


def test_config_json_that_is_not_utf8_or_not_json(llama_dir):
    (llama_dir / "config.json").write_bytes(b'{"model_type": "llama",\n "name": "\xe9"}')
    with pytest.raises(ValueError, match=r"config.json:2: not UTF-8 text"):
        load_model(llama_dir)
    (llama_dir / "config.json").write_text('{"model_type": "llama",\n')
    with pytest.raises(ValueError, match=r"config.json:2: not valid JSON"):
        load_model(llama_dir)


def test_load_pretrained_refuses_a_tokenizer_the_model_cannot_embed(tmp_path):
    from pbrl.checkpoint import load_pretrained
    save_hf_model(tmp_path, "llama", vocab_size=200)  # the test tokenizer has 300 tokens
    with pytest.raises(ValueError,
                       match=r"the tokenizer has 300 tokens but the model embeds only 200"):
        load_pretrained(tmp_path)


def test_backbone_saves_with_bare_names_that_transformers_reads(tmp_path):
    """A model without LM head (an embedder) is written as HF writes LlamaModel: no `model.`
    prefix."""
    from transformers import AutoModel
    save_hf_model(tmp_path / "src", "llama")
    full = load_model(tmp_path / "src")
    backbone = Transformer(full.args, lm_head=False)
    backbone.load_state_dict({k: v for k, v in full.state_dict().items()
                              if not k.startswith("lm_head")})
    save_model(backbone, tmp_path / "out")
    assert not any(k.startswith(("model.", "lm_head"))
                   for k in load_file(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaModel"]
    again = load_model(tmp_path / "out")
    hf = AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert again.lm_head is None
        assert (hf(X).last_hidden_state - full(X, output="hidden")).abs().max() <= 1e-4
        assert torch.equal(again(X, output="hidden"), full(X, output="hidden"))


def test_sharded_loading_reads_only_each_ranks_rows(tmp_path):
    """Under torchrun with 2 ranks: the sharded load equals a full load, and no read ever returned
    more than half (rounded up) of a tensor's rows."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    # odd rows: uneven shards
    save_hf_model(tmp_path / "m", "qwen3", tie_word_embeddings=True, vocab_size=321)
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(root / "tests" / "scripts" / "sharded_load.py"),
                           str(tmp_path / "m"), str(out)], cwd=root, capture_output=True, text=True,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    full = load_model(tmp_path / "m", dtype=torch.float32, value_head=True).state_dict()
    assert set(result["state"]) == set(full)
    for name, value in result["state"].items():
        assert torch.equal(torch.tensor(value), full[name]), name
    largest_tensor = full["embed_tokens.weight"].numel()  # 321 x 64
    # rank 0's 161 of the 321 embedding rows
    assert result["largest_read"] == 161 * 64 < largest_tensor
    # the planner's exact term, 2 ranks
    from pbrl.memory import model_args, parameter_shapes, shard_bytes
    shapes = parameter_shapes(model_args(str(tmp_path / "m")), value_head=True)
    assert result["rank0_parameter_bytes"] == shard_bytes(shapes, 2, 4)


def torchrun(script, *args):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(root / "tests" / "scripts" / script),
                           *map(str, args)], cwd=root, capture_output=True, text=True,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]


def test_sharded_checkpoint_never_materialises_a_whole_tensor(tmp_path):
    """2 ranks save and load a DCP checkpoint of a sharded actor and critic with their AdamW states:
    nothing is gathered, every tensor read from disk is at most one rank's rows, each rank's shard
    file holds about half the bytes, and the fresh models and optimizers equal the saved ones shard
    for shard."""
    save_hf_model(tmp_path / "m", "qwen3", tie_word_embeddings=True, vocab_size=321)
    torchrun("dcp_probe.py", tmp_path / "m", tmp_path / "report.json", tmp_path / "run")
    reports = json.loads((tmp_path / "report.json").read_text())
    for report in reports:
        assert (report["same"]
                and report["full_tensor"] == report["redistribute"] == report["float_gathers"] == 0)
        # half the embedding rows, rounded up
        assert 0 < report["largest_read"] <= 161 * 64 < 321 * 64
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    sizes = [(ckpt / f"__{rank}_0.distcp").stat().st_size for rank in range(2)]
    assert all(0.4 < size / sum(sizes) < 0.6 for size in sizes), sizes


def test_export_streams_one_block_at_a_time_and_transformers_reads_it(tmp_path, monkeypatch):
    """A training checkpoint of a 6-layer model, exported to bf16: every read from the checkpoint is
    one file's worth (the embeddings, one block, or the rest), and transformers' model of the export
    gives the trained logits."""
    import pbrl.checkpoint as ckpt_module
    from transformers import AutoModelForCausalLM
    save_hf_model(tmp_path / "src", "llama", num_hidden_layers=6)
    model = load_model(tmp_path / "src", dtype=torch.float32)
    ckpt = ckpt_module.save_training_checkpoint(tmp_path / "run", 3, {"actor": model},
                                                {"actor": torch.optim.AdamW(model.parameters())},
                                                {"step": 3}, source_dir=tmp_path / "src")
    real_read, reads = ckpt_module.read_checkpoint_tensors, []

    def measured(*args, **kwargs):
        tensors = real_read(*args, **kwargs)
        reads.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return tensors
    monkeypatch.setattr(ckpt_module, "read_checkpoint_tensors", measured)
    ckpt_module.export(ckpt, tmp_path / "hf", dtype=torch.bfloat16)
    state = model.state_dict()
    block = sum(t.numel() * 4 for n, t in state.items() if n.startswith("layers.0."))
    embedding = state["embed_tokens.weight"].numel() * 4
    assert len(reads) == 6 + 2 and max(reads) == max(block, embedding) < sum(reads) / 4
    exported = load_file(tmp_path / "hf" / "model-00002-of-00008.safetensors")
    assert all(name.startswith("model.layers.0.") and t.dtype == torch.bfloat16
               for name, t in exported.items())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(hf(X).logits,
                           hf(X).logits) and (hf(X).logits - ours(X)).abs().max() <= 1e-4
        rounded = Transformer(model.args)
        rounded.load_state_dict({k: v.bfloat16().float() for k, v in state.items()})
        # the export is the trained weights, rounded to bf16
        assert torch.equal(ours(X), rounded(X))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_export_command_peak_memory_is_about_one_block(tmp_path):
    """`python -m pbrl.checkpoint export` in a fresh process on a 150 MB checkpoint: the process's
    peak resident memory grows by far less than the model while exporting (a gathered export would
    add the whole model)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    save_hf_model(tmp_path / "src", "llama", hidden_size=512, intermediate_size=1024,
                  num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=16)
    model = load_model(tmp_path / "src", dtype=torch.float32)
    from pbrl.checkpoint import save_training_checkpoint
    ckpt = save_training_checkpoint(tmp_path / "run", 1, {"actor": model}, {}, {"step": 1})
    model_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    block_bytes = sum(t.numel() * 4 for n, t in model.state_dict().items()
                      if n.startswith("layers.0."))
    # VmHWM is this process's peak resident memory (ru_maxrss would carry over the forking
    # pytest's).
    script = ("import re, torch.distributed.checkpoint; from pbrl.checkpoint import main; "
              "status = lambda: open('/proc/self/status').read(); "
              "kib = lambda key: int(re.search(key + r':\\s+(\\d+)', status())[1]); "
              "before = kib('VmRSS'); "
              f"main(['export', {str(ckpt)!r}, {str(tmp_path / 'hf')!r}]); "
              "print((kib('VmHWM') - before) * 1024)")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    extra = int(done.stdout.split()[-1])
    assert extra < 4 * block_bytes < model_bytes / 3, (extra, block_bytes, model_bytes)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) == 18
