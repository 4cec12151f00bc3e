"""Shared fixtures: tiny random HF checkpoints written by transformers (the oracle) and an in-memory
tokenizer."""
import json
import os
from pathlib import Path

# before anything imports triton: the kernels run on the CPU
os.environ.setdefault("TRITON_INTERPRET", "1")
# before torch is imported: the suite runs in two processes (pytest.ini), each on one thread, so the
# two never oversubscribe a 2-core machine's cores (OpenMP's spinning threads then crawl)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# ... and on the numerics the toy experiment pins (pbrl/numerics.py), so that runs made here and
# in the processes an entry point starts compute alike
import pbrl.numerics  # noqa: E402  (imports no torch)

pbrl.numerics.pin()

# (imported after the settings above on purpose)
import pytest  # noqa: E402
import torch  # noqa: E402

from pbrl import kernels  # noqa: E402
from pbrl.tokenizer import train_bpe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
    """The environment of an entry point a test runs in a fresh process: as a CPU user's, kernels on
    their PyTorch paths (no TRITON_INTERPRET: tests/test_kernels.py runs the Triton kernels), one
    thread per process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def stalled_run(tmp_path, stall: str, args: list):
    """train.py with `args` under torchrun on 2 ranks (gloo) and run.timeout_minutes 0.05 (3 s),
    after `stall` (Python that makes a rank stall somewhere) has run in each process: what the
    stalled rank's peer does. Returns the finished process (stderr captured)."""
    return patched_run(tmp_path, stall, [*args, "--run.timeout_minutes", "0.05"], timeout=100)


def patched_run(tmp_path, patch: str, args: list, ranks: int = 2, timeout: float = 300):
    """train.py with `args` under torchrun on `ranks` ranks (gloo), after `patch` (Python) has run
    in each process. Returns the finished process (stderr captured)."""
    import subprocess
    import sys
    script = tmp_path / "patched.py"
    script.write_text(patch + "import sys\n"
                      f"sys.argv = ['train.py', *{[str(a) for a in args]!r}]\n"
                      "import runpy; runpy.run_path('train.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc_per_node={ranks}", "--standalone", str(script)], cwd=ROOT,
                          capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def run_here(main, argv, capsys) -> tuple[int, str, str]:
    """An entry point's main as its command runs it (cli.run_main: bad input ends with one line on
    stderr and exit status 2), but in this process: (exit status, stdout, stderr). Each command
    also runs in a fresh process somewhere (tests/test_entrypoints.py); this is for the cases
    after that one."""
    from pbrl.cli import run_main
    capsys.readouterr()
    try:
        run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def sampling_in_pytorch(request, monkeypatch):
    """Decoding calls the sampling kernel once per step, and the interpreter takes ~5 ms per row for
    it: tests sample through the kernel's PyTorch specification (what a CPU runs), except those
    marked `triton_sampling` (the kernel's own tests and one end-to-end sampler test), which run the
    Triton kernel in the interpreter."""
    if "triton_sampling" not in request.keywords:
        monkeypatch.setattr(kernels.sampling, "use_triton", lambda t: t.is_cuda)


CORPUS = ["The answer is 42.", "Die Antwort lautet 7.", "La réponse est 12.", "Jibu ni 3.",
          "Janet has 3 apples and buys 5 more. How many apples does she have?", "user", "assistant",
          "system", "You are a helpful assistant.", "Hello there, how are you today?"] * 20


def build_tokenizer():
    """A byte-level BPE of ~300 tokens trained in memory, with Llama 3 and ChatML special tokens."""
    return train_bpe(CORPUS, vocab_size=300)


TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def hf_config(family: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    kw = {**TINY, **overrides}
    if family == "llama":
        kw.setdefault("rope_parameters",
                      {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32})
        return LlamaConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "qwen3":
        kw.setdefault("head_dim", 32)  # != hidden_size / num_heads = 16
        return Qwen3Config(**kw)
    raise ValueError(family)


def randomize(model, seed: int = 0):
    """Random values in every parameter, biases and norm weights included, so no term can hide at
    its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)
    return model


# Written for these tests in the shape of Llama 3.1's template: a default system prompt with today's
# date (strftime_now), role alternation enforced with raise_exception, the generation prompt added
# on loop.last.
REAL_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a careful assistant. Today is "
                             + strftime_now("%d %B %Y") + "." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate '
                            + 'user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
        + message['content'] | trim }}
    {{- '<|eot_id|>' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {%- endif %}
{%- endfor %}
"""


def save_hf_model(directory, family: str = "llama", seed: int = 0, chat_template: str | None = None,
                  **overrides):
    """Write a tiny random transformers model and the test tokenizer (with `chat_template` in its
    tokenizer_config.json, if given) to `directory`; returns the HF model."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}[family]
    torch.manual_seed(seed)
    model = randomize(cls(hf_config(family, **overrides)), seed).eval()
    model.save_pretrained(directory)
    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|eot_id|>" if family == "llama" else "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": "<|begin_of_text|>",
                   **({"chat_template": chat_template} if chat_template else {})}, f)
    return model


@pytest.fixture
def llama_dir(tmp_path):
    save_hf_model(tmp_path, "llama")
    return tmp_path


def hf_tensors(directory) -> dict:
    """Every tensor of a HF model directory (one safetensors file or shards), by HF name."""
    from pathlib import Path

    from safetensors.torch import load_file
    files = sorted(Path(directory).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def observe_compiled_steps(monkeypatch) -> list:
    """Make decoding through CudaGraphs run the eager step and record, per step, (batch size, the
    addresses of the model's parameters and of every state tensor the step reads): what a CUDA graph
    would be recorded on."""
    seen = []

    def compile_recording_addresses(fn, **options):  # stands in for torch.compile
        def step(model, st, *args):
            seen.append((len(st.ids), [t.data_ptr() for t in [*model.parameters(), *st.tensors()]]))
            return fn(model, st, *args)
        return step
    monkeypatch.setattr(torch, "compile", compile_recording_addresses)
    return seen


def each_batch_size_kept_its_addresses(seen: list) -> dict:
    """Assert that every step of a batch size read the same addresses (seen: from
    observe_compiled_steps); returns batch size -> addresses."""
    addresses = {}
    for size, pointers in seen:
        assert addresses.setdefault(size, pointers) == pointers, f"batch size {size} moved"
    return addresses


# A training world shared by the trainer's tests: tiny policy, German and English problems, pivot.
QUESTIONS = {"en": "Janet has {a} apples and buys {b} more. How many apples does she have?",
             "de": "Janet hat {a} Äpfel und kauft {b} weitere. Wie viele Äpfel hat sie?"}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny random policy, 8 problems in English and German, and a complete pivot cache."""
    root = tmp_path_factory.mktemp("world")
    save_hf_model(root / "policy", "qwen2", seed=4, tie_word_embeddings=True,
                  max_position_embeddings=256)
    data = root / "data"
    data.mkdir()
    pairs = [(a, b) for a in range(2, 6) for b in range(1, 3)]
    for lang, q in QUESTIONS.items():
        rows = "".join(f"{q.format(a=a, b=b)}\t{a + b}\n" for a, b in pairs)
        (data / f"mgsm_{lang}.tsv").write_text(rows, encoding="utf-8")
    (root / "pivot.jsonl").write_text("".join(
        json.dumps({"id": f"mgsm-{i}", "question": QUESTIONS["en"].format(a=a, b=b),
                    "reference": f"{a} + {b} = {a + b}. The answer is {a + b}."}) + "\n"
        for i, (a, b) in enumerate(pairs)))
    return root


def overrides(world, out, **extra):
    args = {"models.policy": world / "policy", "data.path": world / "data", "data.langs": "de",
            "data.pivot_cache": world / "pivot.jsonl", "data.eval_path": "",
            "reward.kind": "agreement",
            "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 2,
            "rollout.max_new_tokens": 6,
            "ppo.micro_batch_size": 4, "ppo.epochs": 2, "ppo.lr": 1e-3, "ppo.critic_lr": 1e-3,
            "ppo.entropy_coef": 0.01, "run.steps": 2, "run.out_dir": out,
            "run.checkpoint_every": "off", **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def no_model_loads(monkeypatch):
    import pbrl.checkpoint
    import pbrl.prepare

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")
    for module in (pbrl.checkpoint, pbrl.prepare):
        monkeypatch.setattr(module, "load_model", refuse)
