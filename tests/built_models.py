"""Where a run finds an embedded model: the tests build into the same cache as `make run`."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def composed_model_path(experiment: str) -> str:
    """model.path as `+experiment=<experiment>` resolves it (the cache, OEL_RAY_CACHE honoured)."""
    from hydra import compose, initialize_config_dir

    from oel_ray import config

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", "output_dir=/tmp/x"]).model.path
