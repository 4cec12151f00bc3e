"""Rewards: from (target-language response, the pivot's English reference, optional gold answer)
to a float.

Every reward is a callable `reward(samples) -> {"reward": [B] fp32, <component>: [B], ...}` with a
stated range [low, high]; an empty or garbled response gets `low`, never NaN or an exception.

    ExactMatch           gold label, the "traditional PPO" baseline; the only one that reads labels
    AnswerAgreement      the response's final number == the reference's final number
    EmbeddingReward      cosine of multilingual embeddings of response and reference, clipped at 0
    MTReward             the response translated into English, then the embedding cosine
    FormatReward         the response states its answer with its language's answer phrase
    LanguageConsistency  the share of the response written in the target language (heuristic)
    HybridReward         a weighted sum of any of the above (range: the weighted sum of theirs)
Each but the hybrid lies in [0, 1].

The paper (arXiv 2509.25543) does not publish its reward models or weights; the defaults here are
ours and are justified where they are set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from pbrl import kernels
from pbrl.checkpoint import load_pretrained
from pbrl.data import extract_number, has_answer_phrase, prompt_format
from pbrl.encoder import Encoder, after_pooling, is_encoder, load_encoder
from pbrl.files import read_json, resolve
from pbrl.model import pad_rows
from pbrl.tokenizer import Tokenizer
from pbrl.translators import Translator, load_translator


@dataclass(frozen=True)
class Sample:
    lang: str                     # language the response should be in
    response: str
    reference: str | None = None  # the pivot's English response to the same problem
    gold: str | None = None       # gold final answer (read by ExactMatch only)


def _blank(text: str) -> bool:
    return not text or not text.strip()


class ExactMatch:
    """1 when the response's final number equals the gold answer (lm-eval's MGSM extraction), else
    0."""
    name, low, high = "exact_match", 0.0, 1.0

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        if any(s.gold is None for s in samples):
            raise ValueError("ExactMatch needs a gold answer on every sample (it is the labelled "
                             "baseline)")
        score = [float(extract_number(s.response) == s.gold) for s in samples]
        return {"reward": torch.tensor(score), self.name: torch.tensor(score)}


class AnswerAgreement:
    """1 when the response and the pivot's reference end on the same number, else 0 (no gold label
    needed)."""
    name, low, high = "agreement", 0.0, 1.0

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        score = []
        for s in samples:
            mine, theirs = extract_number(s.response), extract_number(s.reference or "")
            score.append(float(mine is not None and mine == theirs))
        return {"reward": torch.tensor(score), self.name: torch.tensor(score)}


class FormatReward:
    """1 when the response gives its final answer with its language's answer phrase and a number."""
    name, low, high = "format", 0.0, 1.0

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        score = torch.tensor([float(has_answer_phrase(s.response, s.lang)) for s in samples])
        return {"reward": score, self.name: score}


# Unicode blocks of the MGSM languages with their own scripts; the Latin-script ones are told apart
# by frequent function words. A heuristic, not a language identifier: it catches a policy drifting
# into English (or another language), which is the failure a semantic reward against an English
# reference invites.
_SCRIPTS = {"ru": "\u0400-\u04ff", "zh": "\u4e00-\u9fff", "ja": "\u3040-\u30ff\u4e00-\u9fff",
            "th": "\u0e00-\u0e7f", "bn": "\u0980-\u09ff", "te": "\u0c00-\u0c7f"}
_FUNCTION_WORDS = {
    "en": "the and is of to in he she it has have how many what was are his her they with for",
    "es": "el la los las y es de que en un una tiene cuántos cuántas su por con para",
    "fr": "le la les et est de des que en un une il elle a combien sa son pour avec",
    "de": "der die das und ist von zu den ein eine er sie hat wie viele sein ihr mit für",
    "sw": "na ya wa ni kwa katika za la kila ana je ngapi yake hiyo huo",
}
_WORDS = {lang: set(words.split()) for lang, words in _FUNCTION_WORDS.items()}
_SCRIPT = {lang: re.compile(f"[{chars}]") for lang, chars in _SCRIPTS.items()}
_ANY_SCRIPT = re.compile(f"[{''.join(_SCRIPTS.values())}]")


def language_share(text: str, lang: str) -> float:
    """Fraction of the text in `lang`: for script languages the share of letters in that script; for
    Latin-script languages the share of recognised function words that belong to it. 0 when nothing
    is recognised."""
    prompt_format(lang)
    if lang in _SCRIPTS:
        letters = sum(map(str.isalpha, text))
        return _alpha(_SCRIPT[lang].findall(text)) / letters if letters else 0.0
    if lang not in _WORDS:
        raise ValueError(f"no language-consistency heuristic for {lang!r}")
    words = re.findall(r"\w+", text.lower())
    hits = {code: sum(w in vocab for w in words) for code, vocab in _WORDS.items()}
    total = sum(hits.values()) + _alpha(_ANY_SCRIPT.findall(text))
    return hits[lang] / total if total else 0.0


