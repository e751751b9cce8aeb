"""Entry point: `python -m oel_ray.main [+experiment=NAME] [overrides...]` (Hydra; -m for sweeps).

Configuration mistakes are reported as one line naming the field and the fix, before Ray starts
(exit code 2). A run stopped by a dead role or a timeout says so in one line and how to resume
(exit code 1); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from oel_ray import checks, config, errors, preflight
from oel_ray.manifest import Manifest, config_snapshot
from oel_ray.overrides import CONF_DIR, check_override_keys
from oel_ray.validate import validate

# Hydra flags that take a value (`--cfg job`): the value is not an override.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--info", "--experimental-rerun"}
NO_RUN_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def fail(message: str, kind: str = "config") -> None:
    print(f"oel_ray: {kind} error: {message}", file=sys.stderr)
    sys.exit(2)


def refuse(err: errors.ConfigError, raw: DictConfig) -> None:
    """A setting or a file on disk this run cannot go on with, as the user typed its field."""
    fail(checks.user_named(str(err), raw), "input" if isinstance(err, errors.InputError) else "config")


def stop_reason(err: BaseException) -> Optional[str]:
    """Why the run stopped, in a few words, when `err` or what caused it is an operational failure
    that a rerun resumes from: a role's process, a Ray worker or a node died, or a wait timed out.
    None for anything else (a bug: its traceback is the report)."""
    from ray import exceptions as rx

    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, rx.RayActorError):
            role = re.search(r"class_name: (\w+)", str(seen))
            died = f"the {role.group(1)} actor died" if role else "a role died"
            return f"{died} ({type(seen).__name__})" if seen is err else f"{first_line(err)} ({died})"
        if isinstance(seen, (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError, TimeoutError)):
            return first_line(seen) if seen is err else f"{first_line(err)} ({first_line(seen)})"
        seen = seen.__cause__ or getattr(seen, "cause", None)  # RayTaskError keeps the remote one in .cause
    return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> dict:
    try:
        cfg = validate(OmegaConf.to_object(raw))
    except errors.ConfigError as err:
        fail(checks.user_named(str(err), raw))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    from oel_ray import driver, tracking
    from oel_ray.embedded import build_model, fingerprint, needs_build
    from oel_ray.session import keeping_roles_between_runs

    if cfg.model.build:
        if needs_build(cfg.model.path, cfg.model.build):
            try:  # a run directory this run cannot resume is refused now, not after a build of minutes
                Manifest.check(cfg.output_dir, config_snapshot(cfg))
            except errors.ConfigError as err:
                refuse(err, raw)
        tracking.timed(f"build {cfg.model.build} model", lambda: build_model(cfg.model.path, cfg.model.build))
        logging.getLogger("oel_ray").info("%s model at %s: build %s", cfg.model.build, cfg.model.path,
                                          fingerprint(cfg.model.path))
    finished = False
    try:
        preflight.check(cfg)  # prompt room, env kwargs, model limits: needs the tokenizer and a game, not Ray
        # starts Ray only if some stage still has to run
        summary = driver.run(cfg, keep_roles=in_a_sweep() or keeping_roles_between_runs())
        finished = True
    except errors.ConfigError as err:  # found on disk: a resume with other settings, a corrupt file
        refuse(err, raw)
    except Exception as err:
        reason = stop_reason(err)
        if reason is None:
            raise
        logging.getLogger("oel_ray").error("%s: %s", type(err).__name__, err)
        print(f"oel_ray: stopped: {reason}; finished stages and the last training state are saved: "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(1)
    finally:
        import ray

        from oel_ray.session import ray_started_here

        # A sweep's next job may reuse the cluster (session.init_ray); the process's exit stops it. A
        # connection this process found open (a notebook's) is its owner's to close.
        if ray.is_initialized() and ray_started_here() and not (finished and in_a_sweep()):
            ray.shutdown()
    print_summary(summary)
    return summary


def in_a_sweep() -> bool:
    """Whether the next job of this multirun (`-m`) runs in this same process: Hydra's basic
    launcher's do (a launcher that gives each job a process of its own, submitit's, stops Ray here)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return HydraConfig.get().launcher.get("_target_", "").endswith(".BasicLauncher")


