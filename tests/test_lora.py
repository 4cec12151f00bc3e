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
    with lora.selected(model, None):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(lora.AdaptersOff(model)(ids, output="logits"), base)
    # the update is W + (alpha / r) B A, as the merged weight says
    m = model.layers[0].self_attn.q_proj
    x = torch.randn(3, m.base.in_features)
    assert torch.allclose(m(x), x @ m.merged_weight().T + m.base.bias if m.base.bias is not None
                          else x @ m.merged_weight().T, atol=1e-5)


def test_the_adapters_gradients_are_the_dense_weights_gradient_projected():
    """For y = W x + s B A x the adapters' gradients follow from the merged weight's, G = dL/dW':
    dB = s G A^T and dA = s B^T G (derived by hand), against autograd through a plain linear."""
    g = torch.Generator().manual_seed(0)
    m = lora.LoRALinear(torch.nn.Linear(6, 5, bias=False), rank=3, alpha=6.0)
    lora.init_adapters(m, seed=0)
    with torch.no_grad():
        m.lora_B.normal_(generator=g)
    x, upstream = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
    (m(x) * upstream).sum().backward()
    dense = m.merged_weight().detach().requires_grad_(True)
    (torch.nn.functional.linear(x, dense) * upstream).sum().backward()
    G = dense.grad
    assert torch.allclose(m.lora_B.grad, m.scale * G @ m.lora_A.detach().T, atol=1e-5)
    assert torch.allclose(m.lora_A.grad, m.scale * m.lora_B.detach().T @ G, atol=1e-5)


def test_the_critic_on_the_actors_base_is_a_critic_of_its_own_weights(tmp_path):
    """A second adapter set and the value head on the same base, selected per pass: its values
    equal those of a separate critic whose weights are the base merged with the critic's adapters
    and the same head; the actor's logits do not see the critic's adapters; and its gradients are
    the same when blocks are recomputed in backward (activation checkpointing runs inside the
    selection)."""
    from pbrl.model import Transformer
    save_hf_model(tmp_path / "m", "llama")
    model = load_model(tmp_path / "m", dtype=torch.float32, value_head=True)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    base_logits = logits(model, ids)
    lora.add_lora(model, rank=4, alpha=8.0, critic=True)
    with torch.no_grad():
        for p in lora.trained_parameters(model, "critic"):
            p.normal_(std=0.1)
    assert torch.equal(logits(model, ids), base_logits)  # the actor's B is still zero
    separate = Transformer(model.args, value_head=True)
    state = {}
    for name, m in dict(model.named_modules()).items():
        if isinstance(m, lora.LoRALinear):
            w = m.base.weight
            state[f"{name}.weight"] = w + m.scale * m.critic_B.detach() @ m.critic_A.detach()
    for name, p in model.named_parameters():
        if ".base." not in name and ".critic_" not in name and ".lora_" not in name:
            state[name] = p.detach()
    separate.load_state_dict(state, strict=False)
    separate.inv_freq = model.inv_freq
    shared = lora.Selected(model, "critic")
    with torch.no_grad():
        assert torch.allclose(shared(ids, output="values"), separate(ids, output="values"),
                              atol=1e-5)
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        with lora.selected(model, "critic"):
            model(ids, output="values").pow(2).mean().backward()
        grads.append([p.grad.clone() for p in lora.trained_parameters(model, "critic")])
        assert all(p.grad is None for p in lora.trained_parameters(model, "actor"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


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
    # no second copy of the weights: the reference, and GAE's critic, are the actor's base
    assert trainer.reference.model is trainer.actor.model is trainer.critic.model
    params = [p for group in trainer.actor.optimizer.param_groups for p in group["params"]]
    assert all(p.dtype == torch.float32 for p in params) and len(params) == len(
        [n for n, _ in trainer.actor.model.named_parameters() if ".lora_" in n])
    before = {n: p.detach().clone() for n, p in trainer.actor.model.named_parameters()}
    trainer.run()
    after = dict(trainer.actor.model.named_parameters())
    trains = {n for n in before if ".lora_" in n or ".critic_" in n or "value_head" in n}
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trains)
    for moved in (".lora_B", ".critic_B", "value_head.weight"):
        assert any(not torch.equal(before[n], after[n]) for n in before if moved in n), moved
    assert metrics(out)[0]["kl"] == 0  # step 1: B = 0, the policy is its base exactly
    assert metrics(out)[-1]["kl"] != 0  # the adapted policy has moved from its base (k1 estimate)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    ours = logits(trainer.actor.model, ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "final", torch_dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ours, atol=1e-4)
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(world / "policy", torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, out / "final-adapter")
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, ours, atol=1e-4)


