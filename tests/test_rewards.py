"""Rewards against independent computations: one text at a time, no padding, no batching."""
import math

import pytest
import torch

from conftest import hf_config, randomize, save_hf_model
from pbrl.checkpoint import load_model
from pbrl.rewards import (REWARDS, AnswerAgreement, Embedder, EmbeddingReward, ExactMatch,
                          FormatReward, HybridReward, LanguageConsistency, MTReward, Sample,
                          language_share)
from pbrl.translators import TRANSLATE_PROMPT, Translator
from pbrl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    """A bare Qwen3Model checkpoint (no `model.` prefix, no LM head), as Qwen3-Embedding ships."""
    from transformers import Qwen3Model
    from conftest import build_tokenizer
    d = tmp_path_factory.mktemp("embedder")
    randomize(Qwen3Model(hf_config("qwen3")), seed=5).save_pretrained(d)
    build_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    return d


@pytest.fixture(scope="module")
def translator_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("translator")
    save_hf_model(d, "llama", seed=9)
    return d


def embed_alone(model, tokenizer, text, pooling="last"):
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    with torch.no_grad():
        h = model(torch.tensor([ids]), output="hidden")[0].float()
    v = h[-1] if pooling == "last" else h.mean(0)
    return v / v.norm()


TEXTS = ["Janet has 3 apples. The answer is 3.", "Die Antwort lautet 7.", "La réponse est 12.",
         "Jibu ni 3.", "Hello there, how are you today?"]
REFS = ["The answer is 3.", "The answer is 7.", "You are a helpful assistant.", "The answer is 42.",
        "user"]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embedding_reward_matches_one_at_a_time_cosine(embedder_dir, pooling):
    # batches of mixed lengths
    embedder = Embedder.from_pretrained(embedder_dir, pooling=pooling, batch_size=2)
    reward = EmbeddingReward(embedder)
    samples = [Sample("en", t, r) for t, r in zip(TEXTS, REFS)]
    got = reward(samples)
    expected = [max(0.0, float(embed_alone(embedder.model, embedder.tokenizer, t, pooling)
                               @ embed_alone(embedder.model, embedder.tokenizer, r,
                                             pooling))) for t, r in
                zip(TEXTS, REFS)]
    assert torch.allclose(got["reward"], torch.tensor(expected), atol=1e-5)
    assert torch.equal(got["reward"], got["embedding"])
    assert torch.allclose(reward([Sample("de", t, t) for t in TEXTS])["reward"], torch.ones(5),
                          atol=1e-5)


def test_embedding_reward_floor_for_empty_and_garbage(embedder_dir):
    reward = EmbeddingReward(Embedder.from_pretrained(embedder_dir))
    out = reward([Sample("de", "", "The answer is 3."), Sample("de", "   \n", "x"),
                  Sample("de", "\x00\ufffd%%", "x"), Sample("de", "Die Antwort lautet 3.", None)])
    out = out["reward"]
    assert out[0] == 0 and out[1] == 0 and out[3] == 0
    assert torch.isfinite(out).all() and 0 <= out[2] <= 1


def test_mt_reward_translates_through_the_sampler(embedder_dir, translator_dir):
    """The translation is what greedy decoding by full forward passes gives for the stated prompt;
    the reward is the embedding reward of that translation against the reference."""
    embedder = Embedder.from_pretrained(embedder_dir)
    model, tok = load_model(translator_dir), Tokenizer.from_pretrained(translator_dir)
    reward = MTReward(Translator(model, tok, max_new_tokens=6, batch_size=2), embedder)
    samples = [Sample("de", "Die Antwort lautet 7.", "The answer is 7."),
               Sample("en", "The answer is 3.", "3"),
               Sample("sw", "Jibu ni 3.", "The answer is 3."), Sample("fr", "", "The answer is 1.")]
    got = reward(samples)["reward"]
    expected = []
    for s in samples:
        text = s.response
        if s.lang != "en" and s.response:
            names = {"de": "German", "sw": "Swahili"}
            asked = TRANSLATE_PROMPT.format(language=names[s.lang], text=s.response)
            ids = tok.encode_chat([{"role": "user", "content": asked}])
            new = []
            with torch.no_grad():
                for _ in range(6):
                    nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                    new.append(nxt)
                    if nxt in tok.stop_ids:
                        break
            text = tok.decode(new)
        cosine = embed_alone(embedder.model, embedder.tokenizer, text) @ \
            embed_alone(embedder.model, embedder.tokenizer, s.reference)
        expected.append(0.0 if not text.strip() else max(0.0, float(cosine)))
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    assert got[3] == 0


