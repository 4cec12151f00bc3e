"""The KV-cached sampler against decoding by repeated full forward passes (no cache, no padding)."""
import pytest
import torch

from pbrl import kernels

from conftest import each_batch_size_kept_its_addresses, observe_compiled_steps
from pbrl.checkpoint import load_model
from pbrl.cudagraphs import CudaGraphs
from pbrl.sampler import Sampling, generate, sample_next

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


@pytest.mark.triton_sampling
def test_greedy_cache_equals_full_forward_argmax(model):
    out = generate(model, PROMPTS[:1], max_new_tokens=12)
    assert out.as_lists()[0] == greedy_by_full_forward(model, PROMPTS[0], 12)


def test_padded_batch_equals_each_prompt_alone(model):
    batch = generate(model, PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], max_new_tokens=10)
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
    out = generate(model, PROMPTS, 9, temperature=temperature, top_k=50, seed=1)
    for i, p in enumerate(PROMPTS):
        completion = out.as_lists()[i]
        ids = torch.tensor([p + completion])
        with torch.no_grad():
            logits = model(ids)[0, len(p) - 1:-1].float() / (temperature or 1.0)
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(out.logprobs[i, :len(completion)], expected, atol=1e-5)
        assert (out.logprobs[i] <= 0).all()


def sampling(temperature=1.0, top_k=None, top_p=None):
    return Sampling(8, 1, temperature, top_k, top_p, torch.tensor([], dtype=torch.long), 0)


def draws(logits, top_k, top_p, n):
    keys = kernels.row_keys(torch.arange(n), 0)
    return set(sample_next(logits.expand(n, -1), sampling(1.0, top_k, top_p), keys)[0].tolist())


def test_top_k_and_top_p_truncate():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    # softmax: p0 ~ 0.50, p1 ~ 0.45, rest ~ 0.05. top_p=0.4 keeps token 0 only; 0.9 keeps tokens 0
    # and 1.
    assert draws(logits, 1, None, 50) == {0} and draws(logits, 2, None, 200) == {0, 1}
    assert draws(logits, None, 0.4, 50) == {0} and draws(logits, None, 0.9, 300) == {0, 1}
    assert draws(logits, None, None, 300) == {0, 1, 2, 3}
    # the log-prob is the untruncated one's, whatever was cut
    tokens, logp = sample_next(logits, sampling(1.0, 1), kernels.row_keys(torch.tensor([0]), 0))
    assert torch.allclose(logp, logits.log_softmax(-1)[0, :1])


def test_prompt_longer_than_context_is_an_error(model):
    too_long = [1] * (model.args.max_position_embeddings - 3)
    with pytest.raises(ValueError,
                       match=r"prompt of 509 tokens \+ max_new_tokens=4 exceeds the model's "
                             r"context"):
        generate(model, [too_long], max_new_tokens=4)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=4)


@pytest.mark.triton_sampling  # the Triton kernel, in the interpreter
def test_per_row_seeds_make_samples_independent_of_the_batch(model):
    batch = generate(model, PROMPTS, 12, temperature=1.0, n=2, seeds=[10, 11, 20, 21, 30, 31])
    alone = generate(model, PROMPTS[1:2], 12, temperature=1.0, n=2, seeds=[20, 21])
    assert batch.as_lists()[2:4] == alone.as_lists()
    with pytest.raises(ValueError,
                       match="one seed per row: need len\\(prompts\\) \\* n = 3, got 2"):
        generate(model, PROMPTS, 4, temperature=1.0, seeds=[1, 2])


