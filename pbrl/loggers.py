"""Where a run's metrics go: {out_dir}/metrics.jsonl always, and TensorBoard and Weights & Biases when run.loggers
names them (each an optional import: selecting one that is not installed is an error that names the package).

TensorBoard and W&B get the metrics.jsonl names, grouped: names that carry a group keep it (`reward/de`,
`time/rollout`, `acc/avg`); the reward and its components go under `reward/` (`reward` itself as `reward/mean`), the
PPO statistics under `ppo/`, throughput and memory under `perf/`.
"""
from __future__ import annotations

import json
from pathlib import Path

LOGGERS = ("jsonl", "tensorboard", "wandb")
REWARD = {"reward": "mean", "agreement": "agreement", "embedding": "embedding", "mt": "mt", "format": "format",
          "language": "language", "exact_match": "exact_match"}
PPO = {"kl", "kl_beta", "kl_loss", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "value_clipfrac",
       "grad_norm", "explained_variance", "logprob_mismatch", "lr"}


def scalar_name(key: str) -> str:
    """A metrics.jsonl key -> its grouped name in TensorBoard and W&B."""
    if "/" in key:
        return key
    if key in REWARD:
        return f"reward/{REWARD[key]}"
    return f"ppo/{key}" if key in PPO else f"perf/{key}"


class Loggers:
    """Opened on rank 0 by the trainer: log(metrics) once per step (and once for the step-0 evaluation)."""

    def __init__(self, out: Path, names: list[str], run_name: str, config: dict, wandb_project: str = "pbrl",
                 wandb_mode: str = "online"):
        self.jsonl = Path(out) / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("run.loggers includes tensorboard, which is not installed: pip install "
                                  "tensorboard") from None
            self.tensorboard = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ImportError("run.loggers includes wandb, which is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, dir=str(out),
                                    config=config, resume="allow")

    def log(self, metrics: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        scalars = {scalar_name(k): v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
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
