"""The 2026 objectives (ppo.py, rollout.py): rollout correction, GSPO and CISPO, loss aggregation,
REINFORCE++, overlong handling, dynamic sampling and KL-free runs; each formula against a case
derived by hand in its comment or a plain loop, then every option through train.py."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import metrics, overrides, subprocess_env
from pbrl import ppo, rollout
from pbrl.config import PPOConfig, load_config, validate
from pbrl.sampler import Completions
from pbrl.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def grad_of(loss, x):
    return torch.autograd.grad(loss, x)[0]


# ------------------------------------------------------------------------------- policy losses
def test_gspo_hand_case():
    """One response of 3 tokens, log r = (0.1, -0.2, 0.4): s = exp(mean) = e^0.1 = 1.10517, inside
    [0.8, 1.2]. With A = 1 the loss is -s on every token, so -s after either mean; GSPO's gradient
    is -A ds/dlogp_t = -s / 3 for each token. With log r = 0.5 on every token, s = e^0.5 = 1.6487 >
    1.2: the loss is -1.2 and the gradient 0."""
    old = torch.zeros(1, 3)
    mask, adv = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3)
    logp = torch.tensor([[0.1, -0.2, 0.4]], requires_grad=True)
    out = ppo.policy_loss(logp, old, adv, mask, kind="gspo", agg="seq_mean_token_mean")
    s = math.exp(0.1)
    assert out.loss.item() == pytest.approx(-s) and out.clipfrac == 0
    assert torch.allclose(grad_of(out.loss, logp), torch.full((1, 3), -s / 3))
    logp = torch.full((1, 3), 0.5, requires_grad=True)
    out = ppo.policy_loss(logp, old, adv, mask, kind="gspo", agg="seq_mean_token_mean")
    assert out.loss.item() == pytest.approx(-1.2) and out.clipfrac == 1
    assert torch.equal(grad_of(out.loss, logp), torch.zeros(1, 3))


def test_gspo_on_one_token_responses_is_token_ppo():
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(6, 1, generator=g) * 0.3).requires_grad_()
    old, adv = torch.randn(6, 1, generator=g) * 0.3, torch.randn(6, 1, generator=g)
    mask = torch.ones(6, 1, dtype=torch.bool)
    ours = ppo.policy_loss(logp, old, adv, mask, kind="gspo")
    theirs = ppo.policy_loss(logp, old, adv, mask, kind="ppo")
    assert torch.allclose(ours.loss, theirs.loss) and ours.clipfrac == theirs.clipfrac
    assert torch.allclose(grad_of(ours.loss, logp), grad_of(theirs.loss, logp))


def test_cispo_hand_case():
    """log r = (0.5, 0, -0.5), A = (1, 1, -1), eps 0.2: r = (1.6487, 1, 0.6065) clipped to (1.2, 1,
    0.8). Loss per token -A clip(r) = (-1.2, -1, 0.8), token mean -1.4 / 3. The gradient is
    -clip(r) A / 3 = (-0.4, -1/3, 0.8/3): the two clipped tokens keep theirs (PPO's would be 0 for
    both)."""
    logp = torch.tensor([[0.5, 0.0, -0.5]], requires_grad=True)
    old, adv = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = ppo.policy_loss(logp, old, adv, mask, kind="cispo")
    assert out.loss.item() == pytest.approx(-1.4 / 3)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    assert torch.allclose(grad_of(out.loss, logp), torch.tensor([[-0.4, -1 / 3, 0.8 / 3]]))
    ppo_grad = grad_of(ppo.policy_loss(logp, old, adv, mask).loss, logp)
    assert ppo_grad[0, 0] == 0 and ppo_grad[0, 2] == 0


def test_dual_clip_belongs_to_the_ppo_loss():
    with pytest.raises(ValueError, match="ppo.dual_clip bounds the ppo loss"):
        validate(load_config(None, ["--ppo.dual_clip", "3", "--ppo.policy_loss", "cispo"]), 1)


# ---------------------------------------------------------------------------- loss aggregation
def test_aggregations_hand_case():
    """Two responses of 1 and 3 tokens with losses (3) and (1, 1, 4); max_new_tokens 4. token_mean
    9 / 4; seq_mean_token_mean (3 + 6 / 3) / 2 = 2.5; seq_mean_token_sum_norm (3 + 6) / (4 * 2)."""
    x = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 4.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    counts = ppo.count(mask, max_new_tokens=4)
    expected = {"token_mean": 2.25, "seq_mean_token_mean": 2.5, "seq_mean_token_sum_norm": 1.125}
    for name, value in expected.items():
        assert ppo.AGGREGATIONS[name](x, mask, counts).item() == pytest.approx(value), name


def test_sequence_mean_of_equal_lengths_is_the_token_mean():
    g = torch.Generator().manual_seed(2)
    logp = (torch.randn(5, 7, generator=g) * 0.2).requires_grad_()
    old, adv = torch.randn(5, 7, generator=g) * 0.2, torch.randn(5, 7, generator=g)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[:, 2:6] = True  # every response 4 tokens
    a = ppo.policy_loss(logp, old, adv, mask, agg="token_mean").loss
    b = ppo.policy_loss(logp, old, adv, mask, agg="seq_mean_token_mean").loss
    assert torch.allclose(a, b) and torch.allclose(grad_of(a, logp), grad_of(b, logp))


# -------------------------------------------------------------------------- rollout correction
def test_corrections_hand_case():
    """old - sampler = (0.1, 1.0, -0.3) on one response, clip 2, [low, high] = [0.5, 2]: ratios
    (1.105, 2.718, 0.741). tis: (1.105, 2, 0.741), the second truncated. seq_tis: e^0.8 = 2.226 ->
    2 on every token. mis: the second (2.718 > 2) drops. seq_mis: e^(0.8 / 3) = 1.31, inside: all
    count. The padding column stays 0."""
    sampler = torch.zeros(1, 4)
    old = torch.tensor([[0.1, 1.0, -0.3, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    r = [math.exp(0.1), math.exp(1.0), math.exp(-0.3)]
    expected = {"off": ([1, 1, 1, 0], [0, 0, 0, 0]), "tis": ([r[0], 2, r[2], 0], [0, 1, 0, 0]),
                "seq_tis": ([2, 2, 2, 0], [1, 1, 1, 0]), "mis": ([1, 0, 1, 0], [0, 1, 0, 0]),
                "seq_mis": ([1, 1, 1, 0], [0, 0, 0, 0])}
    for kind, (weights, changed) in expected.items():
        w, c = ppo.correction_weights(kind, old, sampler, mask, clip=2.0, low=0.5, high=2.0)
        assert torch.allclose(w, torch.tensor([weights], dtype=torch.float32)), kind
        assert c.tolist() == [[bool(x) for x in changed]], kind


def test_tis_without_mismatch_is_no_correction_exactly():
    g = torch.Generator().manual_seed(3)
    logp = (torch.randn(4, 6, generator=g) * 0.2).requires_grad_()
    old, adv = torch.randn(4, 6, generator=g) * 0.2, torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    weights = {kind: ppo.correction_weights(kind, old, old, mask)[0] for kind in ("off", "tis")}
    a, b = (ppo.policy_loss(logp, old, adv, weights[k]).loss for k in ("off", "tis"))
    assert torch.equal(a, b) and torch.equal(grad_of(a, logp), grad_of(b, logp))


# --------------------------------------------------------------------------------- REINFORCE++
def reinforce_pp_by_loops(scores, kl, mask, beta, groups=None):
    """Returns summed over later tokens, token by token, whitened by the batch's mean and unbiased
    std, with plain Python loops."""
    b, t = mask.shape
    scores = scores.tolist()
    if groups is not None:
        means = {g: sum(s for s, h in zip(scores, groups) if h == g) / groups.count(g)
                 for g in groups}
        scores = [s - means[g] for s, g in zip(scores, groups)]
    returns = [[0.0] * t for _ in range(b)]
    for i in range(b):
        positions = [j for j in range(t) if mask[i, j]]
        running = 0.0
        for j in reversed(positions):
            running += -beta * float(kl[i, j]) + (scores[i] if j == positions[-1] else 0.0)
            returns[i][j] = running
    values = [returns[i][j] for i in range(b) for j in range(t) if mask[i, j]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return torch.tensor([[(returns[i][j] - mean) / math.sqrt(var + 1e-8) if mask[i, j] else 0.0
                          for j in range(t)] for i in range(b)])


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_matches_plain_loops(baseline):
    g = torch.Generator().manual_seed(4)
    scores, kl = torch.randn(6, generator=g), torch.rand(6, 5, generator=g) * 0.1
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    groups = [0, 0, 1, 1, 2, 2]
    ours = ppo.reinforce_pp_advantages(scores, kl, mask, 0.3,
                                       torch.tensor(groups) if baseline else None)
    theirs = reinforce_pp_by_loops(scores, kl, mask, 0.3, groups if baseline else None)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ------------------------------------------------------------------------------------ overlong
def test_overlong_hand_case():
    """max_new_tokens 10, buffer 4: no penalty up to 6 tokens, then (6 - length) / 4 down to -1 at
    10. filter drops the unfinished responses from the loss."""
    completions = Completions(torch.zeros(4, 10, dtype=torch.long), torch.tensor([5, 6, 8, 10]),
                              torch.tensor([True, True, True, False]), torch.zeros(4, 10))
    rewards = {"reward": torch.ones(4)}
    penalised, keep = rollout.OVERLONG["penalty"](rewards, completions, 10, 4)
    assert penalised["overlong_penalty"].tolist() == [0.0, 0.0, -0.5, -1.0]
    assert penalised["reward"].tolist() == [1.0, 1.0, 0.5, 0.0] and keep.all()
    same, keep = rollout.OVERLONG["filter"](rewards, completions, 10, 4)
    assert same is rewards and keep.tolist() == [True, True, True, False]


# ---------------------------------------------------------------------------- dynamic sampling
def fake_round(problems, scores, n=2):
    """A round of groups whose samples scored `scores` (n per problem)."""
    b = len(scores)
    completions = Completions(torch.arange(b)[:, None].repeat(1, 3), torch.full((b,), 3),
                              torch.ones(b, dtype=torch.bool), torch.full((b, 3), -0.5))
    samples = [f"{p}/{j}" for p in problems for j in range(n)]
    return rollout.Groups(problems, completions, samples, {"reward": torch.tensor(scores)},
                          torch.ones(b, dtype=torch.bool), {})


def test_dynamic_sampling_chooses_the_same_groups_on_any_number_of_ranks():
    """Round 0 deals problems a b c d, round 1 e f g h (global order); informative: b, d, e, g. A
    batch of 4 is b d e g on one rank; on two ranks (rank 0 drew a b / e f, rank 1 c d / g h) rank 0
    trains b d and rank 1 e g. With a batch of 6, the uninformative fill it in draw order: a c."""
    scores = {"a": [1, 1], "b": [0, 1], "c": [0, 0], "d": [1, 0], "e": [0, .5], "f": [1, 1],
              "g": [.25, 0], "h": [0, 0]}

    def round_of(names):
        return fake_round(names, [float(s) for x in names for s in scores[x]])
    one = [round_of("abcd"), round_of("efgh")]
    chosen = rollout.choose_groups(one, 4, 2, 0, 1, lambda o: [o], pad_id=0)
    assert chosen.problems == list("bdeg")
    assert chosen.samples == ["b/0", "b/1", "d/0", "d/1", "e/0", "e/1", "g/0", "g/1"]
    assert chosen.rewards["reward"].tolist() == [0, 1, 1, 0, 0, .5, .25, 0]
    assert chosen.completions.lengths.tolist() == [3] * 8
    ranks = [[round_of("ab"), round_of("ef")], [round_of("cd"), round_of("gh")]]
    records = [rollout.group_records(r, 2) for r in ranks]
    shares = [rollout.choose_groups(ranks[k], 4, 2, k, 2, lambda o: records, pad_id=0)
              for k in range(2)]
    assert [s.problems for s in shares] == [list("bd"), list("eg")]
    assert rollout.choose_groups(one, 6, 2, 0, 1, lambda o: [o], 0).problems == list("bdegac")


# -------------------------------------------------------------------------------- KL-free runs
def test_a_kl_free_run_loads_and_plans_no_reference(world, tmp_path, monkeypatch):
    from pbrl import memory
    args = overrides(world, tmp_path / "run", **{"ppo.kl_beta": 0, "run.steps": 1})
    trainer = prepare(load_config(None, args), log=lambda *a: None)
    assert trainer.reference is None
    history = trainer.run()
    assert "kl" not in history[-1] and "time/ref_logprobs" not in history[-1]
    with_kl = memory.plan(load_config(None, overrides(world, tmp_path / "x")), 2, 32)
    without = memory.plan(load_config(None, args), 2, 32)
    assert "reference (shards)" in with_kl.terms and "reference (shards)" not in without.terms
    saving = with_kl.terms["reference (shards)"]
    for phase in ("rollout", "update"):  # a whole model's shards less in every training phase
        assert with_kl.phase_bytes(phase) - without.phase_bytes(phase) == saving


# ------------------------------------------------------------- the estimators' declared properties
@pytest.mark.parametrize("name", list(ppo.ADVANTAGES))
def test_each_estimator_reads_a_critic_or_groups_exactly_as_it_declares(name):
    """What an estimator declares when it registers (critic: prepare builds one and the planner
    counts it; grouped: samples_per_prompt >= 2 is checked) against what its numbers depend on:
    other values change its advantages only if it declares a critic, regrouped samples only if
    it declares groups."""
    estimator = ppo.ADVANTAGES[name]
    g = torch.Generator().manual_seed(0)
    scores, kl = torch.rand(6, generator=g), torch.rand(6, 5, generator=g) * 0.1
    values, mask = torch.rand(6, 5, generator=g), torch.ones(6, 5, dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    cfg = PPOConfig(advantage=name)

    def run(values=values, groups=groups):
        return estimator.fn(cfg, scores, kl, values, mask, groups, 0.1, lambda x: x)[0]
    reads_values = not torch.allclose(run(), run(values=values.flip(0)))
    reads_groups = not torch.allclose(run(), run(groups=torch.tensor([0, 1, 0, 1, 0, 1])))
    assert reads_values == estimator.critic, f"{name}: declares critic={estimator.critic}"
    assert reads_groups == estimator.grouped, f"{name}: declares grouped={estimator.grouped}"
    assert PPOConfig(advantage=name).uses_critic() == estimator.critic


# ------------------------------------------------------------------- every option, end to end
# Together they name every new option value at least once, but rollout.overlong filter: the tiny
# random policy never stops within max_new_tokens, so filtering leaves no token to train on, which
# the run refuses (tests/test_reliability.py); filter's own numbers are tested above.
OPTIONS = {
    "gspo": {"ppo.policy_loss": "gspo", "ppo.loss_agg": "seq_mean_token_mean",
             "ppo.rollout_correction": "tis"},
    "cispo": {"ppo.policy_loss": "cispo", "ppo.loss_agg": "seq_mean_token_sum_norm",
              "ppo.rollout_correction": "seq_mis", "rollout.overlong": "penalty",
              "rollout.overlong_buffer": 3, "ppo.advantage": "reinforce_pp_baseline"},
    "dapo": {"ppo.advantage": "grpo", "ppo.eps_high": 0.28, "rollout.dynamic_sampling": "true",
             "rollout.max_sampling_rounds": 2, "ppo.rollout_correction": "mis",
             "ppo.kl_beta": 0},
    "reinforce_pp": {"ppo.advantage": "reinforce_pp", "ppo.rollout_correction": "seq_tis",
                     "ppo.kl_in_loss": "true"},
}
# train.py with a reward that scores a third of the random policy's responses 1 (by a hash of the
# text), so that some groups are informative and some are not
HASH_REWARD = """import runpy, sys, zlib, torch
import pbrl.prepare
def build_reward(*args, **kwargs):
    def reward(samples):
        score = torch.tensor([float(zlib.crc32(s.response.encode()) % 3 == 0) for s in samples])
        return {"reward": score}
    return reward