def test_compacting_finished_rows_changes_no_output(model, monkeypatch):
    """Rows that stop early leave the batch (looked at every 2 steps here): every row's tokens and
    log-probs equal the same generation without compaction (SYNC_EVERY beyond the length) and the
    row generated alone."""
    import pbrl.sampler as sampler
    prompts = [[5, 17, 33, 2, 90, 14, 7], [8, 3], [41, 42, 43, 44], [9], [60, 61, 62],
               [7, 7, 7, 7, 7]]
    seeds = list(range(100, 112))
    free = generate(model, prompts, 12, temperature=1.0, n=2, seeds=seeds).as_lists()
    stops = sorted({row[i] for row, i in zip(free, (1, 3, 2, 6, 0, 9, 4, 11, 5, 2, 8, 1))})
    kwargs = dict(temperature=1.0, n=2, seeds=seeds, stop_ids=stops)
    monkeypatch.setattr(sampler, "SYNC_EVERY", 100)
    whole = generate(model, prompts, 12, **kwargs)
    monkeypatch.setattr(sampler, "SYNC_EVERY", 2)
    batch_sizes = []
    real_step = sampler.decode_step
    monkeypatch.setattr(sampler, "decode_step", lambda model, st,
                        *a: batch_sizes.append(len(st.ids)) or
                        real_step(model, st, *a))
    compacted = generate(model, prompts, 12, **kwargs)
    assert (compacted.as_lists() == whole.as_lists()
            and torch.equal(compacted.lengths, whole.lengths))
    assert torch.equal(compacted.finished, whole.finished)
    assert torch.allclose(compacted.logprobs, whole.logprobs, atol=1e-6)
    assert batch_sizes[0] == 12 and min(batch_sizes) < 8  # the batch did shrink
    assert sorted(whole.lengths.tolist())[0] < 4 and whole.finished.sum() >= 8
    for i in (0, 5, 11):
        alone = generate(model, [prompts[i // 2]], 12, **{**kwargs, "n": 1, "seeds": [100 + i]})
        assert alone.as_lists()[0] == whole.as_lists()[i]


def test_compiled_calls_give_each_batch_size_the_same_addresses(model, monkeypatch):
    """A CUDA graph reads its inputs where they were when it was recorded. With CudaGraphs every
    step of a batch size reads the same tensor addresses, within a call (compaction moves live rows
    to the front of the same buffers) and across calls of one shape (the state is kept); each call's
    results are its own copies, the same as eager decoding's; a call of another shape replaces the
    kept state."""
    import pbrl.sampler as sampler
    prompts = [[5, 17, 33, 2, 90, 14, 7], [8, 3], [41, 42, 43, 44], [9], [60, 61, 62],
               [7, 7, 7, 7, 7]]
    free = generate(model, prompts, 12, temperature=1.0, n=2, seed=1).as_lists()
    stops = sorted({row[i] for row, i in zip(free, (1, 3, 2, 6, 0, 9, 4, 11, 5, 2, 8, 1))})
    kwargs = dict(temperature=1.0, n=2, stop_ids=stops)
    seen = observe_compiled_steps(monkeypatch)
    monkeypatch.setattr(sampler, "SYNC_EVERY", 2)
    graphs = CudaGraphs()
    first = generate(model, prompts, 12, seed=1, graphs=graphs, **kwargs)
    steps = len(seen)
    kept = [t.clone() for t in first[:3]]
    second = generate(model, prompts, 12, seed=1, graphs=graphs, **kwargs)
    eager = generate(model, prompts, 12, seed=1, **kwargs)
    # the second call did not write into the first's
    assert all(torch.equal(a, b) for a, b in zip(first[:3], kept))
    assert second.as_lists() == eager.as_lists() and torch.equal(second.finished, eager.finished)
    assert torch.allclose(second.logprobs, eager.logprobs, atol=1e-6)
    addresses = each_batch_size_kept_its_addresses(seen)
    assert len(addresses) > 2 and len(seen) == 2 * steps  # the batch shrank; both calls stepped
    generate(model, prompts, 5, seed=1, graphs=graphs, **kwargs)
    assert graphs.kept.tokens.shape[1] == 5  # the new shape's state replaced the old


def test_calls_given_one_cache_length_keep_one_shape_whatever_their_prompts(model, monkeypatch):
    """Each call's own cache is its longest prompt + max_new_tokens, rounded to 128 slots when
    compiling: prompts of 3 and 60 tokens with 70 new tokens need 128 and 256 slots, a new state and
    new CUDA graphs at every switch. Given slots=256, every call steps on the same addresses, and
    decodes what a cache of its own length decodes."""
    short, long = [[5, 17, 33]], [[(7 * i) % 50 + 1 for i in range(60)]]
    with pytest.raises(ValueError,
                       match=r"slots=129 cannot hold the longest prompt \(60 tokens\) \+ max_new_"):
        generate(model, long, 70, slots=129)
    own = [generate(model, p, 70, temperature=1.0, seed=2) for p in (short, long, short)]
    seen = observe_compiled_steps(monkeypatch)
    graphs = CudaGraphs()
    fixed = [generate(model, p, 70, temperature=1.0, seed=2, graphs=graphs, slots=256)
             for p in (short, long, short)]
    assert [o.as_lists() for o in fixed] == [o.as_lists() for o in own]
    assert len({tuple(pointers) for _, pointers in seen}) == 1 and len(seen) == 3 * 69


def test_the_compiled_decoding_step_is_one_graph_and_decodes_the_same(model, monkeypatch):
    """CudaGraphs' step with fullgraph=True (AOT autograd tracing instead of inductor code
    generation, to keep the test fast): a graph break is an error; greedy and sampled tokens equal
    the eager step's."""
    import pbrl.cudagraphs
    import pbrl.sampler as sampler
    torch._dynamo.reset()
    monkeypatch.setattr(pbrl.cudagraphs, "COMPILE_OPTIONS",
                        {"backend": "aot_eager", "fullgraph": True, "dynamic": False})
    monkeypatch.setattr(sampler, "SYNC_EVERY", 3)
    graphs = CudaGraphs()
    for kwargs in (dict(), dict(temperature=1.0, n=2, seed=5, stop_ids=[17, 40])):
        eager = generate(model, PROMPTS, 10, **kwargs)
        compiled = generate(model, PROMPTS, 10, graphs=graphs, **kwargs)
        assert compiled.as_lists() == eager.as_lists()
        assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-5)


def test_the_host_looks_at_the_batch_once_every_sync_every_steps(model):
    """Host syncs (tensor -> Python scalar: .item(), bool(), int()) during 40 decoding steps: one
    per SYNC_EVERY steps, plus the prefill's padding check and the final width."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import pbrl.sampler as sampler

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.syncs += 1
            return func(*args, **(kwargs or {}))
    with CountSyncs():
        out = generate(model, PROMPTS, 40, temperature=1.0, seed=0)
    assert out.tokens.shape[1] == 40
    assert CountSyncs.syncs <= 40 // sampler.SYNC_EVERY + 2, CountSyncs.syncs


def test_between_decoding_steps_the_host_launches_nothing_but_its_periodic_look(model, monkeypatch):
    """Everything a decoding step does (model, sampling, recording, finishing) is inside
    decode_step, the function that compiles to one CUDA graph: between two steps the host runs no
    tensor operation, except at its look at the batch every SYNC_EVERY steps (views, such as the
    eager step's cache up to the furthest slot, launch nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import pbrl.sampler as sampler
    events = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            events.extend([] if func.is_view else ["op"])
            return func(*args, **(kwargs or {}))
    real_step = sampler.decode_step

    def step(*args):
        events.append("step")
        with torch._C._DisableTorchDispatch():  # the step's own operations are not counted
            real_step(*args)
    monkeypatch.setattr(sampler, "decode_step", step)
    with Record():
        generate(model, PROMPTS, 40, temperature=1.0, seed=0)
    first, last = events.index("step"), len(events) - events[::-1].index("step")
    between = events[first:last]
    assert between.count("step") == 39
    looks = (40 - 1) // sampler.SYNC_EVERY
    # (~done).sum() and its int(): a few ops per look
    assert between.count("op") <= 4 * looks, between.count("op")


def test_eager_decoding_attends_over_the_filled_slots_only(model, monkeypatch):
    """With a cache of 500 slots, step t (from 1) of eager decoding gives attention the slots up to
    the furthest row's, longest prompt + t, and samples what a cache of exactly that length does."""
    import pbrl.model
    seen, real = [], pbrl.model.decode_attention
    monkeypatch.setattr(pbrl.model, "decode_attention",
                        lambda q, k, v, p: seen.append(k.shape[2]) or real(q, k, v, p))
    out = generate(model, PROMPTS, 6, temperature=1.0, seed=3, slots=500)
    layers, longest = model.args.num_hidden_layers, max(map(len, PROMPTS))
    assert seen == [longest + t for t in range(1, 6) for _ in range(layers)]
    assert out.as_lists() == generate(model, PROMPTS, 6, temperature=1.0, seed=3).as_lists()
