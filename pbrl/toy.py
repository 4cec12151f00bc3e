"""A toy multilingual world in which the whole PB-RLSVR method runs on a CPU in minutes.

Templated word problems ("Anna has 7 apples. Anna loses 3. How many apples does Anna have now?") in
English (the pivot language), German, French and Swahili, written with real phrases and sharing
problem ids across languages; a worked answer "7 - 3 = 4. The answer is 4." ends with the language's
MGSM answer phrase. What makes a language hard is its verbs: ten of them, five that add and five
that subtract, and nothing but the verb says which. Whether "verleiht", "casse" or "anavunja" takes
away is exactly what a model that saw only two target-language verbs solved does not know.

Artifacts, built from a seed and cached under .cache/pbrl/toy-{seed}/ (a rerun reuses them):
  data/{train,eval}/  mgsm_{lang}.tsv, problems in MGSM's layout (eval ids disjoint from train ids)
  warmstart/   a tiny Llama (pbrl's own model code) trained by supervised learning on English
               solutions plus target-language questions *without* solutions: good at English, poor
               at the rest. It is also the pivot (prompted in English).
  embedder/    averaged aligned word vectors, the classic cross-lingual sentence embedding: every
               word of the toy lexicon maps to its concept's vector in every language; a 0-layer
               pbrl Transformer holds them, and its 1_Pooling/config.json asks for mean pooling.
  translator/  lexicon.json, a word-by-word translation into English (a LexiconTranslator).
A config value 'toy' names these artifacts (use_world resolves it); past that, a toy run takes the
same path through the code as a run on real checkpoints.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from pbrl import distributed as dist
from pbrl import numerics
from pbrl.checkpoint import save_model
from pbrl.cli import Progress
from pbrl.config import TOY, Config, validate
from pbrl.data import Problem, encode_prompt, mgsm_prompt
from pbrl.model import ModelArgs, Transformer, pad_rows, random_llama
from pbrl.rewards import POOLING_DIR
from pbrl.tokenizer import Tokenizer, chat_tokenizer, save_tokenizer, train_bpe
from pbrl.translators import LEXICON_FILE

VERSION = "toy-v7"  # bump when the world's generator changes, so cached artifacts are rebuilt


# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------
LANGS = ("en", "de", "fr", "sw")
NAMES = ["Anna", "Ben", "Lea", "Omar", "Juma", "Marie", "Paul", "Zawadi", "Amina", "Tom"]
ITEMS = {  # concept -> plural noun per language
    "apples": {"en": "apples", "de": "Äpfel", "fr": "pommes", "sw": "tufaha"},
    "books": {"en": "books", "de": "Bücher", "fr": "livres", "sw": "vitabu"},
    "eggs": {"en": "eggs", "de": "Eier", "fr": "œufs", "sw": "mayai"},
    "coins": {"en": "coins", "de": "Münzen", "fr": "pièces", "sw": "sarafu"},
    "pens": {"en": "pens", "de": "Stifte", "fr": "stylos", "sw": "kalamu"},
}
VERBS = {  # concept -> (operation, the verb per language); nothing else in a problem gives the sign
    "buys": ("+", {"en": "buys", "de": "kauft", "fr": "achète", "sw": "ananunua"}),
    "finds": ("+", {"en": "finds", "de": "findet", "fr": "trouve", "sw": "anapata"}),
    "gets": ("+", {"en": "gets", "de": "bekommt", "fr": "reçoit", "sw": "anapokea"}),
    "wins": ("+", {"en": "wins", "de": "gewinnt", "fr": "gagne", "sw": "anashinda"}),
    "collects": ("+", {"en": "collects", "de": "sammelt", "fr": "ramasse", "sw": "anakusanya"}),
    "loses": ("-", {"en": "loses", "de": "verliert", "fr": "perd", "sw": "anapoteza"}),
    "gives": ("-", {"en": "gives away", "de": "verschenkt", "fr": "donne", "sw": "anatoa"}),
    "sells": ("-", {"en": "sells", "de": "verkauft", "fr": "vend", "sw": "anauza"}),
    "breaks": ("-", {"en": "breaks", "de": "zerbricht", "fr": "casse", "sw": "anavunja"}),
    "lends": ("-", {"en": "lends", "de": "verleiht", "fr": "prête", "sw": "anaazima"}),
}
TEMPLATES = {
    "en": "{name} has {a} {item}. {name} {verb}. How many {item} does {name} have now?",
    "de": "{name} hat {a} {item}. {name} {verb}. Wie viele {item} hat {name} jetzt?",
    "fr": "{name} a {a} {item}. {name} {verb}. Combien de {item} a {name} maintenant ?",
    "sw": "{name} ana {item} {a}. {name} {verb}. {name} ana {item} ngapi sasa?",
}
PHRASES = {"en": "The answer is", "de": "Die Antwort lautet", "fr": "La réponse est",
           "sw": "Jibu ni"}
# Words of the frame sentences, for the lexicon (target word -> English word) and the aligned
# embedder.
FRAME = {
    "de": {"hat": "has", "wie": "how", "viele": "many", "jetzt": "now", "die": "the",
           "antwort": "answer", "lautet": "is"},
    "fr": {"a": "has", "combien": "how", "de": "many", "maintenant": "now", "la": "the",
           "réponse": "answer", "est": "is"},
    "sw": {"ana": "has", "ngapi": "many", "sasa": "now", "jibu": "answer", "ni": "is"},
}


A_MAX, B_MAX = 9, 6  # a problem starts with 2..A_MAX things; b is 1..B_MAX (and below a)


def solution(a: int, op: str, b: int, lang: str) -> str:
    c = a + b if op == "+" else a - b
    return f"{a} {op} {b} = {c}. {PHRASES[lang]} {c}."


def make_problems(n: int, rng: random.Random) -> list[dict]:
    """n distinct problems: name, item, verb, a, b (a - b >= 1 for subtraction)."""
    seen, out = set(), []
    while len(out) < n:
        verb = rng.choice(list(VERBS))
        op = VERBS[verb][0]
        a = rng.randint(2, A_MAX)
        b = rng.randint(1, B_MAX) if op == "+" else rng.randint(1, min(a - 1, B_MAX))
        key = (rng.choice(NAMES), rng.choice(list(ITEMS)), verb, a, b)
        if key not in seen:
            seen.add(key)
            out.append(dict(zip(("name", "item", "verb", "a", "b"), key)))
    return out


def render(p: dict, lang: str) -> str:
    verb = f"{VERBS[p['verb']][1][lang]} {p['b']}"
    return TEMPLATES[lang].format(name=p["name"], a=p["a"], item=ITEMS[p["item"]][lang], verb=verb)


def answer(p: dict) -> int:
    return p["a"] + p["b"] if VERBS[p["verb"]][0] == "+" else p["a"] - p["b"]


def lexicon() -> dict[str, dict[str, str]]:
    """lang -> {target word (lowercase): English word}: items, verbs word by word, frame words."""
    out = {}
    for lang in LANGS[1:]:
        words = {**FRAME[lang], **{name.lower(): name for name in NAMES}}
        for concept, names in ITEMS.items():
            words[names[lang].lower()] = concept
        for concept, (_, verbs) in VERBS.items():  # the verb's first word ("away" is dropped)
            words[verbs[lang].lower()] = verbs["en"].split()[0]
        out[lang] = words
    return out


# --------------------------------------------------------------------------------------------------
# Building the artifacts
# --------------------------------------------------------------------------------------------------
def artifacts(root: Path) -> dict[str, Path]:
    """Config key -> the toy artifact it names when set to 'toy': ordinary HF directories,
    MGSM-layout data directories and a lexicon translator directory, read by the same code as any
    real model or data set."""
    warm = root / "warmstart"
    return {"models.policy": warm, "models.critic": warm, "models.reference": warm,
            "models.pivot": warm,
            "models.embedder": root / "embedder", "models.translator": root / "translator",
            "data.path": root / "data" / "train", "data.eval_path": root / "data" / "eval"}


def use_world(cfg: Config, log=print) -> Config:
    """cfg with every model or data path that says 'toy' replaced by the toy world of cfg.run.seed,
    which rank 0 builds first (minutes, once: it is cached) while the other ranks wait. The config
    is validated before that, so a mistake in it is found in seconds."""
    validate(cfg, dist.init()[1])
    unused = {"models.embedder": not cfg.reward.uses_embedder(),
              "models.translator": not cfg.reward.uses_translator()}
    keys = [key for key in artifacts(Path()) if _get(cfg, key) == TOY and not unused.get(key)]
    if not keys:
        return cfg
    numerics.pin()  # a toy run computes as the experiment does (it reuses the experiment's world)
    if dist.init()[0] == 0:
        build_world(cfg.run.seed, log=log)
    dist.barrier()
    paths = artifacts(build_world(cfg.run.seed, log=lambda *a: None))  # cached by now
    for key in keys:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, str(paths[key]))
    return cfg


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def build_world(seed: int = 0, root=None, n_train: int = 600, n_eval: int = 300,
                sft_steps: int = 1200, width: int = 128, layers: int = 4, log=print) -> Path:
    """Build (or reuse) every toy artifact for this seed under `root` (returned; default
    .cache/pbrl/toy-{seed}, with a suffix naming the numerics when they are not pinned:
    pbrl/numerics.py); width and layers size the warm-start model. The numerics are part of what
    a cached world is checked against: the same settings on other kernels train another warm
    start."""
    root = Path(root or f".cache/pbrl/toy-{seed}{numerics.tag()}")
    marker = root / "complete.json"
    computed = {k: v for k, v in numerics.describe().items() if k != "threads"}
    settings = {"version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval,
                "sft_steps": sft_steps, "width": width, "layers": layers, "numerics": computed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    t0 = time.perf_counter()
    rng = random.Random(seed)
    problems = make_problems(n_train + n_eval, rng)
    for split, part in (("train", problems[:n_train]), ("eval", problems[n_train:])):
        d = root / "data" / split
        d.mkdir(parents=True, exist_ok=True)
        for lang in LANGS:
            rows = "".join(f"{render(p, lang)}\t{answer(p)}\n" for p in part)
            (d / f"mgsm_{lang}.tsv").write_text(rows, encoding="utf-8")
    (root / "translator").mkdir(parents=True, exist_ok=True)
    words = json.dumps(lexicon(), ensure_ascii=False, indent=1)
    (root / "translator" / LEXICON_FILE).write_text(words, encoding="utf-8")
    build_embedder(root / "embedder", seed)
    log(f"toy world: {n_train} train and {n_eval} eval problems in {', '.join(LANGS)}; training "
        f"the warm start")
    train_warmstart(root, problems[:n_train], seed, sft_steps, width, layers, log)
    marker.write_text(json.dumps(settings))
    log(f"toy world built in {time.perf_counter() - t0:.0f}s under {root}")
    return root


def build_embedder(out: Path, seed: int, dim: int = 64) -> None:
    """Aligned word vectors as a 0-layer Transformer: token -> its concept's random unit vector (the
    same in every language); frame words and punctuation, which every sentence shares, get zero
    vectors."""
    g = torch.Generator().manual_seed(seed + 1)
    concepts: dict[str, list[str]] = {}
    for concept, names in ITEMS.items():
        concepts[concept] = [n.lower() for n in names.values()]
    for concept, words in ((c, verbs[lang].lower().split()[:1])
                           for c, (_, verbs) in VERBS.items() for lang in LANGS):
        concepts.setdefault(concept, []).extend(words)
    for sign in "+-=":
        concepts[sign] = [sign]
    for n in range(0, 40):
        concepts[str(n)] = [str(n)]
    vocab = {"<unk>": 0}
    vectors = [torch.zeros(dim)]
    for concept, words in concepts.items():
        v = torch.randn(dim, generator=g)
        for w in dict.fromkeys(words):
            if w not in vocab:
                vocab[w] = len(vocab)
                vectors.append(v)
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits()])
    args = ModelArgs(vocab_size=len(vocab), hidden_size=dim, intermediate_size=1,
                     num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1,
                     head_dim=dim, max_position_embeddings=4096)
    model = Transformer(args, lm_head=False)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.stack(vectors))
    save_tokenizer(Tokenizer(tok, {}), out)
    save_model(model, out)
    # the sentence-transformers convention: this embedder mean-pools
    (out / POOLING_DIR).mkdir(exist_ok=True)
    (out / POOLING_DIR / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))


# the only verbs with solved target-language examples in the warm start
SEEN_VERBS = ("buys", "loses")
SOLVED_PER_LANGUAGE = 60
FACT_COPIES = 2  # every sum and difference of the world's numbers, written out, this many times


def sft_examples(problems: list[dict], tok: Tokenizer) -> tuple[list, list]:
    """Two pools of (token ids, index where the loss starts). Solutions: every English problem (chat
    prompt + worked solution, loss on the solution), plus a handful of solved problems per target
    language that only use SEEN_VERBS: the little target-language math a multilingual pretrained
    model has seen; and every sum and difference of the world's numbers written out (FACT_COPIES
    times), so that arithmetic is not what fails in a target language. Questions: every
    target-language question as plain text (loss on all of it): the model reads the languages, but
    what their other verbs do to the numbers it never sees solved."""
    solved, questions = [], []
    seen = {lang: 0 for lang in LANGS[1:]}
    for i, p in enumerate(problems):
        op = VERBS[p["verb"]][0]
        for lang in LANGS:
            if lang != "en":
                if p["verb"] not in SEEN_VERBS or seen[lang] >= SOLVED_PER_LANGUAGE:
                    continue
                seen[lang] += 1
            problem = Problem(f"toy-{i}", lang, render(p, lang), str(answer(p)))
            prompt_ids = encode_prompt(tok, problem)
            worked = tok.encode(" " + solution(p["a"], op, p["b"], lang)) + [tok.eos_id]
            solved.append((prompt_ids + worked, len(prompt_ids)))
        for lang in LANGS[1:]:
            questions.append((tok.encode(render(p, lang)) + [tok.eos_id], 0))
    facts = [f"{a} {op} {b} = {a + b if op == '+' else a - b}."
             for a in range(2, A_MAX + 1) for b in range(1, B_MAX + 1) for op in "+-"
             if op == "+" or b < a]
    solved += [(tok.encode(f) + [tok.eos_id], 0) for f in facts] * FACT_COPIES
    return solved, questions


def train_warmstart(root: Path, problems: list[dict], seed: int, steps: int, width: int,
                    layers: int, log) -> None:
    texts = [render(p, lang) for p in problems for lang in LANGS]
    texts += [solution(p["a"], VERBS[p["verb"]][0], p["b"], lang)
              for p in problems for lang in LANGS]
    texts += [mgsm_prompt(Problem("x", lang, "q", "0")) for lang in LANGS]
    tok = chat_tokenizer(train_bpe(texts, vocab_size=700))
    model = random_llama(tok.vocab_size, width, layers, seed, tok.token_id("<|begin_of_text|>"),
                         tok.eos_id)
    # Solutions and questions come in separate batches (similar lengths, little padding), questions
    # every 4th.
    pools = sft_examples(problems, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    bar = Progress(steps, "toy warm start", " steps")
    for step in range(steps):
        pool = pools[step % 4 == 3]
        batch = [pool[i] for i in torch.randint(0, len(pool), (64,), generator=g).tolist()]
        ids, att = pad_rows([row for row, _ in batch])
        loss_mask = att.clone()
        for i, (_, start) in enumerate(batch):
            loss_mask[i, :max(start, 1)] = False
        for group in opt.param_groups:  # linear decay to 10%
            group["lr"] = 3e-3 * (1 - 0.9 * step / steps)
        logp, _ = model(ids[:, :-1], output="logprobs", labels=ids[:, 1:],
                        label_mask=loss_mask[:, 1:])
        loss = -logp.sum() / loss_mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log(f"  warm start step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    bar.close()
    out = root / "warmstart"
    save_tokenizer(tok, out)
    save_model(model.eval(), out)
