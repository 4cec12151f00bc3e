"""Where a run's metrics go: {out_dir}/metrics.jsonl always; TensorBoard and Weights & Biases when
run.loggers names them (each an optional import: one that is not installed is an error naming it).

TensorBoard and W&B get the metrics.jsonl names, grouped: names that carry a group keep it
(`reward/de`, `time/rollout`, `acc/avg`); the reward and its components go under `reward/` (the
reward itself as `reward/mean`), the PPO statistics under `ppo/`, throughput and memory under
`perf/`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pbrl.files import read_appended

REWARD = {"reward": "mean", "agreement": "agreement", "embedding": "embedding", "mt": "mt",
          "format": "format", "language": "language", "exact_match": "exact_match"}
PPO = {"kl", "kl_beta", "kl_loss", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl",
       "value_clipfrac", "grad_norm", "explained_variance", "logprob_mismatch", "lr"}


def scalar_name(key: str) -> str:
    """A metrics.jsonl key -> its grouped name in TensorBoard and W&B."""
    if "/" in key:
        return key
    if key in REWARD:
        return f"reward/{REWARD[key]}"
    return f"ppo/{key}" if key in PPO else f"perf/{key}"


class Loggers:
    """Opened on rank 0 by the trainer: log(metrics) once per step (and for the step-0 evaluation).
    A metrics.jsonl that holds steps after `after_step` (a resumed run) loses them: they are
    redone."""

    def __init__(self, out: Path, names: list[str], run_name: str, config: dict,
                 wandb_project: str = "pbrl", wandb_mode: str = "online", after_step: int = 0):
        self.jsonl = Path(out) / "metrics.jsonl"
        if self.jsonl.is_file():  # a torn last line (a crash mid-write) is dropped with the rest
            kept = [row for _, row in read_appended(self.jsonl, ("step",))
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
