"""The memory planner: exact terms against the real tensors of a small model, the activation
estimate against the bytes autograd actually saves, and the command line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_here, save_hf_model, subprocess_env
from pbrl import memory
from pbrl.checkpoint import load_model
from pbrl.cudagraphs import cache_slots
from pbrl.model import ModelArgs, Transformer, empty_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_gradient_and_adamw_terms_are_exact(tmp_path, tied):
    save_hf_model(tmp_path, "qwen3", tie_word_embeddings=tied)
    model = load_model(tmp_path, dtype=torch.float32, value_head=True).train()
    shapes = memory.parameter_shapes(memory.model_args(str(tmp_path)), value_head=True)
    params = list(model.parameters())
    assert memory.shard_bytes(shapes, 1, 4) == sum(p.numel() * p.element_size() for p in params)
    ids = torch.randint(0, 320, (2, 9))
    (model(ids, output="values").sum() + model(ids).float().sum()).backward()
    assert memory.shard_bytes(shapes, 1,
                              4) == sum(p.grad.numel() * p.grad.element_size() for p in params)
    opt = torch.optim.AdamW(params)
    opt.step()
    states = [t for s in opt.state.values() for t in s.values()]
    held = sum(t.numel() * t.element_size() for t in states)
    assert memory.shard_bytes(shapes, 1, 8) + 4 * len(shapes) == held


def saved_bytes(model, ids) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], output="logprobs", labels=ids[:, 1:])
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layers", [2, 4])
def test_activation_estimate_is_within_20_percent_of_what_autograd_saves(checkpointing, layers):
    args = ModelArgs(vocab_size=256, hidden_size=64, intermediate_size=160,
                     num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Transformer(args).train()
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, 256, (3, 97))
    measured = saved_bytes(model, ids)
    estimated = memory.activation_bytes(args, 3 * 96, 4, checkpointing)
    assert 0.8 < estimated / measured < 1.25, (estimated, measured)


def test_command_line_prints_the_breakdown_and_refuses_what_does_not_fit(tmp_path, capsys):
    save_hf_model(tmp_path / "m", "llama")
    env = subprocess_env()
    args = [sys.executable, "-m", "pbrl.memory", "--gpus", "2", "--models.policy",
            str(tmp_path / "m"),
            "--reward.kind", "agreement", "--data.path", str(tmp_path), "--data.eval_path", ""]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ("actor AdamW states" in done.stdout and "peak (" in done.stdout
            and "critic" in done.stdout)
    # the refusal, in this process
    code, out, err = run_here(memory.main, args[3:] + ["--ppo.advantage", "grpo",
                                                       "--gpu-memory", "0.001"], capsys)
    assert code == 2 and "critic" not in out  # critic-free: no critic terms
    assert err.startswith("error: the run does not fit: its peak") and "actor AdamW states" in err


def test_an_instruct_translator_adds_a_reward_phase_and_a_lexicon_does_not(tmp_path):
    from pbrl.config import load_config
    save_hf_model(tmp_path / "m", "llama")
    (tmp_path / "lexicon").mkdir()
    (tmp_path / "lexicon" / "lexicon.json").write_text("{}")
    for translator, expected in ((tmp_path / "m", True), (tmp_path / "lexicon", False)):
        cfg = load_config(None,
                          ["--models.policy", str(tmp_path / "m"), "--models.embedder",
                           str(tmp_path / "m"),
                                 "--models.translator", str(translator), "--reward.kind", "mt"])
        plan = memory.plan(cfg, 2, 100)
        assert ("reward" in plan.phases) == expected
        assert ("translator (whole)" in plan.terms) == expected
        if expected:  # the translator's KV cache for one batch of TRANSLATE_BATCH_SIZE responses
            args = memory.model_args(str(translator))
            tokens = 64 + cfg.rollout.max_new_tokens + cfg.reward.translate_max_new_tokens
            assert plan.terms["reward: translator KV "
                              "cache"] == 2 * args.num_hidden_layers * 16 * tokens * \
                args.num_key_value_heads * args.head_dim * 2  # 'auto' plans for CUDA: bf16


def test_a_compiled_rollout_keeps_its_cache_and_actor_copy_in_every_phase_after_the_pivot(tmp_path):
    """With rollout.compile the sampler keeps its state between calls and, under FSDP, the Trainer
    decodes on a whole copy of the actor (CUDA graphs replay on their addresses): the planner counts
    both in the update phase too, with the bytes of the tensors the sampler and the Trainer
    allocate."""
    from pbrl import sampler
    from pbrl.cudagraphs import cache_slots
    from pbrl.config import load_config
    save_hf_model(tmp_path / "m", "llama")
    base = ["--models.policy", str(tmp_path / "m"), "--reward.kind", "agreement"]
    eager, compiled = (memory.plan(load_config(None, base + ["--rollout.compile", flag]), 2, 100)
                       for flag in ("false", "true"))
    kept = "KV cache, kept (rollout.compile)"
    assert kept in compiled.phases["rollout"] and kept in compiled.phases["update"]
    assert kept not in compiled.phases["pivot"] and "rollout: KV cache" not in compiled.terms
    assert ("rollout: KV cache" in eager.phases["rollout"]
            and "rollout: KV cache" not in eager.phases["update"])
    r = load_config(None, base).rollout
    # the planner's 'auto' dtype plans for CUDA: bf16
    model = load_model(tmp_path / "m", dtype=torch.bfloat16)
    st = sampler.new_state(model, r.prompts_per_step // 2 * r.samples_per_prompt,
                           cache_slots(100, r.max_new_tokens), r.max_new_tokens)
    assert compiled.terms[kept] == sum(t.numel() * t.element_size()
                                       for t in st.cache.k + st.cache.v)
    # rounded up to whole 128-slot blocks
    assert compiled.terms[kept] > eager.terms["rollout: KV cache"]
    copy = "actor copy for compiled rollouts"  # the Trainer's decoder: what it allocates
    assert copy in compiled.phases["update"] and copy not in eager.terms
    # refreshed one tensor at a time: the embeddings here
    assert "rollout: actor gathered" not in compiled.terms
    assert compiled.terms["rollout: largest actor tensor "
                          "gathered"] == 2 * model.embed_tokens.weight.numel()
    assert compiled.terms[copy] == sum(t.numel() * t.element_size()
                                       for t in empty_like(model, torch.bfloat16,
                                                                                        "cpu").parameters())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates_for_its_gpus(path):
    from pbrl.config import load_config, validate
    validate(load_config(str(path), []), 1 if "1gpu" in path.name or "24gb" in path.name else 8)


def write_config(directory: Path, **shapes) -> str:
    import json
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "max_position_embeddings": 40960, **shapes}))
    return str(directory)


QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)
LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                  tie_word_embeddings=False)


def llama31_8b_config(root: Path, name: str):
    """configs/{name} with Llama-3.1-8B's shapes as policy and pivot and Qwen3-0.6B's as the
    embedder (their config.json alone, under root)."""
    from pbrl.config import load_config
    big = write_config(root / "8b", **LLAMA31_8B)
    embedder = write_config(root / "0.6b", **QWEN3_0_6B)
    return load_config(str(ROOT / "configs" / name), [
        "--models.policy", big, "--models.pivot", big, "--models.embedder", embedder])


def test_qwen3_32b_with_tensor_parallel_rollouts_fits_8_gpus_of_80_gb(tmp_path):
    """configs/qwen3_32b_grpo.toml with Qwen3-32B's shapes (and Qwen3-0.6B's for the embedder): at
    most 75 GB per GPU on 8, the rollout's actor term 1/8 of the whole actor (norms aside) that a
    rollout without tensor parallelism gathers, which would not fit."""
    from pbrl.config import load_config
    big = write_config(tmp_path / "32b", hidden_size=5120, intermediate_size=25600,
                       num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                       tie_word_embeddings=False)
    small = write_config(tmp_path / "0.6b", **QWEN3_0_6B)
    models = ["--models.policy", big, "--models.pivot", big, "--models.embedder", small]
    cfg = load_config(str(ROOT / "configs" / "qwen3_32b_grpo.toml"), models)
    tp = memory.plan(cfg, 8, 300)
    assert tp.peak[1] <= 75 * memory.GB
    whole = memory.full_bytes(memory.parameter_shapes(memory.model_args(big)), 2)
    # 1/8 of every matrix, the norms whole (1.3 MB)
    assert whole // 8 < tp.terms["rollout: actor TP shards"] < whole // 8 + 2 * 2**20
    cfg.rollout.tensor_parallel = 1
    assert memory.plan(cfg, 8, 300).phase_bytes("rollout") > 80 * memory.GB


def test_lora_terms_are_exact_and_the_8b_lora_config_fits_one_80_gb_gpu(tmp_path):
    """The frozen base in the compute dtype and the fp32 adapters against a real adapted model;
    configs/llama31_8b_lora_1gpu.toml with Llama-3.1-8B's shapes fits one 80 GB GPU with no
    reference term (its KL reads the base with the adapters off), which full-parameter training
    of the same run does not."""

    from pbrl import lora
    save_hf_model(tmp_path / "small", "llama")
    model = load_model(tmp_path / "small", dtype=torch.bfloat16)
    adapters = lora.add_lora(model, rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    args = memory.model_args(str(tmp_path / "small"))
    assert memory.shard_bytes(memory.lora_shapes(args, 4, ("q_proj", "down_proj")), 1, 4) == \
        sum(p.numel() * p.element_size() for p in adapters)
    base = [p for n, p in model.named_parameters() if ".lora_" not in n]
    assert memory.shard_bytes(memory.parameter_shapes(args), 1, 2) == \
        sum(p.numel() * p.element_size() for p in base)
    cfg = llama31_8b_config(tmp_path / "one", "llama31_8b_lora_1gpu.toml")
    plan = memory.plan(cfg, 1, 300)
    assert cfg.ppo.kl_beta > 0 and not any("reference" in t for t in plan.terms)
    assert plan.peak[1] <= 40 * memory.GB
    # PPO + GAE: the critic is adapters and a value head on the same base, no model of its own
    cfg.ppo.advantage = "gae"
    gae = memory.plan(cfg, 1, 300)
    assert not any(t.startswith("critic parameters") for t in gae.terms)
    assert gae.peak[1] <= 40 * memory.GB  # the goal: at most 75 GB
    cfg.lora.rank = 0  # the same run, full-parameter
    assert memory.plan(cfg, 1, 300).peak[1] > 80 * memory.GB
    # the smallest card: 24 GB, with 2 GB left for the CUDA context and the allocator
    small = llama31_8b_config(tmp_path / "24gb", "llama31_8b_lora_24gb.toml")
    assert memory.plan(small, 1, 300).peak[1] <= 22 * memory.GB


def test_the_shared_critic_terms_are_the_bytes_of_its_adapters_and_value_head(tmp_path):
    from pbrl import lora
    from pbrl.config import load_config
    save_hf_model(tmp_path / "small", "llama")
    model = load_model(tmp_path / "small", dtype=torch.bfloat16, value_head=True)
    lora.add_lora(model, rank=4, alpha=8.0, critic=True)
    small = str(tmp_path / "small")
    cfg = load_config(None, ["--models.policy", small, "--models.pivot", small, "--lora.rank", "4",
                             "--ppo.advantage", "gae", "--reward.kind", "exact_match"])
    plan = memory.plan(cfg, 1, 50)
    for which, term in (("actor", "actor adapters"), ("critic", "critic adapters")):
        real = sum(p.numel() * p.element_size() for p in lora.trained_parameters(model, which))
        assert plan.terms[f"{term} parameters (fp32)"] == real, which
    assert "critic parameters (fp32)" not in plan.terms


def test_the_planner_knows_the_two_kinds_of_rank_of_a_pipelined_run(tmp_path):
    """rollout.placement separate: a training rank's plan holds no rollout (KV cache, the actor
    gathered) and no reward model, only the largest tensor it gathers to stream; a rollout rank's
    holds the actor whole in the compute dtype (its bytes those of the real model), its KV cache
    and the reward's models. configs/llama31_8b_pipelined.toml in Llama-3.1-8B's shapes: both fit
    80 GB with room (52.7 GB training, whose evaluation decodes; 26.5 GB rollout)."""

    from pbrl.config import load_config
    save_hf_model(tmp_path / "small", "llama")
    small = str(tmp_path / "small")
    cfg = load_config(None, ["--models.policy", small, "--models.pivot", small,
                             "--reward.kind", "exact_match", "--rollout.placement", "separate",
                             "--models.dtype", "bfloat16", "--data.eval_path", ""])
    training, rollout = memory.plan(cfg, 1, 50), memory.rollout_rank_plan(cfg, 50)
    assert not any(t.startswith(("rollout: KV", "rollout: actor gathered", "embedder"))
                   for t in training.terms)
    model = load_model(tmp_path / "small", dtype=torch.bfloat16)
    assert rollout.terms["actor, whole (streamed weights)"] == \
        sum(p.numel() * p.element_size() for p in model.parameters())
    assert "rollout: KV cache" in rollout.terms and "actor AdamW states" not in rollout.terms
    cfg.rollout.compile = True  # the sampler's state kept, one cache length; no second copy
    compiled = memory.rollout_rank_plan(cfg, 50)
    kept = compiled.terms.pop("KV cache, kept (rollout.compile)")
    r = cfg.rollout
    assert kept == memory.kv_cache_bytes(memory.model_args(small), r.prompts_per_step *
                                         r.samples_per_prompt, cache_slots(50, r.max_new_tokens), 2)
    assert compiled.terms == {k: v for k, v in rollout.terms.items() if k != "rollout: KV cache"}
    cfg.rollout.compile, cfg.rollout.tensor_parallel = False, 2  # shards; the pair's rows
    sharded = memory.rollout_rank_plan(cfg, 50).terms
    assert sharded["actor TP shards (streamed weights)"] == \
        memory.tensor_parallel_bytes(memory.model_args(small), 2, 2)
    assert sharded["rollout: KV cache"] == rollout.terms["rollout: KV cache"]  # 2x rows, 1/2 heads
    cfg = llama31_8b_config(tmp_path / "8gpus", "llama31_8b_pipelined.toml")
    assert memory.plan(cfg, 4, 300).peak[1] <= 60 * memory.GB  # its evaluation decodes there
    assert memory.rollout_rank_plan(cfg, 300).peak[1] <= 30 * memory.GB