def test_exact_match_and_agreement():
    samples = [Sample("de", "... Die Antwort lautet 18.", "The answer is 18.", "18"),
               Sample("de", "... Die Antwort lautet 17.", "The answer is 18.", "18"),
               Sample("sw", "Jibu ni 2,125", "The answer is 2125", "2125"),
               Sample("sw", "", "The answer is 5", "5"),
               Sample("sw", "no number", "no number either", "5")]
    assert ExactMatch()(samples)["reward"].tolist() == [1, 0, 1, 0, 0]
    # two missing answers do not agree
    assert AnswerAgreement()(samples)["reward"].tolist() == [1, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="ExactMatch needs a gold answer"):
        ExactMatch()([Sample("de", "x", "y")])


def test_format_and_language_consistency():
    samples = [Sample("de", "Sie hat 3 und kauft 5, also 8. Die Antwort lautet 8."),
               Sample("de", "She has 3 and buys 5, so 8. The answer is 8."),
               Sample("th", "คำตอบคือ 8"), Sample("sw", ""),
               Sample("fr", "Elle a 3 pommes et la réponse est 8.")]
    assert FormatReward()(samples)["reward"].tolist() == [1, 0, 1, 0, 1]
    share = LanguageConsistency()(samples)["reward"]
    assert share[0] == 1 and share[1] == 0 and share[2] == 1 and share[3] == 0 and share[4] > 0.5
    assert math.isclose(language_share("die the", "de"), 0.5)


def test_hybrid_weights_and_components():
    hybrid = HybridReward([(0.5, AnswerAgreement()), (0.3, FormatReward()),
                           (0.2, LanguageConsistency())])
    assert (hybrid.low, hybrid.high) == (0.0, 1.0)
    out = hybrid([Sample("de", "Sie hat 8. Die Antwort lautet 8.", "The answer is 8."),
                  Sample("de", "", "The answer is 8.")])
    assert set(out) == {"reward", "agreement", "format", "language"}
    expected = 0.5 * out["agreement"] + 0.3 * out["format"] + 0.2 * out["language"]
    assert torch.allclose(out["reward"], expected) and out["reward"][1] == 0
    with pytest.raises(ValueError, match="non-negative weights"):
        HybridReward([(-1.0, FormatReward())])


def test_every_reward_component_and_metric_has_a_chosen_group():
    """Each reward logs its component under its `name`: TensorBoard files it under reward/. A
    metric with no group in loggers.GROUPS is an error naming the table, never a silent perf/."""
    import inspect

    from pbrl import rewards
    from pbrl.loggers import GROUPS, scalar_name
    names = [cls.name for _, cls in inspect.getmembers(rewards, inspect.isclass)
             if cls.__module__ == rewards.__name__ and hasattr(cls, "name")]
    assert "mt" in names and "exact_match" in names
    for name in names:
        if name != "hybrid":  # the hybrid logs its components, not itself
            assert scalar_name(name) == f"reward/{name}", name
    assert scalar_name("reward") == "reward/mean" and scalar_name("time/rollout") == "time/rollout"
    listed = [n for names in GROUPS.values() for n in names]
    assert len(listed) == len(set(listed)), "a metric listed in two groups"
    with pytest.raises(KeyError, match="'new_metric' has no TensorBoard group: add it to "
                                       "pbrl/loggers.py's GROUPS"):
        scalar_name("new_metric")


