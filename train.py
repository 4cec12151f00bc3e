"""Train a policy with PB-RLSVR (PPO rewarded against an English pivot).

    python train.py                        # the embedded toy experiment (no download, CPU, minutes)
    python train.py --config configs/llama31_8b_hybrid.toml   # one run from a config file
    torchrun --nproc_per_node=N train.py --config FILE.toml [--section.key value ...]

With no --config and no overrides it runs the whole toy experiment (warm start, gold-label PPO
baseline and the PB-RLSVR rewards side by side; see pbrl/experiment.py). Anything else is one run of
pbrl/trainer.py.
"""
import sys


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        from pbrl.config import settings_help
        print(f"{__doc__}\nSettings (in a TOML file's [section], or --section.key value):"
              f"{settings_help()}")
        return
    if not argv:
        from pbrl.experiment import main as experiment
        experiment()
        return
    from pbrl import distributed
    from pbrl.config import load_config, parse_command_line
    from pbrl.prepare import prepare
    from pbrl.toy import use_world
    cfg = load_config(*parse_command_line(argv))
    # Under torchrun the process group is created here, once, with the run's timeout.
    with distributed.process_group(cfg.run.timeout_minutes):
        prepare(use_world(cfg)).run()


if __name__ == "__main__":
    from pbrl.cli import run_main
    run_main(main, sys.argv[1:])
