"""Throughput work that must not change what is computed (#29): a one-step update takes its old
log-probs from its own forward pass."""
import pytest
import torch

from conftest import overrides
from pbrl.config import PPOConfig, load_config
from pbrl.setup import prepare

ONE_STEP = {"ppo.advantage": "grpo", "ppo.kl_beta": 0, "ppo.epochs": 1, "ppo.minibatches": 1}


@pytest.mark.parametrize("change, expected", [
    ({}, True), ({"epochs": 2}, False), ({"minibatches": 2}, False), ({"kl_beta": 0.1}, False),
    ({"rollout_correction": "tis"}, False)])
def test_old_log_probs_come_from_the_update_only_when_nothing_reads_them_first(change, expected):
    settings = {"epochs": 1, "minibatches": 1, "kl_beta": 0.0, **change}
    assert PPOConfig(**settings).old_from_update() is expected


def train(world, out, **extra) -> tuple[list[dict], dict]:
    trainer = prepare(load_config(None, overrides(world, out, **ONE_STEP, **extra)),
                      log=lambda *a: None)
    history = trainer.run()
    return history, {k: v.detach().clone() for k, v in trainer.actor.model.state_dict().items()}


def test_a_one_step_update_without_its_own_old_pass_trains_the_same(world, tmp_path, monkeypatch):
    """The old log-probs a separate forward pass computes (forced here) are the update's own: the
    same metrics and weights after two steps, one forward pass fewer per step."""
    fast, fast_weights = train(world, tmp_path / "fast")
    monkeypatch.setattr(PPOConfig, "old_from_update", lambda self: False)
    slow, slow_weights = train(world, tmp_path / "slow")
    assert all("time/old_logprobs" not in m for m in fast[1:])
    assert all("time/old_logprobs" in m for m in slow[1:])
    for a, b in zip(fast, slow, strict=True):
        assert a["clipfrac"] == 0 and a["approx_kl"] == 0  # ratio exactly 1
        for key in ("reward", "policy_loss", "entropy", "grad_norm", "logprob_mismatch",
                    "logprob_mismatch_k3", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    for name, weight in fast_weights.items():
        torch.testing.assert_close(weight, slow_weights[name], rtol=1e-6, atol=1e-7, msg=name)