def curve_lines(summary: dict) -> str:
    """One line per round: pass rate by accumulation step with the knowledge in context (* used)."""
    used = summary.get("knowledge_step")
    return "".join(
        f"in-context pass rate by accumulation step, round {r}: "
        + ", ".join(f"{p['step']}{'*' if p['step'] == used else ''} {p['pass_rate']:.3f}" for p in curve) + "\n"
        for r, curve in summary.get("in_context_curve", {}).items())


def print_summary(summary: dict) -> None:
    lo, hi = summary["pass_rate_ci"]
    print(
        "\n=== OEL summary ===\n"
        f"rounds {summary['rounds']}, consolidation steps {summary['steps']}, wall {summary['wall_seconds']}s\n"
        f"pass rate {summary['pass_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}; round 0: {summary['pass_rate_round_0']:.3f})\n"
        f"mean response tokens per turn {summary['response_tokens_per_turn']:.1f}\n"
        + (f"IF-Eval prompt-level strict accuracy (OOD) {summary['ifeval_strict_prompt_accuracy']:.3f}\n"
           if summary.get("ifeval_strict_prompt_accuracy") is not None else "") +
        curve_lines(summary) +
        f"{summary['kl_direction']} KL first step "
        f"{summary['kl_first_step']:.4f} -> last step {summary['kl_last_step']:.4f}"
        f" ({summary['consolidation_loss']}; the teacher reads {summary.get('teacher_reads', 'knowledge')})\n"
        f"final model {summary['final_model']}\n"
        f"rounds table {summary['rounds_table']}, plot {summary['plot']}"
    )


def precheck(argv: list[str]) -> None:
    """Compose and validate what the command asks for before Hydra runs anything (Hydra writes into
    the run directory first), so every mistake, `--cfg job` included, is one line and a run directory
    that cannot be used is left untouched. Sweeps are checked per override value instead."""
    from hydra import compose, initialize_config_dir

    check_override_keys(argv)
    if {"-m", "--multirun"} & set(argv):
        return
    overrides, skip = [], False
    for arg in argv:
        if skip or arg in FLAGS_WITH_VALUE:
            skip = not skip and arg in FLAGS_WITH_VALUE
            continue
        if not arg.startswith(("-", "hydra.", "hydra/", "+hydra")) or arg.startswith("hydra.run.dir="):
            overrides.append(arg)
    output_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    if output_dir is None:
        overrides.append("output_dir=.")  # Hydra fills the real one at run time
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = compose("config", overrides=overrides, return_hydra_config=True)
        hydra_dir = raw.hydra.run.dir  # where Hydra writes .hydra/, and the run unless output_dir says otherwise
        with open_dict(raw):
            del raw["hydra"]
        cfg = OmegaConf.to_object(raw)
    except Exception as err:  # Hydra's own refusal: its first line names the key
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise errors.ConfigError(" ".join(lines[:2])) from None  # the key, then Hydra's fix if any
    try:
        validate(cfg)
    except errors.ConfigError as err:
        raise errors.ConfigError(checks.user_named(str(err), raw)) from None
    if any(arg.split("=")[0] in NO_RUN_FLAGS for arg in argv):
        return  # prints, runs nothing: no run directory is written
    if output_dir is not None:
        checks.run_dir(output_dir, "output_dir")
    checks.run_dir(hydra_dir, "hydra.run.dir")


def main() -> None:
    config.register()
    try:
        precheck(sys.argv[1:])
    except errors.ConfigError as err:
        fail(str(err))
    hydra_main()


if __name__ == "__main__":
    main()
