"""The model organism's loop, measured: does this implementation turn its own experience into better
play, and do the controls stay flat?

    python -m benchmarks.organism [--seeds 0 1 2] [--samples 2] [--runs main empty ...] [--out DIR]

Runs `python -m oel_ray.main +experiment=<run>` for the main organism experiment and each control
(conf/experiment/organism*.yaml), once per seed, into a temporary directory, and reads what the runs
wrote themselves: round_r/eval.json (held-out pass rate with its Wilson interval) and, for the main
run, round_1/knowledge_eval.json (the in-context curve). Every map of the held-out set is played
`--samples` times per evaluation. The controls skip the in-context curve (they are compared on the
rounds). Prints one table and saves benchmarks/results/organism.json with a true/false verdict per
acceptance line of issue 15, and benchmarks/results/organism.png. Runs of other seeds or controls
already in that file are kept when they were measured on the same organism (its recipe's version) with
the same samples and the same consolidation settings (SETTINGS), so seeds can be added one invocation at a time; `--out` keeps the run directories.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, load_config, markdown_table, quiet_libraries, save, stopwatch

RUNS = {"main": "organism", "empty": "organism_empty_knowledge", "shuffled": "organism_shuffled_knowledge",
        "raw": "organism_raw_trajectories", "off_policy": "organism_off_policy"}
# The in-context curve at step 0 and the knowledge step only (each further step plays every map once
# per chain: 8 x 256 games), with every chain (the experiment, sized for `make run`, plays 2 of the 8);
# the controls are judged on their rounds and skip it.
MAIN_OVERRIDES = ("extractor.eval_steps=[0,8]", "extractor.eval_chains=null")
CONTROL_OVERRIDES = ("extractor.eval_steps=[]",)
# What a run's figures depend on besides the organism (its recipe's version) and the samples: a saved
# run measured under other values is measured again, never mixed in.
SETTINGS = ("learner.lr", "learner.steps", "learner.batch_size", "rounds")
MAPS = 128  # every held-out map of conf/env/organism.yaml (the experiment plays 64, sized for `make run`)
CONSOLIDATION_SLACK = 0.05  # the student after round 1 within 5 points of the in-context rate


def command(run: str, seed: int, samples: int, out: Path) -> list[str]:
    extra = MAIN_OVERRIDES if run == "main" else CONTROL_OVERRIDES
    return [sys.executable, "-m", "oel_ray.main", f"+experiment={RUNS[run]}", f"seed={seed}",
            f"env.eval_maps={MAPS}", f"env.eval_samples={samples}", f"hydra.run.dir={out}",
            "tracking.progress_bars=false", *extra]


def run_once(run: str, seed: int, samples: int, out: Path) -> dict:
    """One run, then its figures (`collect`)."""
    cmd = command(run, seed, samples, out)
    with stopwatch() as t:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return collect(run, seed, out, t["s"])


def collect(run: str, seed: int, out: Path, seconds: float) -> dict:
    """A finished run's rounds (eval.json of each) and, for the main run, round 1's in-context curve.
    Also for a run started by hand with `command`'s arguments (`--collect`)."""
    rounds = []
    for path in sorted(out.glob("round_*/eval.json"), key=lambda p: int(p.parent.name.split("_")[1])):
        e = json.loads(path.read_text())
        rounds.append({"round": e["round"], "pass_rate": e["pass_rate"], "ci": [e["ci_low"], e["ci_high"]],
                       "games": e["games"], "tokens_per_turn": e["response_tokens_per_turn"],
                       "ifeval_strict": (e.get("ifeval") or {}).get("strict_prompt_accuracy"),
                       "ifeval_prompts": (e.get("ifeval") or {}).get("prompts")})
    from omegaconf import OmegaConf

    ran = OmegaConf.load(out / ".hydra" / "config.yaml")
    result = {"run": run, "seed": seed, "seconds": round(seconds, 1), "rounds": rounds,
              "settings": {key: OmegaConf.select(ran, key) for key in SETTINGS}}
    curve = out / "round_1" / "knowledge_eval.json"
    if curve.exists():
        k = json.loads(curve.read_text())
        result["in_context"] = {"use_step": k["use_step"], "steps": [
            {"step": s["step"], "pass_rate": s["pass_rate"], "ci": [s["ci_low"], s["ci_high"]],
             "tokens_per_turn": s["response_tokens_per_turn"]} for s in k["steps"]]}
    return result


def _above(a: list[float], b: list[float]) -> bool:
    """Interval `a` lies wholly above interval `b`."""
    return a[0] > b[1]


