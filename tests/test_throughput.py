"""Throughput work that must not change what is computed (#29): a one-step update takes its old
log-probs from its own forward pass."""
import pytest
import torch

from conftest import no_model_loads, overrides
from pbrl import rollout, losses
from pbrl.config import PPOConfig, load_config
from pbrl.model import ModelArgs, Transformer, document_causal
from pbrl.sampler import Completions
from pbrl.prepare import prepare
from test_objectives import run_train

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


# ------------------------------------------------------- packed, token-budgeted micro-batches
@pytest.fixture(scope="module")
def gqa():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=64)
    return Transformer(args, value_head=True)


def ragged_batch(seed=0, rows=5, samples=1):
    """Prompts of 2-6 tokens (each for `samples` rows in a row) and responses of 1-7 (one of 1
    token), right padded."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 50, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 7, (rows // samples,), generator=g)]
    prompts = [p for p in prompts for _ in range(samples)]
    lengths = torch.randint(1, 8, (rows,), generator=g)
    lengths[1] = 1
    completions = Completions(torch.randint(1, 50, (rows, 7), generator=g), lengths,
                              torch.ones(rows, dtype=torch.bool), torch.zeros(rows, 7))
    return rollout.sequences(prompts, completions)[:3]


PACKINGS = {"padded": lambda *a: losses.per_token(*a, packed=False),
            "packed": lambda *a: losses.packed_per_token(*a, share=False),
            "each prompt once": losses.packed_per_token}


@pytest.mark.parametrize("packing", ["packed", "each prompt once"])
@pytest.mark.parametrize("output", ["logprobs", "values"])
def test_packed_rows_give_the_padded_outputs_and_gradients(gqa, output, packing):
    """One packed row (positions restarting, attention confined per sequence; or each prompt once,
    its samples' responses attending to it) against the padded batch: the same log-probs,
    entropies or values, and the same gradients of every weight (the embeddings' included, so the
    gradients into the shared prompts' positions)."""
    tokens, lengths, mask = ragged_batch(rows=9, samples=3)
    assert len(losses.prompt_groups(tokens, lengths, mask)) == 3
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for name in ("padded", packing):
        gqa.zero_grad()
        out = PACKINGS[name](gqa, tokens, lengths, mask, output, 0.7)
        out = out if isinstance(out, tuple) else (out,)
        sum((x * weights).sum() for x in out).backward()
        results.append((out, {n: p.grad.clone() for n, p in gqa.named_parameters()
                              if p.grad is not None}))
    (padded, padded_grads), (packed, packed_grads) = results
    for a, b in zip(padded, packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:.*without torch.compile:UserWarning")  # flex on the CPU
@pytest.mark.parametrize("flex", [False, True])
def test_both_forms_of_document_attention_equal_a_masked_softmax(flex):
    """document_causal's two forms (FlexAttention's block mask, causal SDPA per sequence) against
    softmax(q k^T / sqrt(d)) v written out, with the document-causal mask and GQA's shared heads."""
    g = torch.Generator().manual_seed(0)
    docs = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3])
    q, k, v = (torch.randn(1, h, len(docs), 8, generator=g) for h in (4, 2, 2))
    seen = (docs[:, None] == docs[None]) & (torch.arange(10)[:, None] >= torch.arange(10))
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    expected = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    out = document_causal(docs, flex=flex)(0, q, k, v)  # flex on the CPU: eager, unfused
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_token_micro_batches_fit_balance_and_agree_on_a_count_over_ranks():
    widths = [30, 7, 12, 25, 3, 18, 9, 40, 1, 22]
    batches = losses.token_micro_batches(widths, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(widths)))
    loads = [sum(widths[i] for i in b) for b in batches]
    assert max(loads) <= 64 and len(batches) == 3  # 167 tokens: the fewest possible
    assert max(loads) - min(loads) <= max(widths)
    # another rank needs 4 micro-batches: this one runs 4 as well, none empty
    def gather(x):  # another rank that needs 4 micro-batches and fits them
        return [x, False] if isinstance(x, bool) else [x, max(x, 4)]
    batches = losses.token_micro_batches(widths, 64, gather)
    assert len(batches) == 4 and all(batches)
    with pytest.raises(ValueError, match="a sequence of 40 tokens does not fit "
                                         "ppo.micro_batch_tokens=39"):
        losses.token_micro_batches(widths, 39)


