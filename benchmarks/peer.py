"""A whole GRPO iteration of pbrl against TRL's GRPOTrainer on the same workload, runs alternated.

    python benchmarks/peer.py --mgsm ../shared/data/mgsm [--iterations 3] [--runs 2]

The workload: a random model in SmolLM2-135M-Instruct's shapes (30 layers, 576 wide, GQA 9/3
heads, a 49,152-token vocabulary, tied embeddings; no download) with a ChatML template, fp32 on
the CPU; German MGSM problems, 8 prompts x 4 samples per iteration, temperature 1, up to 64 new
tokens (a random model never stops early), one optimizer step per iteration, no KL term (neither
loads a reference model), a reward of 0 for every sample on both sides (exact match on pbrl's, a
constant on TRL's; no reward model to time). Each run is a fresh process (`train.py`, or this
script's --trl-worker for GRPOTrainer with its defaults otherwise) of --iterations iterations; runs
alternate pbrl, TRL, pbrl, TRL, ... so that both see the same machine. Reported: the median
seconds per iteration over iterations 2..N of every run (the first compiles and warms caches),
pbrl's phases, and each process's peak RSS.

TRL is not a pbrl requirement: install it in the environment that runs this script
(`pip install trl`; 1.16.0 was measured). The prompt tokenizer is a byte-level BPE trained on the
MGSM questions, sized so that a German prompt is ~250 tokens as with SmolLM2's own tokenizer.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-Instruct's template: ChatML with a default system turn.
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' "
            "+ message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if "
            "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPTS, SAMPLES, NEW_TOKENS = 8, 4, 64


def build_model(out: Path, mgsm: Path, vocab: int) -> None:
    """The random SmolLM2-shaped checkpoint and a BPE of `vocab` tokens trained on MGSM's
    questions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pbrl.tokenizer import train_bpe
    texts = [line.split("\t")[0] for f in sorted(mgsm.glob("mgsm_*.tsv"))
             for line in f.read_text().splitlines()]
    tok = train_bpe(texts, vocab_size=vocab)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=tok.token_to_id("<|endoftext|>"))
    LlamaForCausalLM(config).save_pretrained(out)


def problems(mgsm: Path):
    from pbrl.data import load_mgsm
    return load_mgsm(mgsm, ["en", "de"])


def run_pbrl(model: Path, mgsm: Path, work: Path, iterations: int) -> dict:
    """train.py for `iterations` steps; per-iteration seconds and phases from metrics.jsonl."""
    cache = work / "pivot.jsonl"
    if not cache.exists():  # exact match reads no reference: any English text will do
        cache.write_text("".join(json.dumps({"id": p.id, "question": p.question, "reference":
                                             p.question, "answer": p.answer, "pivot": "peer"})
                                 + "\n" for p in problems(mgsm)["en"]))
    out = work / f"pbrl-{time.time_ns()}"
    args = {"models.policy": model, "data.path": mgsm, "data.langs": "de",
            "data.pivot_cache": cache, "data.eval_path": "", "reward.kind": "exact_match",
            "rollout.prompts_per_step": PROMPTS, "rollout.samples_per_prompt": SAMPLES,
            "rollout.max_new_tokens": NEW_TOKENS, "rollout.temperature": 1.0,
            "ppo.advantage": "grpo", "ppo.kl_beta": 0, "ppo.epochs": 1, "ppo.minibatches": 1,
            "ppo.micro_batch_tokens": 4096, "ppo.lr": 1e-6, "models.dtype": "float32",
            "run.steps": iterations, "run.out_dir": out, "run.checkpoint_every": "off"}
    flags = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "seconds" in r]
    return {"seconds": [r["seconds"] for r in rows], "peak_mb": max(r["peak_memory_mb"]
                                                                    for r in rows),
            "phases": {k: [r[k] for r in rows] for k in rows[-1] if k.startswith("time/")}}


def run_trl(model: Path, mgsm: Path, work: Path, iterations: int) -> dict:
    """This script's --trl-worker in a fresh process; it prints its timings as one JSON line."""
    done = subprocess.run([sys.executable, __file__, "--trl-worker", "--model", str(model),
                           "--mgsm", str(mgsm), "--work", str(work), "--iterations",
                           str(iterations)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def trl_worker(model: Path, mgsm: Path, work: Path, iterations: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pbrl.data import prompt
    rows = [{"prompt": [{"role": "user", "content": prompt(p)}]} for p in problems(mgsm)["de"]]

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    clock = Clock()
    config = GRPOConfig(
        output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=PROMPTS *
        SAMPLES, num_generations=SAMPLES, max_completion_length=NEW_TOKENS, temperature=1.0,
        beta=0.0, num_iterations=1, gradient_accumulation_steps=1, learning_rate=1e-6,
        max_steps=iterations, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, seed=0)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(model),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
        train_dataset=Dataset.from_list(rows), callbacks=[clock])
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": clock.seconds, "peak_mb": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mgsm", type=Path, required=True, help="a directory of mgsm_{lang}.tsv")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=700)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "peer")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.iterations < 2:
        ap.error("--iterations must be at least 2: the first of each run is not counted")
    if a.trl_worker:
        return trl_worker(a.model, a.mgsm, a.work, a.iterations)
    import trl  # fail now, not after the first pbrl run

    from pbrl.data import encode_prompt
    from pbrl.tokenizer import Tokenizer
    model = a.work / "smollm2-135m-shapes"
    if not (model / "config.json").exists():
        build_model(model, a.mgsm, a.vocab)
    tokenizer = Tokenizer.from_pretrained(model)
    lengths = [len(encode_prompt(tokenizer, p)) for p in problems(a.mgsm)["de"]]
    print(f"TRL {trl.__version__}; {os.cpu_count()} CPUs; German prompts "
          f"{statistics.mean(lengths):.0f} tokens on average ({min(lengths)}-{max(lengths)}); "
          f"{PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens", flush=True)
    results = {"pbrl": [], "TRL": []}
    for run in range(a.runs):
        for name, fn in (("pbrl", run_pbrl), ("TRL", run_trl)):
            start = time.perf_counter()
            results[name].append(fn(model, a.mgsm, a.work, a.iterations))
            seconds = results[name][-1]["seconds"]
            print(f"run {run + 1} {name}: iterations {', '.join(f'{s:.1f}' for s in seconds)} s "
                  f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
    medians = {name: statistics.median(s for r in runs for s in r["seconds"][1:])
               for name, runs in results.items()}
    phases = {k: statistics.median(v for r in results["pbrl"] for v in r["phases"][k][1:])
              for k in results["pbrl"][0]["phases"]}
    print("pbrl phases (median s): " + ", ".join(f"{k[5:]} {v:.1f}" for k, v in phases.items()))
    for name, runs in results.items():
        print(f"{name}: {medians[name]:.1f} s per iteration (median of iterations 2..{a.iterations}"
              f" of {a.runs} runs), peak RSS {max(r['peak_mb'] for r in runs) / 1024:.1f} GB")
    print(f"pbrl vs TRL: {medians['TRL'] / medians['pbrl']:.2f}x faster per iteration")


if __name__ == "__main__":
    main()
