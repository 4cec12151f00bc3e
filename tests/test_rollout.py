"""The pieces of one PPO iteration, each alone: problem choice per step and rank, sequence seeds,
packing, scoring, response log-probs and values at the right positions, the LR schedule, padding,
the metrics."""
import math

import pytest
import torch

from pbrl import ppo, rollout, losses
from pbrl.data import Problem
from pbrl.model import ModelArgs, Transformer, pad_rows
from pbrl.rewards import AnswerAgreement, ExactMatch, Sample
from pbrl.sampler import Completions

PROBLEMS = [Problem(f"mgsm-{i}", "de", f"Frage {i}", str(i)) for i in range(10)]


def test_each_step_takes_the_next_problems_of_a_seeded_permutation_per_pass():
    steps = [rollout.problems_for_step(PROBLEMS, step, 4, seed=7, rank=0, world=1)
             for step in range(5)]
    first_pass = [p.id for s in steps[:2] for p in s] + [p.id for p in steps[2][:2]]
    # 10 problems: steps 0, 1 and half of 2
    assert sorted(first_pass) == sorted(p.id for p in PROBLEMS)
    second_pass = [p.id for p in steps[2][2:]] + [p.id for s in steps[3:] for p in s]
    # a new permutation
    assert len(set(second_pass)) == len(second_pass) == 10 and second_pass != first_pass
    assert steps == [rollout.problems_for_step(PROBLEMS, s, 4, seed=7, rank=0, world=1)
                     for s in range(5)]
    assert steps != [rollout.problems_for_step(PROBLEMS, s, 4, seed=8, rank=0, world=1)
                     for s in range(5)]


def test_ranks_split_a_step_into_disjoint_slices_that_add_up_to_one_process():
    for step in range(4):
        whole = rollout.problems_for_step(PROBLEMS, step, 4, seed=0, rank=0, world=1)
        parts = [rollout.problems_for_step(PROBLEMS, step, 4, seed=0, rank=r, world=2)
                 for r in range(2)]
        assert parts[0] + parts[1] == whole and len(parts[0]) == 2
    with pytest.raises(ValueError, match="4 problems per step do not split over 3 ranks"):
        rollout.problems_for_step(PROBLEMS, 0, 4, seed=0, rank=0, world=3)


def test_sequence_seed_depends_on_every_part_and_not_on_position():
    p, q = PROBLEMS[0], Problem("mgsm-0", "fr", "Question 0", "0")
    seeds = {rollout.sequence_seed(0, 1, p, 0), rollout.sequence_seed(1, 1, p, 0),
             rollout.sequence_seed(0, 2, p, 0),
             rollout.sequence_seed(0, 1, p, 1), rollout.sequence_seed(0, 1, q, 0)}
    assert len(seeds) == 5  # seed, step, problem id + language and sample index all matter
    assert rollout.sequence_seed(0, 1, p, 0) == rollout.sequence_seed(0, 1, p, 0)


def test_pad_rows_right_pads():
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=9)
    assert (ids.tolist() == [[5, 6, 7], [8, 9, 9]]
            and mask.tolist() == [[True] * 3, [True, False, False]])


def test_sequences_put_each_response_after_its_prompt_right_padded():
    completions = Completions(tokens=torch.tensor([[11, 12, 2], [13, 2, 2]]),
                              lengths=torch.tensor([3, 1]), finished=torch.tensor([True, False]),
                              logprobs=torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]]))
    tokens, lengths, mask, sampled = rollout.sequences([[1, 2], [3, 4, 5]], completions)
    # the pad id 2 after row 1's single token is not a response token, and is written as 0
    assert tokens.tolist() == [[1, 2, 11, 12, 2], [3, 4, 5, 13, 0]] and lengths.tolist() == [5, 4]
    # column t: token t + 1 is a response token
    assert mask.tolist() == [[False, True, True, True], [False, False, True, False]]
    assert torch.equal(sampled, torch.tensor([[0.0, -0.1, -0.2, -0.3], [0.0, 0.0, -0.4, 0.0]]))


