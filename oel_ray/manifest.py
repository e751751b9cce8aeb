"""The run's manifest: which stages finished, so re-running the same command resumes.

`<output_dir>/manifest.json` records the config the run started with and, per stage
("round_1/collect", ...), how often it was started and when it finished. A stage writes its outputs
atomically and is marked finished only after; a stage that was cut off is simply run again (its
partial files are overwritten), and a finished stage is never run again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from oel_ray import artifacts
from oel_ray.errors import ConfigError, InputError
from oel_ray.layout import RunLayout

# Fields that may differ between the first run and a resume: where things run, not what is computed.
RESUMABLE_CHANGES = ("cluster", "tracking", "output_dir")


def is_run(run_dir: Path) -> bool:
    """Whether run_dir holds an oel_ray run: a manifest (a corrupt one too: Manifest names it)."""
    try:
        data = json.loads(RunLayout(Path(run_dir)).manifest.read_text())
    except ValueError:
        return True
    except OSError:
        return False
    return isinstance(data, dict) and "stages" in data


def config_snapshot(cfg) -> dict:
    """The run's settings as the manifest records them (an OELConfig as plain JSON values)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))


class Manifest:
    def __init__(self, run_dir: Path, config: dict):
        self.path = RunLayout(Path(run_dir)).manifest
        saved = Manifest.check(run_dir, config)
        if saved is not None:
            self.data = saved
        else:
            self.data = {"version": 1, "config": config, "stages": {}}
            self._save()

    @staticmethod
    def check(run_dir: Path, config: dict) -> Optional[dict]:
        """The manifest already in `run_dir` (None when there is none), refused when it is corrupt or
        was written by a run with other settings. Reads only: main calls it before any model build."""
        path = RunLayout(Path(run_dir)).manifest
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err}); move the run directory away "
                             "or choose another output_dir") from None
        _check_same_config(data.get("config", {}), config, path.parent)
        return data

    @property
    def resumed(self) -> bool:
        return any(s.get("finished") for s in self.data["stages"].values())

    def done(self, stage: str) -> Optional[dict]:
        """The stage's record if it finished and its outputs are still there (a deleted output makes
        the stage run again)."""
        record = self.data["stages"].get(stage)
        if not record or not record.get("finished"):
            return None
        return record if all((self.path.parent / p).exists() for p in record.get("outputs", [])) else None

    def start(self, stage: str) -> None:
        if self.done(stage):
            raise RuntimeError(f"stage {stage} already finished; it must not run twice")
        record = self.data["stages"].setdefault(stage, {"attempts": 0})
        record.pop("finished", None)  # an output was deleted: the stage runs again
        record["attempts"] += 1
        record["started"] = time.time()
        self._save()

    def finish(self, stage: str, **info: Any) -> None:
        record = self.data["stages"][stage]
        record.update(info, finished=time.time(), seconds=round(time.time() - record["started"], 2))
        self._save()

    def _save(self) -> None:
        artifacts.write_json(self.path, self.data)


def _check_same_config(saved: dict, current: dict, run_dir: Path) -> None:
    """Resuming with other settings would mix two experiments in one directory: refuse, naming the
    first field that differs."""
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    _differs(f"{key}.{sub}", a.get(sub), b.get(sub), run_dir)
        elif a != b:
            _differs(key, a, b, run_dir)


def _differs(field: str, saved: Any, current: Any, run_dir: Path) -> None:
    raise ConfigError(f"{field}: is {current!r} but the run in {run_dir} was started with {saved!r}; "
                      "rerun with the same overrides to resume, or pass a new output_dir=...")