@pytest.mark.parametrize("kind", list(REWARDS))
@pytest.mark.parametrize("weights", [(0.5, 0.5, 0.0), (0.0, 1.0, 0.0), (0.2, 0.0, 0.3)])
def test_each_reward_kind_uses_exactly_the_models_it_declares(kind, weights):
    """What reward.kind declares it uses (the trainer loads, the planner counts and the config
    checks just those) against the models its builder asks for, here handed out by a stand-in that
    records them."""
    from pbrl.config import RewardConfig
    cfg = RewardConfig(kind=kind, embedding_weight=weights[0], agreement_weight=weights[1],
                       mt_weight=weights[2], format_weight=0.1)
    asked = set()

    class Models:
        def embedder(self):
            asked.add("embedder")
            return None

        def translator(self):
            asked.add("translator")
            return None
    reward = REWARDS[kind].build(cfg, Models())
    assert asked == REWARDS[kind].uses(cfg), f"{kind} declares {REWARDS[kind].uses(cfg)}"
    assert callable(reward)


def test_response_checks_count_the_semantic_rewards_failure_modes():
    """In the prompt's language, an English answer, a copy of the reference, no final number: each
    by hand, on the toy's kind of answer."""
    from pbrl.rewards import copied, response_checks
    reference = "7 - 3 = 4. The answer is 4."
    german = response_checks(Sample("de", "7 - 3 = 4. Die Antwort lautet 4.", reference))
    assert german == {"extracted": 1.0, "copy": 0.0, "english": 0.0, "in_language": 1.0}
    english = response_checks(Sample("de", "7 - 3 = 4. The answer is 4.", reference))
    assert english == {"extracted": 1.0, "copy": 1.0, "english": 1.0, "in_language": 0.0}
    assert response_checks(Sample("fr", "La réponse est", reference))["extracted"] == 0.0
    # numbers and symbols do not make a copy: every right answer shares them
    assert copied("7 - 3 = 4 . 4", reference) == 0.0
    assert copied("Die Antwort the answer is 4", reference) == pytest.approx(1 / 3)
    # an English prompt has no English or copy check (its answer is the reference's language)
    assert set(response_checks(Sample("en", reference, reference))) == {"extracted",
                                                                         "in_language"}


@pytest.mark.parametrize("mode, expected", [("zero", [1.0, 0.0, 0.0]),
                                            ("scale", [1.0, 0.0, 0.5 / 0.8])])
def test_language_gate_takes_the_semantic_reward_from_answers_in_another_language(mode, expected):
    """A German prompt answered in English scores on cross-lingual similarity; behind the gate it
    does not (zero), or in proportion to its German (scale)."""
    from pbrl.rewards import LanguageGate

    class Constant:  # a semantic reward that likes every response
        name, low, high = "embedding", -1.0, 1.0

        def __call__(self, samples):
            return {"reward": torch.ones(len(samples)), "embedding": torch.ones(len(samples))}
    reference = "7 - 3 = 4. The answer is 4."
    samples = [Sample("de", "7 - 3 = 4. Die Antwort lautet 4.", reference),
               Sample("de", "7 - 3 = 4. The answer is 4.", reference),
               Sample("de", "Die Antwort is 4", reference)]  # one German, one English word
    out = LanguageGate(Constant(), 0.8, mode)(samples)
    assert out["reward"].tolist() == pytest.approx(expected)
    assert out["embedding"].tolist() == [1.0] * 3  # the component itself, ungated
    assert out["language_gate"].tolist() == pytest.approx(expected)


def test_the_gate_wraps_the_semantic_rewards_only_and_only_when_set():
    from pbrl.config import RewardConfig
    from pbrl.rewards import LanguageGate, build_reward
    cfg = RewardConfig(kind="hybrid", embedding_weight=0.0, agreement_weight=1.0,
                       language_gate=0.5)
    hybrid = build_reward(cfg, "", "")  # agreement alone: no model, nothing gated
    assert not any(isinstance(r, LanguageGate) for _, r in hybrid.components)
    assert not isinstance(build_reward(RewardConfig(kind="exact_match", language_gate=0.5), "",
                                       ""), LanguageGate)
