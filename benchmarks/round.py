"""One `tiny` round as `make run EXPERIMENT=tiny` runs it, wall seconds per stage.

    python -m benchmarks.round

Runs `python -m oel_ray.main` (the default `tiny` experiment, as `make run EXPERIMENT=tiny` does) into a temporary
directory and reads the stage timings the run itself logs in its oel.log (`[stage] done in X s`):
role start-up (vLLM workers, teacher, learner), each stage of rounds 0 and 1, plus the whole
process from launch to exit (imports, Ray start and shutdown included) and the consolidation
steps' own seconds from round 1's metrics.jsonl. Prints a table and saves
benchmarks/results/round.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, markdown_table, quiet_libraries, save, stopwatch

DONE = re.compile(r"\[(?P<stage>[^\]]+)\] done in (?P<seconds>[0-9.]+)s")
STARTS = ("start ",)  # role start-up lines; they run inside the first stage that needs the roles
STEP_STAGES = ("generate", "teacher", "learner", "sync", "learner_compute")


def stage_seconds(log_text: str) -> list[tuple[str, float]]:
    """(stage, seconds) in the order the run finished them."""
    return [(m["stage"], float(m["seconds"])) for m in DONE.finditer(log_text)]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="oel_bench_round.") as out:
        with stopwatch() as t:
            proc = subprocess.run([sys.executable, "-m", "oel_ray.main", f"hydra.run.dir={out}",
                                   "tracking.progress_bars=false"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"python -m oel_ray.main failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        stages = stage_seconds((Path(out) / "oel.log").read_text())
        steps = [json.loads(line) for line in (Path(out) / "round_1" / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((Path(out) / "manifest.json").read_text())["config"]
    starts = sum(s for name, s in stages if name.startswith(STARTS))
    rows = []
    for name, seconds in stages:
        if name == "round_0/evaluate":  # the roles start inside it: show the evaluation alone
            rows.append([f"{name} (without role start-up)", round(seconds - starts, 2)])
        else:
            rows.append([name, seconds])
    rows.append(["whole process (python -m oel_ray.main: imports, Ray, every stage, shutdown)", round(t["s"], 1)])
    step_mean = {k: sum(s.get(f"seconds_{k}", 0.0) for s in steps) / len(steps) for k in STEP_STAGES}
    step_rows = [[len(steps), config["learner"]["batch_size"], *(round(step_mean[k], 3) for k in STEP_STAGES)]]
    tables = {
        "One `tiny` round (`make run EXPERIMENT=tiny`), wall seconds per stage, from the run's oel.log":
            markdown_table(["stage", "seconds"], rows),
        "Its consolidation steps (mean seconds per step, from round_1/metrics.jsonl)":
            markdown_table(["steps", "batch", *STEP_STAGES], step_rows),
    }
    print("\n\n".join(f"{title}\n{table}" for title, table in tables.items()))
    save("round", {"stages": dict(stages), "role_start_s": round(starts, 2), "process_s": round(t["s"], 1),
                   "consolidation_step_mean_s": {k: round(v, 4) for k, v in step_mean.items()},
                   "steps": len(steps)}, tables=tables, readme=list(tables)[:1])


if __name__ == "__main__":
    quiet_libraries()
    main()