def test_score_pairs_each_sample_with_its_problem_and_reference():
    problems = PROBLEMS[:2]
    texts = ["Die Antwort lautet 0.", "Die Antwort lautet 5.", "1", "Die Antwort lautet 1."]
    # the pivot got mgsm-1 wrong
    references = {"mgsm-0": "The answer is 0.", "mgsm-1": "The answer is 7."}
    samples, rewards = rollout.score(AnswerAgreement(), problems, texts, references,
                                     samples_per_prompt=2)
    assert [(s.lang, s.reference, s.gold) for s in samples][1:3] == [
        ("de", "The answer is 0.", "0"), ("de", "The answer is 7.", "1")]
    assert rewards["reward"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert rollout.score(ExactMatch(), problems, texts, references,
                         2)[1]["reward"].tolist() == [1.0, 0.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return Transformer(args, value_head=True).eval()


def test_per_token_logprobs_and_values_read_the_positions_before_each_response_token(tiny):
    """Oracle: log_softmax of the full logits of the row alone at position P + t - 1, gathered at
    its response token t, in column P + t - 1 of the [B, L - 1] layout."""
    prompts, responses = [[3, 4, 5], [6]], [[7, 8], [9, 10, 11]]
    completions = Completions(torch.tensor([[7, 8, 0], [9, 10, 11]]), torch.tensor([2, 3]),
                              torch.tensor([True, False]), torch.zeros(2, 3))
    tokens, lengths, mask, _ = rollout.sequences(prompts, completions)
    with torch.no_grad():
        logp, entropy = losses.per_token(tiny, tokens, lengths, mask, "logprobs", temperature=1.5)
        values = losses.per_token(tiny, tokens, lengths, mask, "values")
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = torch.tensor([prompt + response])
            log_softmax = (tiny(alone)[0] / 1.5).log_softmax(-1)
            full_values = tiny(alone, output="values")[0]
            for t, token in enumerate(response):
                position = len(prompt) + t - 1
                expected = log_softmax[position, token].item()
                assert logp[i, position] == pytest.approx(expected, abs=1e-5)
                probs = log_softmax[position].exp()
                expected = -(probs * log_softmax[position]).sum().item()
                assert entropy[i, position] == pytest.approx(expected, abs=1e-5)
                assert values[i, position] == pytest.approx(full_values[position].item(), abs=1e-5)
        for x in (logp, entropy, values):  # nothing outside the response tokens
            assert x[~mask].eq(0).all()


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.1), (20, 0.1),
                                           (9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))])
def test_lr_schedule_cosine(step, expected):
    assert ppo.lr_factor(step, warmup_steps=4, schedule="cosine",
                         total_steps=14) == pytest.approx(expected)


