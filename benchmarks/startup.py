"""Start-up cost of rendering every training prompt through a chat template, as
prepare.render_prompts does once per problem: the template compiled once (pbrl) against compiled
for every prompt (what a plain jinja2 `from_string(...).render(...)` per call costs, pbrl's way
before).

    python benchmarks/startup.py [--problems 10000]

The template has the shape of Llama 3.1's (a dated default system prompt, role checks, a generation
prompt); the problems are the toy world's, in four languages; the tokenizer a byte-level BPE.
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pbrl import toy, tokenizer  # noqa: E402
from pbrl.config import load_config  # noqa: E402
from pbrl.data import Problem  # noqa: E402
from pbrl.prepare import render_prompts  # noqa: E402

TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Cutting Knowledge Date: December 2023\\nToday Date: "
                             + strftime_now("%d %b %Y") %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=10_000)
    args = ap.parse_args()
    worlds = toy.make_problems(args.problems // 4 + 1, random.Random(0))
    problems = [Problem(f"mgsm-{i}", lang, toy.render(p, lang), str(toy.answer(p)))
                for i, p in enumerate(worlds) for lang in toy.LANGS][:args.problems]
    bpe = tokenizer.train_bpe([q.question for q in problems[:2000]], vocab_size=800)
    tok = tokenizer.Tokenizer(bpe, {"bos_token": "<|begin_of_text|>", "chat_template": TEMPLATE})
    cfg = load_config(None, ["--rollout.max_new_tokens", "16"])
    times = {}
    for name, compiled in (("compiled per prompt", tokenizer._compiled.__wrapped__),
                           ("compiled once (pbrl)", tokenizer._compiled)):
        tokenizer._compiled.cache_clear()
        real = tokenizer._compiled
        tokenizer._compiled = compiled
        start = time.perf_counter()
        prompts = render_prompts(cfg, tok, problems, context=4096)
        times[name] = time.perf_counter() - start
        tokenizer._compiled = real
        assert len(prompts) == len(problems)
    for name, seconds in times.items():
        print(f"{name:22} {seconds:7.2f} s for {len(problems)} prompts "
              f"({1e3 * seconds / len(problems):.2f} ms each)")
    print(f"speed-up {times['compiled per prompt'] / times['compiled once (pbrl)']:.1f}x")


if __name__ == "__main__":
    main()