def test_packed_budgets_and_tensor_parallel_rollouts_train_as_padded_micro_batches(world, tmp_path):
    """The same run with packed micro-batches of at most 240 tokens, on 1 rank and (torchrun, gloo,
    FSDP2) on 2, those 2 decoding as one tensor-parallel group (rollout.tensor_parallel 2: the same
    rollouts): the loss is the exact global token mean however the rows are grouped."""
    evals = {"data.eval_path": world / "data", "data.eval_langs": "de", "run.eval_every": "off"}
    padded = train(world, tmp_path / "padded", **{"ppo.micro_batch_size": 3}, **evals)[0]
    packed = train(world, tmp_path / "packed", **{"ppo.micro_batch_tokens": 240})[0]
    two = run_train(world, tmp_path / "two", 2, **ONE_STEP, **evals, **{
        "ppo.micro_batch_tokens": 240, "rollout.tensor_parallel": 2})
    assert [m.get("acc/de") for m in two] == [m.get("acc/de") for m in padded]  # eval as a group
    padded, two = ([m for m in run if m["step"] > 0] for run in (padded, two))
    for run in (packed, two):
        for a, b in zip(padded, run, strict=True):
            for key in ("reward", "policy_loss", "entropy", "grad_norm", "response_length",
                        "logprob_mismatch"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(padded, packed):  # 8 rows of 4 prompts: each prompt computed once, not twice
        real = a["sequence_tokens"] - 8
        assert a["update_tokens"] >= real
        assert a["padding"] == pytest.approx(1 - real / a["update_tokens"])
        assert b["padding"] == 0 and b["update_tokens"] < real


def test_a_sequence_longer_than_the_token_budget_fails_before_any_model_loads(world, tmp_path,
                                                                             monkeypatch):
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match="does not fit ppo.micro_batch_tokens=8"):
        prepare(load_config(None, overrides(world, tmp_path / "x", **{
            "ppo.micro_batch_tokens": 8})), log=lambda *a: None)


def test_each_prompt_once_computes_a_prompt_once_per_group():
    """The packed row holds each group's prompt but its last token once, then per row that last
    token and the response but its last token, at the columns (positions) they come from; a group
    too wide for the budget is cut into parts that each fit with their own copy of the prompt."""
    tokens = torch.tensor([[5, 6, 7, 1, 2, 0], [5, 6, 7, 3, 0, 0], [9, 8, 4, 4, 4, 4]])
    lengths = torch.tensor([5, 4, 6])
    mask = rollout.sequences([[5, 6, 7], [5, 6, 7], [9, 8]], Completions(
        torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 4, 4, 4]]), torch.tensor([2, 1, 4]),
        torch.ones(3, dtype=torch.bool), torch.zeros(3, 4)))[2]
    rows, cols, docs, prefix = losses.packing(tokens, lengths, mask)
    assert rows.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert cols.tolist() == [0, 1, 2, 3, 2, 0, 1, 2, 3, 4]
    assert tokens[rows, cols].tolist() == [5, 6, 7, 1, 7, 9, 8, 4, 4, 4]
    assert docs.tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 3, 3]
    assert prefix.tolist() == [-1, -1, 0, 0, 0, -1, -1, -1, -1, -1]
    assert losses.packing_units(tokens, lengths, mask, 10) == [([0, 1], 5), ([2], 5)]
    assert losses.packing_units(tokens, lengths, mask, 4) == [([0], 4), ([1], 3), ([2], 5)]


@pytest.mark.filterwarnings("ignore:.*without torch.compile:UserWarning")  # flex on the CPU
@pytest.mark.parametrize("flex", [False, True])
def test_prompt_sharing_attention_equals_a_masked_softmax(flex):
    """Sequences 1 and 2 see all of sequence 0 (their prompt) and themselves causally; 3 only
    itself: both forms against the written-out masked softmax."""
    g = torch.Generator().manual_seed(0)
    docs = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    prefix = torch.tensor([-1, -1, -1, 0, 0, 0, 0, 0, -1, -1])
    q, k, v = (torch.randn(1, h, len(docs), 8, generator=g) for h in (4, 2, 2))
    t = torch.arange(10)
    seen = ((docs[:, None] == docs[None]) & (t[:, None] >= t)) | (prefix[:, None] == docs[None])
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    expected = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    out = document_causal(docs, prefix, flex=flex)(0, q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*without torch.compile:UserWarning")  # flex on the CPU
def test_flex_attention_inside_compiled_blocks_is_one_graph_that_equals_eager(gqa):
    """models.compile with packed rows, as on CUDA: the blocks compiled with fullgraph=True (AOT
    autograd tracing, not inductor) around FlexAttention with a prompt-sharing block mask give the
    eager outputs. Forward only: FlexAttention has no backward on the CPU."""
    import copy
    docs = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    prefix = torch.tensor([-1, -1, -1, 0, 0, 0, 0, 0, -1, -1])
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1]])
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(0))
    compiled = copy.deepcopy(gqa)
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        outputs = [m(ids, output="hidden", positions=positions,
                     attend=document_causal(docs, prefix, flex=True)) for m in (gqa, compiled)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
