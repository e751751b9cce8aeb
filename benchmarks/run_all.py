"""Run every benchmark in sequence, then write benchmarks/results/summary.md from their results.

    python -m benchmarks.run_all [name ...]

Each benchmark runs in its own process (a fresh Ray, fresh engines, no memory carried over), under
a time limit so one stuck script cannot eat the whole `make bench` budget (15 minutes on 2 cores).
The known ones run first, in `ORDER`; any other script in benchmarks/ with a `main()` runs after
them. summary.md holds only what the scripts saved: their own tables where they give them
(`common.save(..., tables=...)`), else their scalar results, plus each script's runtime and status.
Exits non-zero when any benchmark failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from oel_ray.artifacts import atomic_write_text

from benchmarks.common import RESULTS, machine, markdown_table

HERE = Path(__file__).resolve().parent
ORDER = ("rollout", "extraction", "consolidation", "weight_sync", "kl_memory")
NOT_BENCHMARKS = {"__init__", "common", "run_all"}
TIME_LIMIT_S = 600


def discover() -> list[str]:
    found = sorted(p.stem for p in HERE.glob("*.py")
                   if p.stem not in NOT_BENCHMARKS and "def main(" in p.read_text())
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def run(name: str) -> dict:
    """Run one benchmark with its output passed through; its runtime and how it ended."""
    print(f"\n=== benchmarks.{name} ===", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent,
                              timeout=TIME_LIMIT_S).returncode
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {TIME_LIMIT_S} s"
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


def section(name: str, runtime: dict) -> str:
    path = RESULTS / f"{name}.json"
    head = f"## {name}\n\n`python -m benchmarks.{name}`: {runtime['status']}, {runtime['seconds']} s"
    if not path.exists():
        return f"{head}; no results file."
    data = json.loads(path.read_text())
    head += f"; results measured {data.get('measured_at', '?')} (benchmarks/results/{name}.json)"
    if data.get("tables_md"):
        body = "\n\n".join(f"**{title}**\n\n{table}" for title, table in data["tables_md"].items())
    else:
        body = markdown_table(["field", "value"], scalars(data))
    return f"{head}\n\n{body}"


def write_summary(runtimes: list[dict], wall_s: float) -> Path:
    m = machine()
    parts = [
        "# Benchmark summary",
        f"Written by `python -m benchmarks.run_all` on {time.strftime('%Y-%m-%d %H:%M %Z')}: "
        f"{m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}. Every figure below comes from the "
        "results files of this run's scripts; ratios compare systems measured in the same run on the same machine.",
        markdown_table(["benchmark", "status", "seconds"], [[r["benchmark"], r["status"], r["seconds"]]
                                                             for r in runtimes] + [["total", "", round(wall_s, 1)]]),
        *[section(r["benchmark"], r) for r in runtimes],
    ]
    path = RESULTS / "summary.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path


def main() -> None:
    names = sys.argv[1:] or discover()
    start = time.perf_counter()
    runtimes = [run(name) for name in names]
    wall = time.perf_counter() - start
    atomic_write_text(RESULTS / "run_all.json", json.dumps({"runs": runtimes, "seconds": round(wall, 1)}, indent=2))
    path = write_summary(runtimes, wall)
    print("\n" + markdown_table(["benchmark", "status", "seconds"],
                                [[r["benchmark"], r["status"], r["seconds"]] for r in runtimes]))
    print(f"total {wall:.0f} s; summary: {path}")
    sys.exit(0 if all(r["status"] == "ok" for r in runtimes) else 1)


if __name__ == "__main__":
    main()
