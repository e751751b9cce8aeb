"""Run every benchmark in sequence, then write benchmarks/results/summary.md from their results.

    python -m benchmarks.run_all [name ...]

Each benchmark runs in its own process (a fresh Ray, fresh engines, no memory carried over). The
whole run must end within `BUDGET_S` (`make bench`: 20 minutes on 2 cores for the speed figures, plus
the organism's learning runs), so each script has a planned share (`PLAN_S`) and may use it plus
whatever the scripts before it left unused, never more:
a slow or stuck script is stopped at its deadline and the rest still run. The known ones run first,
in `ORDER`; any other script in benchmarks/ with a `main()` runs after them. summary.md holds only
what the scripts saved: their own tables where they give them (`common.save(..., tables=...)`),
else their scalar results, for every script with a results file (the run's own with their runtime
and status, the others as their latest run left them). README.md shows the tables each
script marks for it (`common.save(..., readme=...)`) from its latest results file, whichever run
wrote it, each headed by when it was measured: a run of some scripts refreshes theirs and keeps the
others' (`update_readme`).
Exits non-zero when any benchmark failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from oel_ray.artifacts import atomic_write_text

from benchmarks.common import RESULTS, ROOT, machine, markdown_table

HERE = Path(__file__).resolve().parent
ORDER = ("rollout", "generate", "extraction", "consolidation", "teacher", "round", "weight_sync", "kl_memory",
         "checkpointing", "gpu_check", "learner_memory", "organism_probe", "organism")
NOT_BENCHMARKS = {"__init__", "common", "flops", "run_all"}
# `make bench` <= 20 minutes for the speed figures (a minute left for installing, start-up and the
# summary), plus the organism: its lesson probe (2m19s on 2 cores) and its learning runs: 15 runs of
# 3 rounds (3 seeds, the main experiment and 4 controls): version 14, 4-8 minutes a control and 10-15 a
# main run on 2 cores, 105 minutes in all.
PROBE_S, ORGANISM_S = 4 * 60, 115 * 60
BUDGET_S = 19 * 60 + PROBE_S + ORGANISM_S
# Seconds planned per script, adding up to the budget: 1.3-2x what each took on a quiet 2-core
# machine (2026-12-07, AMD EPYC: rollout 29, generate 49, extraction 37, consolidation 561 with the
# paper-shaped workload, teacher 120, round 30, weight_sync 19, kl_memory 21, checkpointing 83,
# gpu_check 13 on CPU, learner_memory 171): 18m54s in all, so the later scripts' shares run up to
# the budget.
PLAN_S = {"rollout": 90, "generate": 90, "extraction": 60, "consolidation": 780, "teacher": 180, "round": 90,
          "weight_sync": 60, "kl_memory": 50, "checkpointing": 130, "gpu_check": 50, "learner_memory": 240,
          "organism_probe": PROBE_S,
          "organism": ORGANISM_S}
UNPLANNED_S = 60  # a script not in PLAN_S
# Run by hand only (by name: `python -m benchmarks.run_all organism_draws`), their tables still shown:
# organism_draws builds the organism recipe again per draw, about 10 minutes each.
BY_HAND = ("organism_draws",)
README_MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def discover() -> list[str]:
    found = sorted(p.stem for p in HERE.glob("*.py")
                   if p.stem not in NOT_BENCHMARKS and "def main(" in p.read_text())
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def deadlines(names: list[str], start: float) -> list[float]:
    """When each script must have ended: the planned shares added up from `start`, capped at the budget."""
    ends, total = [], 0.0
    for name in names:
        total += PLAN_S.get(name, UNPLANNED_S)
        ends.append(start + min(total, BUDGET_S))
    return ends


def run(name: str, deadline: float) -> dict:
    """Run one benchmark with its output passed through, until `deadline` at the latest (a
    time.perf_counter() value); its runtime and how it ended."""
    print(f"\n=== benchmarks.{name} ===", flush=True)
    start = time.perf_counter()
    limit = deadline - start
    if limit < 10:
        return {"benchmark": name, "seconds": 0.0, "status": "skipped: the time budget was spent"}
    from oel_ray.rollout import WORKER_ENV  # torch's C++ log level, read when a script's torch loads

    try:
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent, timeout=limit,
                              env={**os.environ, **WORKER_ENV["env_vars"]}).returncode
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"stopped at its deadline after {limit:.0f} s"
    return {"benchmark": name, "seconds": round(time.perf_counter() - start, 1), "status": status}


def scalars(data: dict, prefix: str = "", depth: int = 2) -> list[tuple[str, object]]:
    """Flattened scalar fields, for a result that gave no tables of its own."""
    out = []
    for key, value in data.items():
        if key in ("benchmark", "machine", "measured_at", "tables_md"):
            continue
        if isinstance(value, dict) and depth > 0:
            out += scalars(value, f"{prefix}{key}.", depth - 1)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out.append((f"{prefix}{key}", value))
    return out


def with_extra_results(names: list[str], results: Path = RESULTS) -> list[str]:
    """`names`, each followed by its results saved under other names: `<script>-<workloads>.json`, a
    script run by hand on workloads outside `make bench` (benchmarks.consolidation's paper-large)."""
    return [n for name in names for n in [name, *sorted(p.stem for p in results.glob(f"{name}-*.json"))]]


def command(name: str, data: dict) -> str:
    """The command that wrote results file `name` (saved in it where it is not the script's own)."""
    return data.get("command") or f"python -m benchmarks.{name}"


def section(name: str, runtime: Optional[dict]) -> str:
    """`name`'s part of summary.md: how it ran in this run (None: not run in it) and its latest results."""
    path = RESULTS / f"{name}.json"
    ran = f"{runtime['status']}, {runtime['seconds']} s" if runtime else "not run in this run"
    data = json.loads(path.read_text()) if path.exists() else {}
    head = f"## {name}\n\n`{command(name, data)}`: {ran}"
    if not path.exists():
        return f"{head}; no results file."
    head += f"; results measured {data.get('measured_at', '?')} (benchmarks/results/{name}.json)"
    if data.get("tables_md"):
        body = "\n\n".join(f"**{title}**\n\n{table}" for title, table in data["tables_md"].items())
    else:
        body = markdown_table(["field", "value"], scalars(data))
    return f"{head}\n\n{body}"


def provenance() -> str:
    m = machine()
    return (f"Written by `python -m benchmarks.run_all` on {time.strftime('%Y-%m-%d %H:%M %Z')}: "
            f"{m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}. The table is this run's; below it, "
            "every script's latest results, whichever run wrote them (each says when); ratios compare systems "
            "measured in the same run on the same machine.")


def write_summary(runtimes: list[dict], wall_s: float) -> Path:
    ran = {r["benchmark"]: r for r in runtimes}
    names = with_extra_results(list(ran) + [n for n in discover() if n not in ran and (RESULTS / f"{n}.json").exists()])
    parts = [
        "# Benchmark summary",
        provenance(),
        markdown_table(["benchmark", "status", "seconds"], [[r["benchmark"], r["status"], r["seconds"]]
                                                             for r in runtimes] + [["total", "", round(wall_s, 1)]]),
        *[section(name, ran.get(name)) for name in names],
    ]
    path = RESULTS / "summary.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path


def readme_markers(name: str) -> tuple[str, str]:
    """Where `name`'s README tables go when README has a place of their own for them."""
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def readme_tables(name: str, results: Path = RESULTS) -> list[str]:
    """`name`'s README tables from its latest results file, headed by when and where it measured them."""
    path = results / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    titles = data.get("readme_tables") or []
    if not titles:
        return []
    m, when = data.get("machine", {}), data.get("measured_at", "?")
    when = f"{when[:16].replace('T', ' ')} UTC" if when.endswith("+0000") else when
    where = f"{m['cpu']}, " if m.get("cpu") else ""
    cpus, torch = m.get("cpu_count", "?"), m.get("torch", "?")
    head = f"`{command(name, data)}`, measured {when} ({where}{cpus} CPUs, torch {torch}):"
    return [head] + [f"**{title}**\n\n{data['tables_md'][title]}" for title in titles]


def update_readme(runtimes: list[dict], readme: Path = ROOT / "README.md", results: Path = RESULTS) -> bool:
    """Every script's README tables from its latest results file, whichever run wrote it (each table
    says when): between its own markers (`readme_markers`) where README has them, else between
    `README_MARKERS`, after a line for each script this run did not finish. False when README has no
    `README_MARKERS`."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        print(f"{readme}: no {start} ... {end} markers; README not updated")
        return False
    names = with_extra_results([n for n in discover() if (results / f"{n}.json").exists()], results)
    general = [f"Each script's tables from its latest results file (`benchmarks/results/<script>.json`, "
               "written by `python -m benchmarks.run_all` or the script alone); ratios inside a table compare "
               "systems measured in the same run on the same machine. All tables: `benchmarks/results/summary.md`."]
    general += [f"`benchmarks.{r['benchmark']}`: {r['status']} in the run of {time.strftime('%Y-%m-%d %H:%M %Z')}."
                for r in runtimes if r["status"] != "ok"]
    for name in names:
        own = readme_markers(name)
        if own[0] in text and own[1] in text:
            text = replace_between(text, own, "\n\n".join(readme_tables(name, results)))
        else:
            general += readme_tables(name, results)
    atomic_write_text(readme, replace_between(text, README_MARKERS, "\n\n".join(general)))
    return True


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    start, end = markers
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1)


def runtimes_record(runtimes: list[dict], wall_s: float, path: Path = RESULTS / "run_all.json") -> dict:
    """run_all.json: this run's scripts and seconds, and beside them each script's latest runtime
    from whichever run last ran it, so that running some scripts keeps the others' (the whole
    `make bench` time is their sum)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    latest = json.loads(path.read_text()).get("latest", {}) if path.exists() else {}
    latest.update({r["benchmark"]: {**r, "run_at": now} for r in runtimes})
    return {"runs": runtimes, "seconds": round(wall_s, 1), "run_at": now, "latest": latest,
            "latest_total_seconds": round(sum(r["seconds"] for r in latest.values()), 1)}


def main() -> None:
    names = sys.argv[1:] or [name for name in discover() if name not in BY_HAND]
    start = time.perf_counter()
    runtimes = [run(name, deadline) for name, deadline in zip(names, deadlines(names, start))]
    wall = time.perf_counter() - start
    atomic_write_text(RESULTS / "run_all.json", json.dumps(runtimes_record(runtimes, wall), indent=2))
    path = write_summary(runtimes, wall)
    update_readme(runtimes)
    print("\n" + markdown_table(["benchmark", "status", "seconds"],
                                [[r["benchmark"], r["status"], r["seconds"]] for r in runtimes]))
    print(f"total {wall:.0f} s; summary: {path}")
    sys.exit(0 if all(r["status"] == "ok" for r in runtimes) else 1)


if __name__ == "__main__":
    main()
