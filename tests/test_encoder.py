"""Encoder sentence embedders (pbrl/encoder.py) against transformers' BertModel and
XLMRobertaModel: random weights in real HF directories with sentence-transformers' files."""
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from pbrl.encoder import EncoderArgs, load_encoder
from pbrl.rewards import Embedder, EmbeddingReward, Sample

WORDS = ("the answer is die antwort lautet la réponse est jibu ni seven three four apples has "
         "hat ana how many wie viele").split()


def save_encoder(out, kind: str, pooling: str = "cls", normalize: bool = True, seed: int = 0):
    """A random `kind` ("bert" or "xlm-roberta") model saved by transformers, a word-level
    tokenizer with the model's special tokens ([CLS] x [SEP] or <s> x </s>), and
    sentence-transformers' modules.json, 1_Pooling and 2_Normalize as that library writes them."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else \
        ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=specials[1 if kind == "bert" else 3]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        pad = "[PAD]"
    else:
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        pad = "<pad>"
    shape = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(seed)
    if kind == "bert":
        model = BertModel(BertConfig(**shape, pad_token_id=0))
    else:
        model = XLMRobertaModel(XLMRobertaConfig(**shape, pad_token_id=1, type_vocab_size=1))
    for p in model.parameters():  # beyond the init's tiny values, so that errors would show
        torch.nn.init.normal_(p, std=0.2)
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type":
         "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type":
         "sentence_transformers.models.Normalize"}][:3 if normalize else 2]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    if normalize:
        (out / "2_Normalize").mkdir()
    return model


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_hidden_states_match_transformers_with_padding(tmp_path, kind):
    oracle = save_encoder(tmp_path, kind)
    ours = load_encoder(tmp_path)
    pad = 0 if kind == "bert" else 1
    ids = torch.tensor([[2, 5, 9, 11, 3, pad, pad], [2, 7, 8, 9, 10, 12, 3]]) if kind == "bert" \
        else torch.tensor([[0, 5, 9, 11, 2, pad, pad], [0, 7, 8, 9, 10, 12, 2]])
    mask = ids != pad
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(ids, mask)
    assert torch.allclose(got[mask], expected[mask], atol=1e-5), (got - expected)[mask].abs().max()


@pytest.mark.parametrize("kind, pooling", [("bert", "cls"), ("xlm-roberta", "mean")])
def test_sentence_vectors_match_transformers_pooled_and_normalised(tmp_path, kind, pooling):
    """A batch of mixed lengths, pooled as 1_Pooling says (CLS or mean over the real tokens),
    normalised; the tokenizer adds the model's special tokens."""
    oracle = save_encoder(tmp_path, kind, pooling)
    embedder = Embedder.from_pretrained(tmp_path)
    assert embedder.pooling == pooling
    texts = ["the answer is seven", "die antwort lautet four apples hat", "jibu ni"]
    got = embedder(texts)
    for text, vector in zip(texts, got):
        ids = torch.tensor([embedder.tokenizer.tok.encode(text).ids])
        assert ids[0, 0] == (2 if kind == "bert" else 0)  # [CLS] / <s> first
        with torch.no_grad():
            hidden = oracle(input_ids=ids).last_hidden_state[0]
        pooled = hidden[0] if pooling == "cls" else hidden.mean(0)
        assert torch.allclose(vector, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5)


def test_prefix_goes_before_every_text_and_the_reward_uses_the_encoder(tmp_path):
    save_encoder(tmp_path, "xlm-roberta", "mean")
    plain, prefixed = Embedder.from_pretrained(tmp_path), \
        Embedder.from_pretrained(tmp_path, prefix="how many ")
    assert torch.allclose(prefixed(["apples"]), plain(["how many apples"]))
    assert torch.allclose(prefixed(["apples"], references=True), plain(["how many apples"]))
    # e5's asymmetric use: 'query: ' before the response, 'passage: ' before the reference
    two = Embedder.from_pretrained(tmp_path, prefix="how many ", reference_prefix="wie viele ")
    assert torch.allclose(two(["apples"], references=True), plain(["wie viele apples"]))
    got = EmbeddingReward(two)([Sample("de", "apples", "apples")])["reward"]
    expected = torch.nn.functional.cosine_similarity(plain(["how many apples"]),
                                                     plain(["wie viele apples"]))
    assert got == pytest.approx(expected.clamp(min=0), abs=1e-6)
    reward = EmbeddingReward(plain)([Sample("de", "die antwort lautet four", "the answer is four"),
                                     Sample("de", "the answer is four", "the answer is four")])
    assert reward["reward"][1] == pytest.approx(1.0, abs=1e-5) and reward["reward"][0] < 1.0


