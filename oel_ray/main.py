"""Entry point: `python -m oel_ray.main [+experiment=NAME] [overrides...]` (Hydra; -m for sweeps).

Configuration mistakes are reported as one line naming the field and the fix, before Ray starts.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from oel_ray import config


def fail(message: str) -> None:
    print(f"oel_ray: config error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> dict:
    try:
        cfg = config.validate(OmegaConf.to_object(raw))
    except config.ConfigError as err:
        fail(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    from oel_ray import driver
    from oel_ray.tiny_model import build_tiny_model

    if cfg.model.build == config.TINY_MODEL:
        driver.timed("build tiny model", lambda: build_tiny_model(cfg.model.path))
    try:
        summary = driver.run(cfg)  # starts Ray only if some stage still has to run
    except config.ConfigError as err:  # found on disk: a resume with other settings, a missing file
        fail(str(err))
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    lo, hi = summary["pass_rate_ci"]
    print(
        "\n=== OEL summary ===\n"
        f"rounds {summary['rounds']}, consolidation steps {summary['steps']}, wall {summary['wall_seconds']}s\n"
        f"pass rate {summary['pass_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}; round 0: {summary['pass_rate_round_0']:.3f})\n"
        f"mean response tokens per turn {summary['response_tokens_per_turn']:.1f}\n"
        f"reverse KL first step {summary['reverse_kl_first_step']:.4f} -> last step {summary['reverse_kl_last_step']:.4f}\n"
        f"final model {summary['final_model']}\n"
        f"rounds table {summary['rounds_table']}, plot {summary['plot']}"
    )


def main() -> None:
    config.register()
    try:
        config.check_override_keys(sys.argv[1:])
    except config.ConfigError as err:
        fail(str(err))
    hydra_main()


if __name__ == "__main__":
    main()