def _alpha(chars: list[str]) -> int:
    """How many of these characters are letters (a script's block also holds its vowel signs)."""
    return sum(map(str.isalpha, chars))


def known_language(lang: str) -> bool:
    """Whether language_share has a heuristic for `lang`."""
    return lang in _SCRIPTS or lang in _WORDS


# What the per-language diagnostics call a response in a language, and a copy of the reference.
IN_LANGUAGE, COPY_NGRAM, COPY_SHARE = 0.5, 3, 0.5


def copied(response: str, reference: str, n: int = COPY_NGRAM) -> float:
    """The share of the response's word n-grams (letters only: numbers and symbols, which every
    right answer shares, do not count) that also occur in the reference; 0 when it has none."""
    def grams(text):
        words = re.findall(r"[^\W\d_]+", text.lower())
        return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    mine, theirs = grams(response), set(grams(reference or ""))
    return sum(g in theirs for g in mine) / len(mine) if mine else 0.0


def response_checks(s: Sample) -> dict[str, float]:
    """What the per-language diagnostics count of one response (1.0 or 0.0 each): in_language
    (mostly in its prompt's language), english (mostly English, for a non-English prompt), copy
    (mostly word n-grams of the pivot's English reference) and extracted (a final number found).
    A language without a heuristic gets only what needs none."""
    checks = {"extracted": extract_number(s.response) is not None}
    if s.lang != "en":
        checks["copy"] = copied(s.response, s.reference) >= COPY_SHARE
        checks["english"] = language_share(s.response, "en") >= IN_LANGUAGE
    if known_language(s.lang):
        checks["in_language"] = language_share(s.response, s.lang) >= IN_LANGUAGE
    return {k: float(v) for k, v in checks.items()}


class LanguageGate:
    """A semantic reward counted only for responses in their prompt's language
    (reward.language_gate): 'zero' multiplies it by 0 below the threshold's share, 'scale' by
    min(1, share / threshold). An English answer to a German prompt can score high on cross-lingual
    cosine; this takes that away. The share of each response kept is logged as language_gate."""

    def __init__(self, reward, threshold: float, mode: str = "zero"):
        self.reward, self.threshold, self.mode = reward, threshold, mode
        self.name, self.low, self.high = reward.name, min(reward.low, 0.0), reward.high

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        parts = self.reward(samples)
        share = torch.tensor([language_share(s.response, s.lang) if known_language(s.lang)
                              else 1.0 for s in samples])
        gate = (share >= self.threshold).float() if self.mode == "zero" else \
            (share / self.threshold).clamp(max=1.0)
        return {**parts, "reward": parts["reward"] * gate, "language_gate": gate}


class LanguageConsistency:
    name, low, high = "language", 0.0, 1.0

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        score = torch.tensor([language_share(s.response, s.lang) for s in samples])
        return {"reward": score, self.name: score}


# sentence-transformers' pooling settings, shipped with e.g. Qwen3-Embedding
POOLING_DIR = "1_Pooling"


def checkpoint_pooling(directory: Path) -> str:
    """The pooling an embedding checkpoint asks for in 1_Pooling/config.json ('last' when it says
    nothing)."""
    file = directory / POOLING_DIR / "config.json"
    if not file.is_file():
        return "last"
    chosen = [key for key, on in read_json(file).items() if key.startswith("pooling_mode_") and on]
    modes = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_cls_token": "cls"}
    if len(chosen) != 1 or chosen[0] not in modes:
        raise ValueError(f"{file}: pbrl pools by last token, mean or CLS token, one of them; this "
                         f"asks for {chosen}")
    return modes[chosen[0]]