def test_lr_schedule_constant():
    assert [ppo.lr_factor(s, 2, "constant", 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_rollout_metrics_over_two_ranks_equal_one_process():
    g = torch.Generator().manual_seed(0)
    b, t = 4, 5
    mask = torch.rand(b, t, generator=g) > 0.3
    exp = losses.Experience(torch.zeros(b, t + 1), torch.full((b,), 3), mask,
                            *(torch.randn(b, t, generator=g) for _ in range(8)))
    ref = "7 - 3 = 4. The answer is 4."
    samples = [Sample("de", "7 - 3 = 4. Die Antwort lautet 4.", ref), Sample("de", ref, ref),
               Sample("fr", "La réponse est 4.", ref), Sample("fr", "La réponse est", ref)]
    rewards = {"reward": torch.tensor([1.0, 0.0, 0.5, 0.5]),
               "agreement": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    finished = torch.tensor([True, False, True, True])
    completions = Completions(torch.zeros(b, 2), torch.tensor([3, 1, 2, 5]), finished,
                              torch.zeros(b, 2))
    corrected = mask & (torch.rand(b, t, generator=g) > 0.5)
    batch = rollout.Groups([None] * 2, completions, samples, rewards, finished, {})
    whole = rollout.rollout_metrics(batch, exp, corrected, lambda x: x, lambda o: [o])
    assert whole["reward/de"] == 0.5 and whole["reward/fr"] == 0.5 and whole["agreement"] == 0.5
    assert whole["response_tokens"] == mask.sum().item()
    assert whole["response_length"] == mask.sum().item() / 4
    assert whole["truncated"] == 0.25
    assert whole["corrected"] == pytest.approx(corrected.sum().item() / mask.sum().item())
    # the per-language diagnostics (rewards.response_checks) and the length's percentiles
    assert (whole["fidelity/de/english"], whole["fidelity/de/copy"]) == (0.5, 0.5)
    assert (whole["fidelity/de/in_language"], whole["fidelity/fr/in_language"]) == (0.5, 1.0)
    assert (whole["fidelity/fr/extracted"], whole["fidelity/de/extracted"]) == (0.5, 1.0)
    assert (whole["response_length_p50"], whole["response_length_p90"],
            whole["response_length_max"]) == (2.0, 5.0, 5.0)

    halves = [slice(0, 2), slice(2, 4)]

    def local(h):
        mine = completions._replace(finished=finished[h], lengths=completions.lengths[h])
        part = rollout.Groups([None], mine, samples[h], {k: v[h] for k, v in rewards.items()},
                              finished[h], {})
        return part, exp.rows(torch.arange(4)[h]), corrected[h]
    captured = {}
    for i, h in enumerate(halves):  # record what each 'rank' sends into its collectives
        sent = captured[i] = []
        rollout.rollout_metrics(*local(h), lambda x, sent=sent: sent.append(x) or x,
                                lambda o, sent=sent: sent.append(o) or [o])
    theirs = iter(captured[1])
    split = rollout.rollout_metrics(*local(halves[0]), lambda x: x + next(theirs),
                                    lambda o: [o, next(theirs)])
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, abs=1e-6), key


def test_the_actor_loss_measures_the_sampler_mismatch_and_reads_its_own_old_logprobs(tiny):
    """Sums over the tokens of the loss of |sampler - old| and k3(sampler || old); with no old
    log-probs (a one-step update) the old ones are its own forward's: ratio 1, the mismatch
    against those."""
    from pbrl.config import PPOConfig
    g = torch.Generator().manual_seed(3)
    completions = Completions(torch.tensor([[7, 8, 0], [9, 10, 11]]), torch.tensor([2, 3]),
                              torch.tensor([True, False]), -torch.rand(2, 3, generator=g))
    tokens, lengths, mask, sampled = rollout.sequences([[3, 4, 5], [6]], completions)
    old = torch.where(mask, -torch.rand(mask.shape, generator=g), 0.0)
    weights = mask & torch.tensor([[True], [False]])  # the second response filtered out
    exp = losses.Experience(tokens, lengths, mask, sampled, old, None, *(torch.zeros(mask.shape),)
                            * 4, weights.float())
    counts = ppo.count(weights)
    _, stats = losses.actor_loss(tiny, exp, counts, PPOConfig(), 1.0, 0.0)
    gap = (sampled - old)[weights]
    assert stats["logprob_mismatch"] == pytest.approx(gap.abs().sum().item())
    assert stats["logprob_mismatch_k3"] == pytest.approx((gap.neg().exp() - 1 + gap).sum().item())
    _, own = losses.actor_loss(tiny, exp._replace(old_logprobs=None), counts, PPOConfig(), 1.0,
                               0.0)
    with torch.no_grad():
        logp = losses.per_token(tiny, tokens, lengths, mask, "logprobs")[0]
    assert own["approx_kl"] == 0 and own["clipfrac"] == 0
    assert own["logprob_mismatch"] == pytest.approx((sampled - logp)[weights].abs().sum().item())


def test_each_micro_batch_is_as_wide_as_its_longest_row(tiny):
    """The model sees each row but its last token, as wide as the longest row (5 tokens -> 4
    columns), whatever padding the batch carries; the outputs come back in the batch's own width."""
    completions = Completions(torch.tensor([[7, 8, 0], [9, 10, 11]]), torch.tensor([2, 3]),
                              torch.tensor([True, False]), torch.zeros(2, 3))
    tokens, lengths, mask, _ = rollout.sequences([[3, 4, 5], [6]], completions)
    wide = (torch.cat([tokens, torch.zeros(2, 3, dtype=tokens.dtype)], 1), lengths,
            torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1))
    widths = []
    hook = tiny.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    with torch.no_grad():
        narrow = losses.per_token(tiny, tokens, lengths, mask, "logprobs") + \
            (losses.per_token(tiny, tokens, lengths, mask, "values"),)
        broad = losses.per_token(tiny, *wide,
                                 "logprobs") + (losses.per_token(tiny, *wide, "values"),)
    hook.remove()
    assert widths == [4] * 4
    for a, b in zip(narrow, broad):
        assert a.shape == (2, 4) and b.shape == (2, 7) and b[:, 4:].eq(0).all()
        assert torch.equal(a, b[:, :4])


def test_advantages_by_estimator_and_where_the_kl_goes():
    from pbrl.config import PPOConfig
    g = torch.Generator().manual_seed(2)
    scores, kl = torch.rand(4, generator=g), torch.rand(4, 3, generator=g) * 0.1
    values = torch.rand(4, 3, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    groups = torch.tensor([0, 0, 1, 1])
    cfg = PPOConfig(whiten_advantages=False)
    adv, returns = ppo.advantages(cfg, scores, kl, values, mask, groups, 0.5, lambda x: x)
    expected = ppo.gae(ppo.per_token_rewards(scores, kl, mask, 0.5), values, mask, cfg.gamma,
                       cfg.lam)
    assert torch.equal(adv, expected[0]) and torch.equal(returns, expected[1])
    cfg = PPOConfig(advantage="rloo")
    adv, returns = ppo.advantages(cfg, scores, kl, values, mask, groups, 0.5, lambda x: x)
    sequence = scores - 0.5 * (kl * mask).sum(1)  # the response's summed KL folded into its score
    assert torch.allclose(adv[:, 0],
                          torch.stack([sequence[0] - sequence[1], sequence[1] - sequence[0],
                                                  sequence[2] - sequence[3],
                                       sequence[3] - sequence[2]]))
    assert returns.eq(0).all()
    # the KL is the loss's, not the reward's
    cfg = PPOConfig(advantage="grpo", group_std=False, kl_in_loss=True)
    adv, _ = ppo.advantages(cfg, scores, kl, values, mask, groups, 0.5, lambda x: x)
    assert torch.allclose(adv[:, 0],
                          torch.stack([scores[0] - scores[:2].mean(), scores[1] - scores[:2].mean(),
                                                  scores[2] - scores[2:].mean(),
                                       scores[3] - scores[2:].mean()]))