def test_a_lora_checkpoint_exports_as_the_run_does_and_only_onto_its_own_base(world, tmp_path,
                                                                           capsys):
    """`python -m pbrl.checkpoint export` of a LoRA checkpoint writes what the run's final export
    wrote (the merged model, byte for byte, and the adapters in PEFT's layout beside it), reading
    the base from where the run read it or from --base; another base is refused in one line."""
    import shutil

    from conftest import hf_tensors
    from pbrl.checkpoint import main
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out, **{
        "lora.rank": 2, "run.steps": 2, "run.checkpoint_every": 1})), log=lambda *a: None).run()
    ckpt = out / "checkpoints" / "step_000002"
    code, said, err = run_here(main, ["export", ckpt, tmp_path / "hf"], capsys)
    assert code == 0, err
    final, ours = hf_tensors(out / "final"), hf_tensors(tmp_path / "hf")
    assert final.keys() == ours.keys() and all(torch.equal(final[n], ours[n]) for n in final)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "hf-adapter" / name).read_bytes() == \
            (out / "final-adapter" / name).read_bytes(), name
    moved = shutil.copytree(world / "policy", tmp_path / "moved")
    code, _, err = run_here(main, ["export", ckpt, tmp_path / "hf2", "--base", moved], capsys)
    assert code == 0, err
    assert all(torch.equal(final[n], t) for n, t in hf_tensors(tmp_path / "hf2").items())
    save_hf_model(moved, "llama", seed=9)  # the same shapes, other weights
    code, _, err = run_here(main, ["export", ckpt, tmp_path / "hf3", "--base", moved], capsys)
    assert code == 2 and "were trained on the base at" in err and "pass the base" in err, err
    assert not (tmp_path / "hf3").exists()
    code, _, err = run_here(main, ["export", ckpt, tmp_path / "hf"], capsys)
    assert code == 2 and "holds an earlier export" in err, err  # nothing overwritten unasked


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


def lora_runs(world, root):
    """One 3-step LoRA run (GAE's critic on the same base, KL against the adapters-off base),
    checkpointed at steps 2 and 3: in one process, and on 2 ranks (torchrun, gloo, FSDP2: base
    and adapters sharded) whose rollouts decode as one tensor-parallel group on a twin holding the
    merged weights."""
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    from test_train import train
    prepare(load_config(None, overrides(world, root / "one", **LORA_RUN)),
            log=lambda *a: None).run()
    train(world, root / "two", 2, **LORA_RUN, **{"rollout.tensor_parallel": 2})
    return root / "one", root / "two"


LORA_RUN = {"lora.rank": 4, "lora.alpha": 8.0, "ppo.kl_beta": 0.1, "ppo.lr": 1e-2,
            "run.steps": 3, "run.checkpoint_every": 2}


def test_a_two_rank_lora_run_matches_one_and_its_checkpoint_holds_the_adapters_only(world,
                                                                                    tmp_path,
                                                                                    monkeypatch):
    """lora_runs' two runs agree; the 2-rank checkpoint holds the adapters only, resumes on 1 rank
    as the 1-rank run continues, and the 1-rank run compiled (a merged decoding copy) agrees too.
    (One test: the runs are built once.)"""
    one, two = lora_runs(world, tmp_path / "runs")
    two_rank_checks(world, one, two)
    resumed_on_one_rank(world, one, two, tmp_path)
    compiled_with_a_merged_copy(world, one, tmp_path, monkeypatch)


