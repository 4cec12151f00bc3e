"""The toy world's pieces: parallel problems, the lexicon translator, the aligned-word-vector embedder."""
import random

import torch

import kernels
from pbrl import toy
from pbrl.data import extract_number
from pbrl.rewards import Embedder, EmbeddingReward, MTReward, Sample


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
    translate = toy.LexiconTranslator(toy.lexicon())
    assert translate(["7 - 3 = 4. Die Antwort lautet 4."], ["de"]) == ["7 - 3 = 4 . the answer is 4 ."]
    assert translate(["Anna verschenkt 3."], ["de"]) == ["Anna gives 3 ."]
    assert translate(["Jibu ni 9"], ["sw"]) == ["answer is 9"]
    assert translate(["The answer is 2."], ["en"]) == ["The answer is 2 ."]


def test_aligned_embedder_is_cross_lingual(tmp_path):
    toy.build_embedder(tmp_path, seed=0)
    embedder = Embedder.from_pretrained(tmp_path, pooling="mean", append_eos=False)
    english = "12 - 5 = 7. The answer is 7."
    same = ["12 - 5 = 7. Die Antwort lautet 7.", "12 - 5 = 7. La réponse est 7.", "12 - 5 = 7. Jibu ni 7."]
    wrong = ["12 + 5 = 17. Die Antwort lautet 17.", "12 - 5 = 6. La réponse est 6."]
    e = embedder([english] + same + wrong)
    cos = kernels.cosine_similarity(e[:1].expand(len(e) - 1, -1), e[1:])
    assert torch.allclose(cos[:3], torch.ones(3), atol=1e-6)  # translations embed identically
    assert (cos[3:] < 0.95).all()                               # a different computation does not
    verbs = embedder(["Anna verschenkt 3", "Anna gives away 3", "Anna kauft 3"])
    pair = kernels.pairwise_cosine_similarity(verbs, verbs)
    assert pair[0, 1] > 0.99 and pair[0, 2] < 0.9
    reward = EmbeddingReward(embedder)([Sample("de", s, english) for s in same + wrong])["reward"]
    assert reward[:3].min() > reward[3:].max()
    mt = MTReward(toy.LexiconTranslator(toy.lexicon()), embedder)([Sample("sw", same[2], english),
                                                                   Sample("sw", "", english)])["reward"]
    assert mt[0] > 0.99 and mt[1] == 0