def test_the_planner_counts_an_encoders_weights(tmp_path):
    from transformers import BertModel
    oracle = save_encoder(tmp_path, "bert")
    args = EncoderArgs.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    loaded = sum(p.numel() for n, p in oracle.named_parameters() if not n.startswith("pooler."))
    assert args.parameter_count() == loaded
    from pbrl.memory import embedder_bytes
    assert embedder_bytes(str(tmp_path), 2) == 2 * loaded
    assert isinstance(oracle, BertModel)


def test_an_encoder_of_another_kind_is_refused_naming_the_setting(tmp_path):
    save_encoder(tmp_path, "bert")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config,
                                                      "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'; pbrl's encoder "
                                         "implements 'absolute'"):
        load_encoder(tmp_path)


def test_a_run_rewards_with_an_encoder_embedder(world, tmp_path):
    """models.embedder takes an encoder directory as it takes a decoder one."""
    from conftest import metrics, overrides
    from pbrl.config import load_config
    from pbrl.prepare import prepare
    save_encoder(tmp_path / "labse-like", "bert")
    out = tmp_path / "run"
    prepare(load_config(None, overrides(world, out, **{
        "reward.kind": "embedding", "models.embedder": tmp_path / "labse-like",
        "run.steps": 1})), log=lambda *a: None).run()
    [step] = metrics(out)
    assert -1.0 <= step["embedding"] <= 1.0 and step["reward"] == step["embedding"]


def test_a_dense_module_after_the_pooling_is_applied_and_an_unknown_module_refused(tmp_path):
    """LaBSE's layout: CLS pooling, then a Dense 32 -> 32 with tanh (2_Dense, as
    sentence-transformers saves it), then Normalize."""
    from safetensors.torch import save_file
    oracle = save_encoder(tmp_path, "bert", "cls")
    modules = json.loads((tmp_path / "modules.json").read_text())
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (tmp_path / "modules.json").write_text(json.dumps(modules[:2] + [dense, {
        **modules[2], "idx": 3, "name": "3", "path": "3_Normalize"}]))
    (tmp_path / "2_Dense").mkdir()
    (tmp_path / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 32, "out_features": 32, "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh"}))
    weight, bias = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)), torch.randn(32)
    save_file({"linear.weight": weight, "linear.bias": bias},
              str(tmp_path / "2_Dense" / "model.safetensors"))
    embedder = Embedder.from_pretrained(tmp_path)
    from pbrl.memory import embedder_bytes
    loaded = sum(p.numel() for n, p in oracle.named_parameters() if not n.startswith("pooler."))
    assert embedder_bytes(str(tmp_path), 4) == 4 * (loaded + 32 * 32 + 32)  # the head counted
    ids = torch.tensor([embedder.tokenizer.tok.encode("the answer is four").ids])
    with torch.no_grad():
        cls = oracle(input_ids=ids).last_hidden_state[0, 0]
    expected = torch.nn.functional.normalize(torch.tanh(weight @ cls + bias), dim=-1)
    assert torch.allclose(embedder(["the answer is four"])[0], expected, atol=1e-5)
    (tmp_path / "modules.json").write_text(json.dumps(modules + [{
        "idx": 3, "name": "3", "path": "3_LayerNorm",
        "type": "sentence_transformers.models.LayerNorm"}]))
    with pytest.raises(ValueError, match="also asks for sentence_transformers.models.LayerNorm"):
        Embedder.from_pretrained(tmp_path)
