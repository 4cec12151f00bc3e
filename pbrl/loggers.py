"""Where a run's metrics go: {out_dir}/metrics.jsonl always; TensorBoard and Weights & Biases when
run.loggers names them (each an optional import: one that is not installed is an error naming it).

TensorBoard and W&B get the metrics.jsonl names, grouped (GROUPS): names that carry a group keep
it (`reward/de`, `time/rollout`, `acc/avg`); the reward and its components go under `reward/` (the
reward itself as `reward/mean`), the PPO statistics under `ppo/`, the responses' statistics under
`rollout/`, throughput and memory under `perf/`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pbrl.files import NUMBER, read_appended

# The group TensorBoard and W&B file each bare metrics.jsonl name under (names that carry a group,
# reward/de, time/rollout, acc/avg, keep it). Every metric a step logs is listed once, by whoever
# adds it: a bare name missing here is an error in scalar_name, not a silent default. A reward's
# component is logged under its class's `name` (pbrl/rewards.py).
GROUPS = {
    "reward": ("reward", "exact_match", "agreement", "embedding", "mt", "format", "language",
               "overlong_penalty", "language_gate"),
    "ppo": ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "value_clipfrac",
            "grad_norm", "explained_variance", "kl", "kl_beta", "kl_loss", "lr", "corrected",
            "logprob_mismatch", "logprob_mismatch_k3"),
    "rollout": ("response_tokens", "response_length", "sequence_tokens", "truncated",
                "sampling_rounds", "informative_groups", "response_length_p50",
                "response_length_p90", "response_length_max"),
    "perf": ("seconds", "tokens_per_s", "peak_memory_mb", "update_tokens", "padding"),
}
GROUP = {name: group for group, names in GROUPS.items() for name in names}
# The console's line per step: these metrics (when a step has them) and every accuracy.
CONSOLE = (("reward", ".3f"), ("kl", ".4f"), ("clipfrac", ".3f"), ("entropy", ".3f"),
           ("value_loss", ".4f"), ("response_length", ".1f"), ("seconds", ".2f"))


def scalar_name(key: str) -> str:
    """A metrics.jsonl key -> its grouped name in TensorBoard and W&B (the reward itself is
    reward/mean)."""
    if "/" in key:
        return key
    if key not in GROUP:
        raise KeyError(f"metric {key!r} has no TensorBoard group: add it to pbrl/loggers.py's "
                       f"GROUPS")
    return "reward/mean" if key == "reward" else f"{GROUP[key]}/{key}"


def console_line(metrics: dict, steps: int) -> str:
    """One step's line on the console: 'step  2/40 | reward 0.512 | ... | de 41.0%'."""
    shown = [f"step {metrics['step']:>4}/{steps}"]
    shown += [f"{key} {metrics[key]:{fmt}}" for key, fmt in CONSOLE if key in metrics]
    shown += [f"{k.removeprefix('acc/')} {v:.1f}%" for k, v in metrics.items()
              if k.startswith("acc/")]
    return " | ".join(shown)


class Loggers:
    """Opened on rank 0 by the trainer: log(metrics) once per step (and for the step-0 evaluation).
    A metrics.jsonl that holds steps after `after_step` (a resumed run) loses them: they are
    redone."""

    def __init__(self, out: Path, names: list[str], run_name: str, config: dict,
                 wandb_project: str = "pbrl", wandb_mode: str = "online", after_step: int = 0):
        self.jsonl = Path(out) / "metrics.jsonl"
        if self.jsonl.is_file():  # a torn last line (a crash mid-write) is dropped with the rest
            kept = [row for _, row in read_appended(self.jsonl, {"step": NUMBER})
                    if row["step"] <= after_step]
            self.jsonl.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        if "wandb" in names:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode,
                                    dir=str(out), config=config, resume="allow")

    def log(self, metrics: dict) -> None:
        # strict JSON: a value that is not finite is written as null, never as a bare NaN
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in metrics.items()}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")
        step = metrics["step"]
        scalars = {scalar_name(k): v for k, v in metrics.items()
                   if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