def verdicts(results: list[dict]) -> dict:
    """Issue 15's acceptance lines, each true/false with the figures it was judged on."""
    by = {}
    for r in results:
        by.setdefault(r["run"], []).append(r)
    out = {}
    main = by.get("main", [])
    if main:
        used = [next(s for s in r["in_context"]["steps"] if s["step"] == r["in_context"]["use_step"]) for r in main]
        step0 = [next(s for s in r["in_context"]["steps"] if s["step"] == 0) for r in main]
        out["in_context_above_step_0"] = {"holds": all(_above(u["ci"], z["ci"]) for u, z in zip(used, step0)),
                                          "step_0": [z["pass_rate"] for z in step0],
                                          "knowledge_step": [u["pass_rate"] for u in used]}
        after = [r["rounds"][1]["pass_rate"] for r in main]
        out["consolidation_reaches_in_context"] = {
            "holds": all(a >= u["pass_rate"] - CONSOLIDATION_SLACK for a, u in zip(after, used)),
            "round_1": after, "in_context": [u["pass_rate"] for u in used], "slack": CONSOLIDATION_SLACK}
        n = min(len(r["rounds"]) for r in main)
        means = [sum(r["rounds"][i]["pass_rate"] for r in main) / len(main) for i in range(n)]
        out["rounds_mean_never_falls_and_rises_1_to_2"] = {
            "holds": all(b >= a for a, b in zip(means, means[1:])) and n > 2 and means[2] > means[1], "means": means}
        out["last_round_above_round_0_each_seed"] = {
            "holds": all(_above(r["rounds"][-1]["ci"], r["rounds"][0]["ci"]) for r in main),
            "per_seed": [[r["rounds"][0]["ci"], r["rounds"][-1]["ci"]] for r in main]}
    if "empty" in by:
        out["empty_knowledge_stays_in_round_0_interval"] = {
            "holds": all(r["rounds"][0]["ci"][0] <= r["rounds"][-1]["pass_rate"] <= r["rounds"][0]["ci"][1]
                         for r in by["empty"]),
            "per_seed": [[r["rounds"][0]["ci"], r["rounds"][-1]["pass_rate"]] for r in by["empty"]]}
    if "shuffled" in by:
        out["mismatched_knowledge_no_separated_gain"] = {
            # "No separated gain" in any round: a gain that fades by the last round is still a gain.
            "holds": not any(_above(x["ci"], r["rounds"][0]["ci"]) for r in by["shuffled"] for x in r["rounds"][1:]),
            "per_seed": [[x["pass_rate"] for x in r["rounds"]] for r in by["shuffled"]]}
    def on_seeds_of(control: str) -> list[dict]:  # the main runs of the seeds the control ran: like for like
        seeds = {r["seed"] for r in by[control]}
        return [r for r in main if r["seed"] in seeds]

    last = lambda rs: sum(r["rounds"][-1]["pass_rate"] for r in rs) / len(rs)  # noqa: E731
    if "raw" in by and on_seeds_of("raw"):
        raw, knowledge = last(by["raw"]), last(on_seeds_of("raw"))
        out["raw_trajectories_below_knowledge"] = {"holds": raw < knowledge, "raw": raw, "knowledge": knowledge}
    if "off_policy" in by and on_seeds_of("off_policy"):
        def drop(rs):
            scores = [(r["rounds"][0]["ifeval_strict"], r["rounds"][-1]["ifeval_strict"]) for r in rs]
            return sum(a - b for a, b in scores) / len(scores) if all(None not in s for s in scores) else None
        on, off = drop(on_seeds_of("off_policy")), drop(by["off_policy"])
        # One prompt of the fixture either way is noise: "falls more" asks for more than that.
        prompts = max((x.get("ifeval_prompts") or 0 for r in by["off_policy"] for x in r["rounds"]), default=0)
        holds = None not in (on, off) and prompts > 0 and off > 0 and off - on > 1 / prompts
        out["off_policy_forgets_more"] = {"holds": holds, "ifeval_drop_on_policy": on, "ifeval_drop_off_policy": off,
                                          "ifeval_prompts": prompts}
        if not holds:
            measured = ("" if None in (on, off) or not prompts else
                        f": off-policy fell by {off * prompts:+.1f} prompts on average, on-policy by "
                        f"{on * prompts:+.1f}, and more means by more than one prompt")
            out["off_policy_forgets_more"]["why_not"] = (
                f"IF-Eval (the team's {prompts}-prompt fixture) is the organism's only out-of-distribution score, and "
                "its warm start never trained on it, so its score sits near the floor and moves by single prompts"
                + measured)
    return out


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        ic = r.get("in_context")
        used = next((s for s in ic["steps"] if s["step"] == ic["use_step"]), None) if ic else None
        rows.append([r["run"], r["seed"], *(f"{x['pass_rate']:.3f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"
                                            for x in r["rounds"]),
                     f"{used['pass_rate']:.3f}" if used else "-", r["seconds"]])
    width = max(len(r["rounds"]) for r in results)
    return markdown_table(["run", "seed", *(f"round {i}" for i in range(width)), "in context (round 1)", "s"], rows)


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in RUNS:
        rs = [r for r in results if r["run"] == run]
        if not rs:
            continue
        n = min(len(r["rounds"]) for r in rs)
        mean = [sum(r["rounds"][i]["pass_rate"] for r in rs) / len(rs) for i in range(n)]
        low = [min(r["rounds"][i]["pass_rate"] for r in rs) for i in range(n)]
        high = [max(r["rounds"][i]["pass_rate"] for r in rs) for i in range(n)]
        line, = ax.plot(range(n), mean, marker="o", label=RUNS[run])
        ax.fill_between(range(n), low, high, color=line.get_color(), alpha=0.15)
    ax.set_xticks(range(max(len(r["rounds"]) for r in results)))
    ax.set(xlabel="round", ylabel="held-out pass rate (mean over seeds, band: min-max)",
           title="The model organism: OEL and its controls")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def saved_results(args) -> dict:
    """benchmarks/results/organism.json when it was measured on this organism (its recipe's version and
    this machine's build of it, embedded.fingerprint) with these samples; else nothing (its figures
    are not comparable)."""
    try:
        saved = json.loads((RESULTS / "organism.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    same = (saved.get("organism_version"), saved.get("organism_build"), saved.get("samples"))
    return saved if same == (args.version, args.build, args.samples) else {}


def earlier_runs(args) -> list[dict]:
    """The saved runs this invocation does not repeat, when measured on this organism with these
    samples and their experiment's SETTINGS as they are now (anything else is dropped: its figures
    are not comparable)."""
    saved = saved_results(args)
    redo = {(run, seed) for run in args.runs for seed in args.seeds}
    return [r for r in saved.get("runs", []) if (r["run"], r["seed"]) not in redo
            and r.get("settings") == settings(r["run"])]


@lru_cache(maxsize=None)
def settings(run: str) -> dict:
    """SETTINGS as `run`'s experiment sets them now."""
    cfg = load_config(f"+experiment={RUNS[run]}")
    values = {}
    for key in SETTINGS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = value
    return values


def main(argv=None) -> None:
    from oel_ray.embedded import build_model, fingerprint
    from oel_ray.organism import RECIPE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out map per evaluation")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--collect", nargs=4, metavar=("RUN", "SEED", "DIR", "SECONDS"),
                        help="record a run made by hand with this benchmark's command line, instead of running")
    args = parser.parse_args(argv)
    args.version = RECIPE.version
    # The runs would build it first; built here, its fingerprint names what every figure measured.
    args.build = fingerprint(build_model(load_config(f"+experiment={RUNS['main']}").model.path, RECIPE.name))
    if args.collect:
        run, seed, out, seconds = args.collect
        if run not in RUNS:
            parser.error(f"--collect RUN: {run!r} is not one of {', '.join(RUNS)}")
        if not any(Path(out).glob("round_*/eval.json")):
            parser.error(f"--collect DIR: {out} holds no round_*/eval.json; give the hydra.run.dir of a finished run")
        args.runs, args.seeds = [run], [int(seed)]  # so earlier_runs drops what this replaces
        report(earlier_runs(args) + [collect(run, int(seed), Path(out), float(seconds))], args, final=True)
        return
    results = earlier_runs(args)
    with tempfile.TemporaryDirectory(prefix="oel_bench_organism.") as tmp:
        for seed in args.seeds:
            for run in args.runs:
                results.append(run_once(run, seed, args.samples, (args.out or Path(tmp)) / f"{run}_{seed}"))
                print(f"{run} seed {seed}: " + ", ".join(f"{x['pass_rate']:.3f}" for x in results[-1]["rounds"])
                      + f" ({results[-1]['seconds']} s)", flush=True)
                report(results, args, final=False)  # what finished so far survives a stopped benchmark
    report(results, args, final=True)


def report(results: list[dict], args, final: bool) -> None:
    judged = verdicts(results)
    figure(results, RESULTS / "organism.png")
    title = "The model organism: held-out pass rate per round [95% CI], per run and seed"
    tables = {title: table(results),
              "Verdicts (issue 15's acceptance lines)": markdown_table(
                  ["line", "holds"], [[k, v["holds"]] for k, v in judged.items()])}
    if final:
        print("\n\n".join(f"{t}\n{body}" for t, body in tables.items()))
    results = sorted(results, key=lambda r: (r["seed"], list(RUNS).index(r["run"])))
    save("organism", {"organism_version": args.version, "organism_build": args.build,
                      "seeds": sorted({r["seed"] for r in results}), "samples": args.samples, "runs": results,
                      "verdicts": judged, "figure": "benchmarks/results/organism.png"}, tables=tables, readme=list(tables))


if __name__ == "__main__":
    quiet_libraries()
    main()
