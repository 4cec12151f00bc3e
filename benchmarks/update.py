"""The update's cost with padded micro-batches (ppo.micro_batch_size rows, each padded to its
longest row) against packed ones (ppo.micro_batch_tokens: the rows of a micro-batch concatenated
into one, attention confined to each sequence), without and with each prompt computed once for
its samples: seconds per actor forward + backward over one batch, real tokens per second (the
tokens of the rows, prompts counted once per row), the padding fraction, and the losses (which must
agree).

    python benchmarks/update.py [--sequences 64] [--samples 4] [--micro-batch-size 8]
                                [--micro-batch-tokens 4096] [--repeats 2]

The model is a random Llama of ~125M parameters in fp32 (768 wide, 12 layers, GQA 12/4 heads, a
32,000-token vocabulary); the batch a realistic length mix: prompts of 100-330 tokens, each for
`samples` rows, responses long-tailed from 20 to 512 (log-normal), in sampling order. Each setting
runs `repeats` times after one warm-up pass; the median is reported.
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pbrl import ppo, losses  # noqa: E402
from pbrl.config import PPOConfig  # noqa: E402
from pbrl.model import ModelArgs, Transformer  # noqa: E402


def length_mix(sequences: int, samples: int, seed: int = 0):
    """(tokens [B, L] right padded, lengths [B], response mask [B, L - 1]); rows i * samples to
    (i + 1) * samples - 1 share a prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, 331, (sequences // samples,), generator=g)
    responses = (20 + torch.randn(sequences, generator=g).mul(1.0).add(4.3).exp()).clamp(max=512)
    lengths = prompts.repeat_interleave(samples) + responses.long()
    tokens = torch.randint(3, 32000, (sequences, int(lengths.max())), generator=g)
    shared = torch.randint(3, 32000, (sequences // samples, int(prompts.max())), generator=g)
    tokens[:, :shared.shape[1]] = shared.repeat_interleave(samples, 0)
    prompts = prompts.repeat_interleave(samples)
    tokens[torch.arange(tokens.shape[1]) >= lengths[:, None]] = 0
    positions = torch.arange(tokens.shape[1] - 1)
    mask = (positions >= prompts[:, None] - 1) & (positions < lengths[:, None] - 1)
    return tokens, lengths, mask


def one_update(model, exp, counts, cfg, micro_batches) -> float:
    """One forward + backward over the batch; returns the summed loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for rows in micro_batches:
        loss, _ = losses.actor_loss(model, exp.rows(torch.as_tensor(rows)), counts, cfg, 1.0, 0.0)
        loss.backward()
        total += float(loss.detach())
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                     head_dim=64, max_position_embeddings=1024)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02)
    params = sum(p.numel() for p in model.parameters())
    tokens, lengths, mask = length_mix(a.sequences, a.samples)
    g = torch.Generator().manual_seed(1)
    sampled = torch.where(mask, -torch.rand(mask.shape, generator=g), 0.0)
    advantages = torch.where(mask, torch.randn(mask.shape, generator=g), 0.0)
    exp = losses.Experience(tokens, lengths, mask, sampled, None, None, torch.zeros(mask.shape),
                            torch.zeros(mask.shape), advantages, torch.zeros(mask.shape),
                            mask.float())
    counts = ppo.count(mask)
    real = int((lengths - 1).sum())
    print(f"model: {params / 1e6:.0f}M parameters, fp32, {torch.get_num_threads()} threads; "
          f"{a.sequences} sequences, {a.sequences // a.samples} prompts, {real} real tokens "
          f"(prompts 100-330, responses {int((mask.sum(1)).min())}-{int(mask.sum(1).max())})")
    padded = PPOConfig(micro_batch_size=a.micro_batch_size)
    packed = PPOConfig(micro_batch_tokens=a.micro_batch_tokens)
    units = losses.packing_units(tokens, lengths, mask, a.micro_batch_tokens)
    settings = {  # name -> (config, micro-batches, whether samples share their prompt)
        f"padded, {a.micro_batch_size} rows per micro-batch":
            (padded, list(torch.arange(a.sequences).split(a.micro_batch_size)), False),
        f"packed, {a.micro_batch_tokens} tokens per micro-batch": (packed, losses.
            token_micro_batches((lengths - 1).tolist(), a.micro_batch_tokens), False),
        f"packed, {a.micro_batch_tokens} tokens, each prompt once": (packed, [
            sorted(i for u in part for i in units[u][0]) for part in losses.token_micro_batches(
                [width for _, width in units], a.micro_batch_tokens)], True)}
    results = {}
    for name, (cfg, rows, share) in settings.items():
        rows = [torch.as_tensor(r) for r in rows]
        unshared = functools.partial(losses.packed_per_token, share=False)
        with mock.patch.object(losses, "packed_per_token",
                               losses.packed_per_token if share else unshared):
            computed, padding = (real, 0) if cfg.micro_batch_tokens and not share else \
                losses.computed_tokens(exp, rows, bool(cfg.micro_batch_tokens))
            one_update(model, exp, counts, cfg, rows)  # warm-up
            seconds, values = [], []
            for _ in range(a.repeats):
                start = time.perf_counter()
                values.append(one_update(model, exp, counts, cfg, rows))
                seconds.append(time.perf_counter() - start)
        results[name] = (statistics.median(seconds), values[-1])
        print(f"{name}: {len(rows)} micro-batches, {computed} tokens computed "
              f"(padding {padding / computed:.1%}), {results[name][0]:.2f} s per update, "
              f"{real / results[name][0]:.0f} real tokens/s, loss {results[name][1]:.7f}",
              flush=True)
    base, base_loss = results.pop(next(iter(results)))
    for name, (seconds, loss) in results.items():
        print(f"{name} vs padded: {base / seconds:.2f}x faster; loss difference "
              f"{abs(loss - base_loss):.1e}")


if __name__ == "__main__":
    main()
