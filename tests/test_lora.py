"""LoRA (pbrl/lora.py): the adapted model starts as its base, only the adapters train, the KL
reference is the base with the adapters off, and the run's exports load in transformers (merged)
and in peft (the adapters onto the base)."""
import pytest
import torch

from conftest import metrics, overrides, run_here, save_hf_model
from pbrl import lora
from pbrl.checkpoint import load_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids, output="logits")


def test_an_adapted_model_starts_as_its_base_and_is_its_base_with_adapters_off(tmp_path):
    save_hf_model(tmp_path / "m", "llama")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (2, 9), generator=g)
    base = logits(model, ids)
    adapters = lora.add_lora(model, rank=4, alpha=8.0)
    assert len(adapters) == 2 * 7 * model.args.num_hidden_layers  # A and B per projection
    assert torch.equal(logits(model, ids), base)  # B = 0
    with torch.no_grad():
        for p in adapters:
            p.normal_(std=0.1)
    assert not torch.allclose(logits(model, ids), base, atol=1e-4)
    with lora.adapters_off(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(lora.AdaptersOff(model)(ids, output="logits"), base)
    # the update is W + (alpha / r) B A, as the merged weight says
    m = model.layers[0].self_attn.q_proj
    x = torch.randn(3, m.base.in_features)
    assert torch.allclose(m(x), x @ m.merged_weight().T + m.base.bias if m.base.bias is not None
                          else x @ m.merged_weight().T, atol=1e-5)


def test_only_the_adapters_get_gradients(tmp_path):
    save_hf_model(tmp_path / "m", "qwen3")
    model = load_model(tmp_path / "m", dtype=torch.float32)
    adapters = lora.add_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    ids = torch.randint(0, model.args.vocab_size, (2, 7))
    with torch.no_grad():
        for p in adapters[1::2]:  # the B matrices: away from zero, so that A gets a gradient
            p.normal_(std=0.1)
    logits(model, ids)  # no graph
    model(ids, output="logits").float().pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if ".lora_" in n} and trained
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_a_lora_run_trains_adapters_only_keeps_no_reference_copy_and_exports(world, tmp_path):
    """Two PPO iterations with KL: the base weights stay as loaded, the adapters move, the KL is
    measured against the actor with its adapters off; the merged export gives the adapted model's
    logits in transformers, and peft loads the adapters onto the base to the same logits."""
    from transformers import AutoModelForCausalLM

    from pbrl.config import load_config
    from pbrl.prepare import prepare
    out = tmp_path / "run"
    trainer = prepare(load_config(None, overrides(world, out, **{
        "lora.rank": 4, "lora.alpha": 8.0, "ppo.kl_beta": 0.1, "ppo.lr": 5e-2})),
        log=lambda *a: None)
    assert isinstance(trainer.reference, lora.AdaptersOff)
    assert trainer.reference.model is trainer.actor.model  # no second copy of the weights
    params = [p for group in trainer.actor.optimizer.param_groups for p in group["params"]]
    assert all(p.dtype == torch.float32 for p in params) and len(params) == len(
        [n for n, _ in trainer.actor.model.named_parameters() if ".lora_" in n])
    before = {n: p.detach().clone() for n, p in trainer.actor.model.named_parameters()}
    trainer.run()
    after = dict(trainer.actor.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if ".lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".lora_B" in n)
    assert metrics(out)[-1]["kl"] != 0  # the adapted policy has moved from its base (k1 estimate)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    ours = logits(trainer.actor.model, ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "final", torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ours, atol=1e-4)
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(world / "policy", torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, out / lora.ADAPTER_DIR)
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, ours, atol=1e-4)


@pytest.mark.parametrize("extra, world_size, says", [
    ({}, 2, "lora runs on one process"),
    ({"rollout.compile": "true"}, 1, "rollout.tensor_parallel and rollout.compile"),
])
def test_lora_refuses_what_it_does_not_do_yet(world, tmp_path, extra, world_size, says):
    from pbrl.config import load_config, validate
    cfg = load_config(None, overrides(world, tmp_path / "x", **{"lora.rank": 4, **extra}))
    with pytest.raises(ValueError, match=says):
        validate(cfg, world_size)


def test_exporting_a_lora_checkpoint_says_where_the_exports_are(world, tmp_path, capsys):
    from pbrl.checkpoint import main
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out, **{
        "lora.rank": 2, "run.steps": 1, "run.checkpoint_every": 1})), log=lambda *a: None).run()
    [ckpt] = (out / "checkpoints").iterdir()
    code, _, err = run_here(main, ["export", ckpt, tmp_path / "hf"], capsys)
    assert code == 2 and "exports the merged model and the adapters when it ends" in err, err


def test_a_lora_run_resumes_onto_its_own_base_only(world, tmp_path, capsys):
    """Resumed, a LoRA run continues from its adapters; onto another base (its checkpoint holds
    the adapters only and the base's hash: another base would take them silently) or without
    LoRA, it is refused in one line."""
    import shutil

    from pbrl.config import load_config
    from pbrl.prepare import prepare
    out = tmp_path / "run"

    def run(steps, **extra):
        settings = {"lora.rank": 2, "run.steps": steps, "run.checkpoint_every": 1, **extra}
        return prepare(load_config(None, overrides(world, out, **settings)), log=lambda *a: None)
    first = run(1)
    first.run()
    resumed = run(2, **{"run.resume": "true"})
    assert resumed.step == 1
    b = {n: p for n, p in resumed.actor.model.named_parameters() if ".lora_B" in n}
    assert all(torch.equal(b[n], p) for n, p in first.actor.model.named_parameters() if n in b)
    resumed.run()
    other = shutil.copytree(world / "policy", tmp_path / "other")
    save_hf_model(other, "llama", seed=9)  # the same shapes, other weights
    with pytest.raises(ValueError, match="trained on another base than models.policy"):
        run(3, **{"run.resume": "true", "models.policy": other})
    with pytest.raises(ValueError, match="holds a LoRA actor, and lora.rank is 0"):
        run(3, **{"run.resume": "true", "lora.rank": 0})


def test_a_lora_checkpoint_holds_the_adapters_and_their_optimizer_only(world, tmp_path):
    from pbrl.checkpoint import checkpoint_metadata
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out, **{
        "lora.rank": 2, "run.steps": 1, "run.checkpoint_every": 1})), log=lambda *a: None).run()
    [ckpt] = (out / "checkpoints").iterdir()
    weights = [k for k in checkpoint_metadata(ckpt).state_dict_metadata
               if k.startswith("actor.model.")]
    assert weights and all(".lora_" in k for k in weights)  # no base tensor stored