def two_rank_checks(world, one, two):
    from conftest import hf_tensors
    from pbrl.checkpoint import checkpoint_metadata
    from test_train import assert_same_run
    assert len(metrics(one)) == 3 and metrics(one)[-1]["kl"] != 0
    assert_same_run(metrics(one), metrics(two))
    w1, w2, base = (hf_tensors(d) for d in (one / "final", two / "final", world / "policy"))
    assert w1.keys() == w2.keys() == base.keys()
    assert all(torch.allclose(w1[n], w2[n], atol=1e-5) for n in w1), "merged weights differ"
    assert any(not torch.equal(w1[n], base[n]) for n in w1)  # the adapters moved the policy
    # what the checkpoint stores of the actor: the adapters (fp32) and their two AdamW moments
    model = load_model(world / "policy")
    adapter_bytes = 4 * sum(p.numel() for p in lora.add_lora(model, 4, 8.0))
    meta = checkpoint_metadata(two / "checkpoints" / "step_000002").state_dict_metadata
    stored = {k: v.size.numel() * v.properties.dtype.itemsize for k, v in meta.items()
              if k.startswith("actor.") and hasattr(v, "size") and len(v.size) > 0}
    assert sum(v for k, v in stored.items() if k.startswith("actor.model.")) == adapter_bytes
    assert sum(v for k, v in stored.items() if k.startswith("actor.optim.")) == 2 * adapter_bytes


def resumed_on_one_rank(world, one, two, tmp_path):
    import shutil

    from pbrl.config import load_config
    from pbrl.prepare import prepare
    from test_train import assert_same_run
    out = shutil.copytree(two, tmp_path / "two_to_one")
    for later in ("checkpoints/step_000003", "final", "final-adapter"):
        shutil.rmtree(out / later)
    trainer = prepare(load_config(None, overrides(world, out, **LORA_RUN, **{
        "run.resume": "true"})), log=lambda *a: None)
    assert trainer.step == 2
    trainer.run()
    assert_same_run(metrics(one), metrics(out))


def compiled_with_a_merged_copy(world, one, tmp_path, monkeypatch):
    """rollout.compile (one process: rollouts decode on a copy with the adapters merged, at
    addresses that never move) trains as the unmerged LoRA run does, and the copy gives the adapted
    actor's logits. (rollout.tensor_parallel's twin: the 2-rank run of lora_runs.)"""
    from conftest import each_batch_size_kept_its_addresses, observe_compiled_steps
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    from test_train import assert_same_run
    seen = observe_compiled_steps(monkeypatch)
    out = tmp_path / "compiled"
    trainer = prepare(load_config(None, overrides(world, out, **LORA_RUN, **{
        "rollout.compile": "true"})), log=lambda *a: None)
    trainer.run()
    assert seen and each_batch_size_kept_its_addresses(seen)
    assert_same_run(metrics(one), metrics(out))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with trainer.sampling_policy() as decoder:
        assert decoder is trainer.graphs.copy
        assert not lora.lora_modules(decoder)  # a plain model: the adapters are in its weights
        assert torch.allclose(logits(decoder, ids), logits(trainer.actor.model, ids), atol=1e-5)


def test_a_shared_critic_trains_alike_with_blocks_recomputed_in_backward(world, tmp_path):
    """models.activation_checkpointing recomputes each block in backward: the critic's adapters
    must still be the ones selected then (the update's backward runs inside the selection), or
    its gradients would mix the actor's adapters into a critic's pass."""
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    runs = []
    for recompute in ("false", "true"):
        out = tmp_path / recompute
        prepare(load_config(None, overrides(world, out, **{
            "lora.rank": 4, "ppo.lr": 1e-2, "ppo.critic_lr": 1e-2, "run.steps": 2,
            "models.activation_checkpointing": recompute})), log=lambda *a: None).run()
        runs.append(metrics(out))
    for a, b in zip(*runs, strict=True):
        for key in ("value_loss", "explained_variance", "policy_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