class Embedder:
    """Sentence embeddings from a decoder loaded with pbrl's Transformer (e.g. Qwen3-Embedding) or
    an encoder loaded with pbrl/encoder.py (LaBSE, multilingual-e5, BGE-M3: BERT, XLM-RoBERTa).

    pooling 'last': the final hidden state of the last token (decoder embedders are trained this
    way; Qwen3-Embedding appends its eos token, which append_eos reproduces); 'mean': the average
    over the tokens; 'cls': the first token's (an encoder's [CLS] / <s>). L2-normalised (a
    sentence-transformers 2_Normalize module changes no cosine). An encoder's text gets its
    tokenizer's special tokens ([CLS] ... [SEP]); `prefix` goes before every text (e5's
    'query: '), `reference_prefix` before the references a reward compares with (default: the
    same)."""

    def __init__(self, model, tokenizer: Tokenizer, pooling: str = "last",
                 append_eos: bool = True, batch_size: int = 32, prefix: str = "",
                 head: list | None = None, reference_prefix: str | None = None):
        if pooling not in ("last", "mean", "cls"):
            raise ValueError(f"pooling must be 'last', 'mean' or 'cls', got {pooling!r}")
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.encoder = isinstance(model, Encoder)
        self.head = head or []  # sentence-transformers' Dense modules after the pooling
        self.append_eos, self.batch_size, self.prefix = append_eos and not self.encoder, \
            batch_size, prefix
        self.reference_prefix = prefix if reference_prefix is None else reference_prefix

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=None, device=None, pooling: str = "auto",
                        **kwargs) -> "Embedder":
        """pooling 'auto': what the checkpoint's 1_Pooling/config.json asks for, else 'last'."""
        directory = resolve(path_or_id)
        head = after_pooling(directory, dtype, device)
        if is_encoder(directory):
            model, tokenizer = load_encoder(directory, dtype, device), \
                Tokenizer.from_pretrained(directory)
            tokenizer.check_fits(model.args.vocab_size, str(directory))
        else:
            model, tokenizer = load_pretrained(directory, dtype=dtype, device=device)
        if pooling == "auto":
            pooling = checkpoint_pooling(directory)
        return cls(model, tokenizer, pooling=pooling, head=head, **kwargs)

    def encode_ids(self, text: str, prefix: str = "") -> list[int]:
        text = prefix + text
        ids = self.tokenizer.tok.encode(text).ids if self.encoder else self.tokenizer.encode(text)
        if self.append_eos and self.tokenizer.eos_id is not None:
            ids.append(self.tokenizer.eos_id)
        if not ids:
            # an empty text still gets a (meaningless) vector; callers floor it
            ids = [self.tokenizer.pad_id or 0]
        return ids

    def context(self) -> int:
        """The longest text it embeds, in tokens (XLM-RoBERTa's positions start after pad id)."""
        args = self.model.args
        if self.encoder and args.model_type == "xlm-roberta":
            return args.max_position_embeddings - args.pad_token_id - 1
        return args.max_position_embeddings

    @torch.inference_mode()
    def __call__(self, texts: list[str], references: bool = False) -> torch.Tensor:
        """texts -> [N, D] fp32 unit vectors (references: behind reference_prefix)."""
        prefix = self.reference_prefix if references else self.prefix
        device = next(self.model.parameters()).device
        context = self.context()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = [self.encode_ids(t, prefix) for t in texts[start:start + self.batch_size]]
            longest = max(len(ids) for ids in batch)
            if longest > context:
                raise ValueError(f"a text of {longest} tokens exceeds the embedder's context of "
                                 f"{context} tokens")
            ids, mask = (t.to(device) for t in pad_rows(batch, self.tokenizer.pad_id or 0))
            hidden = (self.model(ids, mask) if self.encoder else
                      self.model(ids, output="hidden")).float()
            pooled = pool(hidden, mask, self.pooling)
            for module in self.head:
                pooled = module(pooled.to(next(module.parameters()).dtype)).float()
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [B, T, H] over the real tokens (mask [B, T]) -> [B, H]: the last token's, the
    first's ('cls') or their mean."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return hidden[torch.arange(len(hidden), device=hidden.device), mask.sum(1) - 1]


class EmbeddingReward:
    """max(0, cos(embed(response), embed(reference))). Negative cosines are clipped: between
    sentence embeddings they are rare and carry no useful 'more wrong' signal, and a [0, 1] range
    mixes cleanly with the 0/1 terms."""
    name, low, high = "embedding", 0.0, 1.0

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def similarity(self, texts: list[str], references: list[str]) -> torch.Tensor:
        score = torch.zeros(len(texts))
        keep = [i for i, (t, r) in enumerate(zip(texts, references))
                if not _blank(t) and not _blank(r)]
        if keep:
            a = self.embedder([texts[i] for i in keep])
            b = self.embedder([references[i] for i in keep], references=True)
            score[keep] = kernels.cosine_similarity(a, b).clamp(min=0).cpu()
        return score

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        score = self.similarity([s.response for s in samples], [s.reference or "" for s in samples])
        return {"reward": score, self.name: score}


class MTReward:
    """Machine-translation reward: translate the response into English, then max(0, cosine) of its
    embedding with the reference's. English responses are compared as they are."""
    name, low, high = "mt", 0.0, 1.0

    def __init__(self, translator: Translator, embedder: Embedder):
        self.translator, self.similarity = translator, EmbeddingReward(embedder).similarity

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        texts = [s.response for s in samples]
        todo = [i for i, s in enumerate(samples) if s.lang != "en" and not _blank(s.response)]
        for i, english in zip(todo,
                              self.translator([texts[i] for i in todo],
                                              [samples[i].lang for i in todo])):
            texts[i] = english
        score = self.similarity(texts, [s.reference or "" for s in samples])
        return {"reward": score, self.name: score}


