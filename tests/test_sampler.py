"""The KV-cached sampler against decoding by repeated full forward passes (no cache, no padding)."""
import pytest
import torch

from pbrl.checkpoint import load_model
from pbrl.sampler import generate, sample_next

PROMPTS = [[5, 17, 33, 2, 90, 14, 7], [8, 3], [41, 42, 43, 44]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import save_hf_model
    d = tmp_path_factory.mktemp("qwen3")
    save_hf_model(d, "qwen3", seed=3)
    return load_model(d)


def greedy_by_full_forward(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_cache_equals_full_forward_argmax(model):
    out = generate(model, PROMPTS[:1], max_new_tokens=12)
    assert out.as_lists()[0] == greedy_by_full_forward(model, PROMPTS[0], 12)


def test_left_padded_batch_equals_each_prompt_alone(model):
    batch = generate(model, PROMPTS, max_new_tokens=10, return_logprobs=True)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], max_new_tokens=10, return_logprobs=True)
        assert batch.as_lists()[i] == alone.as_lists()[0] == greedy_by_full_forward(model, p, 10)
        assert torch.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_stop_ids_end_rows_and_early_exit(model):
    free = generate(model, PROMPTS, max_new_tokens=8).as_lists()
    stop = free[1][2]  # the third token row 1 produces
    out = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[stop], pad_id=-1)
    for i, row in enumerate(out.as_lists()):
        expected = free[i][:free[i].index(stop) + 1] if stop in free[i] else free[i]
        assert row == expected
        assert bool(out.finished[i]) == (stop in free[i])
        assert (out.tokens[i, out.lengths[i]:] == -1).all()
    # Every row stopping at its first token: the loop exits after one step.
    first = generate(model, [PROMPTS[0]], max_new_tokens=8).as_lists()[0][0]
    short = generate(model, [PROMPTS[0]], max_new_tokens=8, stop_ids=[first])
    assert short.tokens.shape == (1, 1) and short.finished.all()


def test_seed_reproducibility_and_n_samples(model):
    a = generate(model, PROMPTS, 16, temperature=1.0, n=3, seed=7)
    b = generate(model, PROMPTS, 16, temperature=1.0, n=3, seed=7)
    c = generate(model, PROMPTS, 16, temperature=1.0, n=3, seed=8)
    assert a.tokens.shape[0] == 9
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.as_lists()[:3]}) > 1  # the samples of one prompt differ


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_sampling_logprobs_equal_full_forward_logprobs(model, temperature):
    out = generate(model, PROMPTS, 9, temperature=temperature, top_k=50, seed=1, return_logprobs=True)
    for i, p in enumerate(PROMPTS):
        completion = out.as_lists()[i]
        ids = torch.tensor([p + completion])
        with torch.no_grad():
            logits = model(ids)[0, len(p) - 1:-1].float() / (temperature or 1.0)
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(out.logprobs[i, :len(completion)], expected, atol=1e-5)
        assert (out.logprobs[i] <= 0).all()


def test_top_k_and_top_p_truncate():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    k1 = {int(sample_next(logits, 1.0, 1, None, g)) for _ in range(50)}
    k2 = {int(sample_next(logits, 1.0, 2, None, g)) for _ in range(200)}
    # softmax: p0 ~ 0.50, p1 ~ 0.45, rest ~ 0.05. top_p=0.5 keeps token 0 only; 0.9 keeps tokens 0 and 1.
    p_small = {int(sample_next(logits, 1.0, None, 0.4, g)) for _ in range(50)}
    p_mid = {int(sample_next(logits, 1.0, None, 0.9, g)) for _ in range(300)}
    assert k1 == {0} and k2 == {0, 1} and p_small == {0} and p_mid == {0, 1}


def test_prompt_longer_than_context_is_an_error(model):
    too_long = [1] * (model.args.max_position_embeddings - 3)
    with pytest.raises(ValueError, match=r"prompt of 509 tokens \+ max_new_tokens=4 exceeds the model's context"):
        generate(model, [too_long], max_new_tokens=4)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=4)


def test_per_row_generators_make_samples_independent_of_the_batch(model):
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    batch = generate(model, PROMPTS, 12, temperature=1.0, n=2, generator=gens([10, 11, 20, 21, 30, 31]))
    alone = generate(model, PROMPTS[1:2], 12, temperature=1.0, n=2, generator=gens([20, 21]))
    assert batch.as_lists()[2:4] == alone.as_lists()
    with pytest.raises(ValueError, match="one generator per row"):
        generate(model, PROMPTS, 4, temperature=1.0, generator=gens([1, 2]))


def test_gumbel_sampling_matches_the_softmax_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, None, None, g) for _ in range(20000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 20000
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.015)
