"""The toy world's pieces: parallel problems, the lexicon translator, the aligned-word-vector
embedder."""
import random

import torch

from pbrl import kernels
from pbrl import toy
from pbrl.data import extract_number
from pbrl.rewards import Embedder, EmbeddingReward, MTReward, Sample
from pbrl.translators import LexiconTranslator


def test_problems_are_parallel_and_answers_follow_the_verb():
    problems = toy.make_problems(50, random.Random(0))
    assert len({tuple(p.items()) for p in problems}) == 50
    for p in problems:
        op = toy.VERBS[p["verb"]][0]
        assert toy.answer(p) == (p["a"] + p["b"] if op == "+" else p["a"] - p["b"]) >= 1
        for lang in toy.LANGS:
            text = toy.render(p, lang)
            assert str(p["a"]) in text and str(p["b"]) in text and p["name"] in text
            assert extract_number(toy.solution(p["a"], op, p["b"], lang)) == str(toy.answer(p))


def test_lexicon_translator_maps_target_sentences_to_english_words():
    translate = LexiconTranslator(toy.lexicon())
    assert translate(["7 - 3 = 4. Die Antwort lautet 4."],
                     ["de"]) == ["7 - 3 = 4 . the answer is 4 ."]
    assert translate(["Anna verschenkt 3."], ["de"]) == ["Anna gives 3 ."]
    assert translate(["Jibu ni 9"], ["sw"]) == ["answer is 9"]
    assert translate(["The answer is 2."], ["en"]) == ["The answer is 2 ."]


def test_aligned_embedder_is_cross_lingual(tmp_path):
    toy.build_embedder(tmp_path, seed=0)
    embedder = Embedder.from_pretrained(tmp_path)
    assert embedder.pooling == "mean"  # the checkpoint's own 1_Pooling/config.json says so
    english = "12 - 5 = 7. The answer is 7."
    same = ["12 - 5 = 7. Die Antwort lautet 7.", "12 - 5 = 7. La réponse est 7.",
            "12 - 5 = 7. Jibu ni 7."]
    wrong = ["12 + 5 = 17. Die Antwort lautet 17.", "12 - 5 = 6. La réponse est 6."]
    e = embedder([english] + same + wrong)
    cos = kernels.cosine_similarity(e[:1].expand(len(e) - 1, -1), e[1:])
    assert torch.allclose(cos[:3], torch.ones(3), atol=1e-6)  # translations embed identically
    assert (cos[3:] < 0.95).all()                               # a different computation does not
    verbs = embedder(["Anna verschenkt 3", "Anna gives away 3", "Anna kauft 3"])
    pair = kernels.cosine_similarity(verbs[[0, 0]], verbs[[1, 2]])
    assert pair[0] > 0.99 and pair[1] < 0.9
    reward = EmbeddingReward(embedder)([Sample("de", s, english) for s in same + wrong])["reward"]
    assert reward[:3].min() > reward[3:].max()
    mt = MTReward(LexiconTranslator(toy.lexicon()), embedder)
    mt = mt([Sample("sw", same[2], english), Sample("sw", "", english)])["reward"]
    assert mt[0] > 0.99 and mt[1] == 0


def test_use_world_turns_toy_values_into_ordinary_paths(tmp_path, monkeypatch):
    from pbrl.config import Config
    built = []
    monkeypatch.setattr(toy, "build_world", lambda seed, log=None: built.append(seed) or tmp_path)
    cfg = Config()
    cfg.models.critic, cfg.data.eval_path, cfg.run.seed = "org/critic", "", 3
    cfg = toy.use_world(cfg, log=lambda *a: None)
    assert cfg.models.policy == str(tmp_path / "warmstart") and cfg.models.critic == "org/critic"
    assert (cfg.models.embedder == str(tmp_path / "embedder")
            and cfg.data.path == str(tmp_path / "data" / "train"))
    # the default hybrid reward translates nothing: not resolved, not built
    assert cfg.models.translator == "toy"
    assert cfg.data.eval_path == "" and built and set(built) == {3}