pbrl.prepare.build_reward = build_reward
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def run_train(world, out, ranks: int, script="train.py", **extra):
    launch = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone"]
    done = subprocess.run([*launch, str(script), *overrides(world, out, **extra)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(out)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_trains_two_steps_through_train_py(world, tmp_path, name):
    history = run_train(world, tmp_path / name, 1, **OPTIONS[name])
    assert [m["step"] for m in history] == [1, 2]
    for m in history:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert 0 <= m["corrected"] <= 1 and 0 <= m["truncated"] <= 1
    if name == "dapo":
        assert all(m["sampling_rounds"] in (1, 2) for m in history)


def test_batch_level_options_on_two_ranks_give_the_one_rank_run(world, tmp_path):
    """Dynamic sampling (which groups form the batch), REINFORCE++ (whitened over the global batch)
    and a per-response aggregation (its counts) over 2 ranks give what 1 rank gives."""
    extra = {"ppo.advantage": "reinforce_pp_baseline", "rollout.dynamic_sampling": "true",
             "rollout.max_sampling_rounds": 3, "ppo.loss_agg": "seq_mean_token_mean",
             "run.steps": 3}
    script = tmp_path / "hash_reward.py"
    script.write_text(HASH_REWARD)
    one = run_train(world, tmp_path / "one", 1, script, **extra)
    two = run_train(world, tmp_path / "two", 2, script, **extra)
    assert any(0 < m["informative_groups"] for m in one)  # groups were really chosen
    for a, b in zip(one, two, strict=True):
        assert (a["sampling_rounds"], a["informative_groups"]) == \
            (b["sampling_rounds"], b["informative_groups"])
        for key in ("reward", "policy_loss", "entropy", "clipfrac", "response_length", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key


def test_dynamic_sampling_reports_each_round_that_falls_short_and_stops_at_its_cap():
    """With a reward that cannot vary no round finds an informative group: each round says so
    (a step used to sample on silently), and the step ends after max_sampling_rounds."""
    from pbrl.config import Config
    from pbrl.data import Problem
    from pbrl.rewards import Sample
    from pbrl.sampler import Completions, Sampling
    from pbrl.trainer import Trainer
    n, per_step, rounds = 2, 2, 3
    trainer = Trainer.__new__(Trainer)  # only what collect_informative reads
    trainer.cfg, lines, drawn = Config(), [], []
    trainer.cfg.rollout.samples_per_prompt, trainer.cfg.rollout.prompts_per_step = n, per_step
    trainer.cfg.rollout.max_sampling_rounds = rounds
    trainer.log, trainer.step, trainer.rank, trainer.world = lines.append, 4, 0, 1
    trainer.sampling = Sampling(8, n, 1.0, None, None, torch.tensor([1]), 0)

    def constant(draw, timings):  # every sample scores 1: no group teaches anything
        drawn.append(draw)
        problems = [Problem(f"p{draw}-{i}", "de", "q", "1") for i in range(per_step)]
        rows = per_step * n
        completions = Completions(torch.full((rows, 3), 5), torch.full((rows,), 3),
                                  torch.ones(rows, dtype=torch.bool), torch.zeros(rows, 3))
        samples = [Sample("de", "x", "ref", "1") for _ in range(rows)]
        return rollout.Groups(problems, completions, samples, {"reward": torch.ones(rows)},
                              torch.ones(rows, dtype=torch.bool), {})
    trainer.sample_and_score = constant
    batch = trainer.collect_informative({})
    assert drawn == [4 * rounds + k for k in range(rounds)]  # each round its own problems
    assert batch.stats == {"sampling_rounds": rounds, "informative_groups": 0}
    assert len(batch.problems) == per_step
    assert lines[0] == "step 5: dynamic sampling round 1 of 3: 0 of 2 groups informative so far"
    assert len(lines) == rounds and lines[-1].endswith("the rest of the batch is uninformative "
                                                       "groups")