class HybridReward:
    """sum_i w_i * r_i over (weight, reward) pairs; every component is reported too. The default
    PB-RLSVR hybrid (see train's config) weighs semantic similarity and answer agreement equally:
    similarity rewards a faithful chain of thought, agreement makes the final answer decisive."""
    name = "hybrid"

    def __init__(self, components: list[tuple[float, object]]):
        if not components or any(w < 0 for w, _ in components):
            raise ValueError("HybridReward needs at least one component and non-negative weights")
        self.components = components
        self.low = sum(w * r.low for w, r in components)
        self.high = sum(w * r.high for w, r in components)

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        out = {}
        total = torch.zeros(len(samples))
        for weight, reward in self.components:
            parts = reward(samples)
            total += weight * parts["reward"]
            out.update({k: v for k, v in parts.items() if k != "reward"})
        out["reward"] = total
        return out


class RewardModels:
    """The models a reward may need, loaded on first use: one embedder serves both the embedding
    and the MT components."""

    def __init__(self, cfg, embedder: str, translator: str, dtype=None, device=None):
        self.cfg, self.paths, self.dtype, self.device = cfg, (embedder, translator), dtype, device
        self.loaded = None

    def embedder(self) -> Embedder:
        if self.loaded is None:
            self.loaded = Embedder.from_pretrained(self.paths[0], dtype=self.dtype,
                                                   device=self.device, pooling=self.cfg.pooling,
                                                   prefix=self.cfg.embedder_prefix,
                                                   reference_prefix=self.cfg.reference_prefix)
        return self.loaded

    def translator(self) -> Translator:
        return load_translator(self.paths[1], self.dtype, self.device,
                               self.cfg.translate_max_new_tokens)


class RewardKind(NamedTuple):
    """A reward.kind: how it is built from the RewardConfig and its models, and which models it
    uses under a config (the trainer loads, the planner counts and the config checks just those)."""
    build: Callable        # (RewardConfig, RewardModels) -> reward
    uses: Callable         # RewardConfig -> a set of "embedder", "translator"


# reward.kind's choices, each registered by @reward_kind. A reward's components are logged under
# their classes' `name`s, which pbrl/loggers.py's GROUPS files under reward/.
REWARDS: dict[str, RewardKind] = {}


def reward_kind(name: str, uses=lambda cfg: set()):
    def register(build):
        REWARDS[name] = RewardKind(build, uses)
        return build
    return register


@reward_kind("exact_match")
def exact_match(cfg, models: RewardModels):
    return ExactMatch()


@reward_kind("agreement")
def agreement(cfg, models: RewardModels):
    return AnswerAgreement()


@reward_kind("embedding", uses=lambda cfg: {"embedder"})
def embedding(cfg, models: RewardModels):
    return gated(cfg, EmbeddingReward(models.embedder()))


@reward_kind("mt", uses=lambda cfg: {"embedder", "translator"})
def mt(cfg, models: RewardModels):
    return gated(cfg, MTReward(models.translator(), models.embedder()))


def gated(cfg, reward):
    """A semantic reward behind reward.language_gate, when one is set."""
    return reward if cfg.language_gate is None else \
        LanguageGate(reward, cfg.language_gate, cfg.language_gate_mode)


def hybrid_parts(cfg) -> list[tuple[float, RewardKind]]:
    """The hybrid's components with a positive weight, each as a RewardKind (the registered kinds,
    and the format and language rewards, which need no model)."""
    parts = [(cfg.embedding_weight, REWARDS["embedding"]),
             (cfg.agreement_weight, REWARDS["agreement"]), (cfg.mt_weight, REWARDS["mt"]),
             (cfg.format_weight, RewardKind(lambda cfg, models: FormatReward(), lambda cfg: set())),
             (cfg.language_weight, RewardKind(lambda cfg, models: LanguageConsistency(),
                                              lambda cfg: set()))]
    return [(weight, kind) for weight, kind in parts if weight > 0]


@reward_kind("hybrid", uses=lambda cfg: set().union(*(kind.uses(cfg)
                                                      for _, kind in hybrid_parts(cfg))))
def hybrid(cfg, models: RewardModels):
    return HybridReward([(weight, kind.build(cfg, models)) for weight, kind in hybrid_parts(cfg)])


def build_reward(cfg, embedder: str, translator: str, dtype=None, device=None):
    """The reward a RewardConfig (pbrl/config.py) names (REWARDS); models are loaded only for the
    components it uses."""
    return REWARDS[cfg.kind].build(cfg, RewardModels(cfg, embedder, translator, dtype, device))