def test_translator_and_pooling_come_from_the_artifact_directories(tmp_path):
    import json

    from pbrl.rewards import checkpoint_pooling
    from pbrl.translators import load_translator
    (tmp_path / "lexicon.json").write_text(json.dumps({"de": {"hat": "has"}}))
    assert load_translator(tmp_path)(["Anna hat 3"], ["de"]) == ["has 3"]
    # nothing said: decoder embedders pool the last token
    assert checkpoint_pooling(tmp_path) == "last"
    (tmp_path / "1_Pooling").mkdir()
    for settings, expected in (({"pooling_mode_lasttoken": True}, "last"),
                               ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False},
                                "mean")):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(settings))
        assert checkpoint_pooling(tmp_path) == expected
    cls = json.dumps({"pooling_mode_cls_token": True})
    (tmp_path / "1_Pooling" / "config.json").write_text(cls)
    assert checkpoint_pooling(tmp_path) == "cls"  # an encoder's (pbrl/encoder.py)
    maximum = json.dumps({"pooling_mode_max_tokens": True})
    (tmp_path / "1_Pooling" / "config.json").write_text(maximum)
    import pytest
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pbrl pools by last token, mean "
                                         r"or CLS token"):
        checkpoint_pooling(tmp_path)


def test_only_the_verb_tells_adding_from_subtracting():
    """Two problems alike but for a verb that adds and one that subtracts differ in that verb's
    words alone, in every language: no 'more' marker gives the sign away."""
    base = {"name": "Anna", "item": "apples", "a": 7, "b": 3}
    adding = [v for v, (op, _) in toy.VERBS.items() if op == "+"]
    taking = [v for v, (op, _) in toy.VERBS.items() if op == "-"]
    assert len(adding) == len(taking) == 5 and set(toy.SEEN_VERBS) < set(toy.VERBS)
    for lang in toy.LANGS:
        for plus in adding:
            for minus in taking:
                a = toy.render({**base, "verb": plus}, lang).split()
                b = toy.render({**base, "verb": minus}, lang).split()
                differ = {w for w in a if w not in b} | {w for w in b if w not in a}
                verbs = set(toy.VERBS[plus][1][lang].split() + toy.VERBS[minus][1][lang].split())
                assert differ <= verbs, (lang, plus, minus, differ)


def test_warm_start_mix_writes_out_every_sum_and_difference():
    from pbrl.tokenizer import chat_tokenizer, train_bpe
    problems = toy.make_problems(40, random.Random(0))
    texts = [toy.render(p, lang) for p in problems for lang in toy.LANGS]
    tok = chat_tokenizer(train_bpe(texts + ["1 2 3 4 5 6 7 8 9 0 + - = ."], vocab_size=300))
    solved, _ = toy.sft_examples(problems, tok)
    written = [tok.decode(ids[:-1]) for ids, start in solved if start == 0]
    assert "9 - 6 = 3." in written and "2 + 1 = 3." in written and "2 - 2 = 0." not in written
    facts = set(written)
    assert len(written) == toy.FACT_COPIES * len(facts) == toy.FACT_COPIES * (48 + 33)


def test_the_language_gate_takes_the_cosine_from_an_english_answer_and_leaves_a_german_one(
        tmp_path):
    """The toy's aligned embedder scores an English answer to a German prompt as high as a German
    one (the failure a cross-lingual cosine invites); behind the gate it gets 0, and the German
    answer keeps its cosine."""
    from pbrl.config import RewardConfig
    from pbrl.rewards import build_reward
    toy.build_embedder(tmp_path / "embedder", seed=0)
    reference = "7 - 3 = 4. The answer is 4."
    samples = [Sample("de", "7 - 3 = 4. Die Antwort lautet 4.", reference),
               Sample("de", "7 - 3 = 4. The answer is 4.", reference)]

    def reward(**settings):
        return build_reward(RewardConfig(kind="embedding", **settings), str(tmp_path / "embedder"),
                            "")(samples)
    open_ = reward()["reward"]
    assert open_[1] > 0.99 and open_[0] > 0.99  # both as good as the reference itself
    gated = reward(language_gate=0.5)
    assert gated["reward"][0] == open_[0] and gated["reward"][1] == 0.0
    assert gated["embedding"].tolist() == open_.tolist()  # the cosine itself is still logged
