"""What one build of the model organism does with each lesson set in its prompt, beside the script it
was trained to imitate: in minutes, where benchmarks/organism.py's learning runs take a hundred.

    python -m benchmarks.organism_probe [--samples 2]

Every held-out map is played `--samples` times through a rollout worker (vLLM, the evaluation's
sampling and seeds, every set in one call: evaluate.play_with_knowledge, as the in-context curve)
with each fixed set of lessons as the knowledge, placed where the teacher reads it: none, the
brackets and the wall, then the holes, all four, the false "up or left first", and another game's.
Per set: pass rate [95% CI], the share of games ending invalid and reply tokens per turn, and the
scripted player's pass rate on the same maps (what the warm start teaches); and the first turns'
choices (no brackets, the wall note, the false note, a backward move, a step into a hole) beside the
script's on the same boards. The in-context gain the loop can consolidate is this build's "all four"
over "none"; a build on another CPU (embedded.fingerprint) or another version is screened here
before its learning runs. Prints a table and saves benchmarks/results/organism_probe.json.
"""

from __future__ import annotations

import argparse
import random

from benchmarks.common import load_config, markdown_table, quiet_libraries, save, start_ray, stop_ray, stopwatch
from benchmarks.organism import MAPS, RUNS

SETS = {  # label -> lesson keys (oel_ray/organism.py), in the order play reveals them
    "none": (),
    "brackets, wall": ("format", "edge"),
    "brackets, wall, holes": ("format", "edge", "hole"),
    "all four": ("format", "edge", "hole", "win"),
    "false: up or left first": ("upleft",),
    "another game's (Sokoban)": ("sokoban_push", "sokoban_corner", "sokoban_wall"),
}


def script_pass_rate(cfg, keys: tuple, specs: list, seed: int) -> float:
    """The scripted player's pass rate on `specs` knowing `keys` (oel_ray/organism.py's play)."""
    from oel_ray import organism

    rng = random.Random(seed)
    return sum(organism.play_game(spec, cfg.env.max_turns, set(keys), rng)[0].passed for spec in specs) / len(specs)


def first_turns(specs: list, replies: list[str], keys: tuple, max_turns: int, seed: int) -> dict[str, dict]:
    """Per choice (organism.choices), its share of the first-turn `replies` on `specs`' boards, and of
    the scripted player's replies knowing `keys` on the same boards: where a build follows a lesson
    less than the script does, seen before the game compounds it."""
    from oel_ray import organism
    from oel_ray.games import Game

    rng = random.Random(seed)
    model, script = [], []
    for spec, reply in zip(specs, replies):
        grid, pos = organism.lake(Game(spec, max_turns))
        model.append(organism.choices(grid, pos, reply))
        script.append(organism.choices(grid, pos, organism.play_reply(grid, pos, set(keys), rng)))
    return {who: {choice: sum(c[choice] for c in made) / len(made) for choice in made[0]}
            for who, made in (("model", model), ("script", script))}


def main(argv=None) -> None:
    from oel_ray import organism
    from oel_ray.embedded import build_model, fingerprint
    from oel_ray.evaluate import play_with_knowledge, summarize
    from oel_ray.games import eval_specs
    from oel_ray.roles import rollout_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out map per lesson set")
    args = parser.parse_args(argv)
    cfg = load_config(f"+experiment={RUNS['main']}", f"env.eval_maps={MAPS}", f"env.eval_samples={args.samples}")
    build = fingerprint(build_model(cfg.model.path, organism.RECIPE.name))
    specs = eval_specs(cfg.env) * args.samples  # sample-major, as `evaluate` plays them
    texts = {label: organism.knowledge_text(keys) for label, keys in SETS.items()}
    start_ray()
    try:
        workers = rollout_group(cfg)
        with stopwatch() as t:
            played = play_with_knowledge(workers, cfg, list(texts.values()), 0)
        workers.shutdown()
    finally:
        stop_ray()
    rows, first_rows, sets = [], [], {}
    for label, keys in SETS.items():
        games = played[texts[label]]
        report = summarize(games, 0, args.samples)
        script = script_pass_rate(cfg, keys, specs, cfg.seed)
        first = first_turns(specs, [game.turns[0].response for game in games], keys, cfg.env.max_turns, cfg.seed)
        sets[label] = {"lessons": list(keys), "pass_rate": report.pass_rate, "ci": [report.ci_low, report.ci_high],
                       "invalid_rate": report.invalid_rate, "tokens_per_turn": report.response_tokens_per_turn,
                       "script_pass_rate": script, "first_turn": first}
        rows.append([label, f"{report.pass_rate:.3f} [{report.ci_low:.3f}, {report.ci_high:.3f}]",
                     f"{report.invalid_rate:.3f}", f"{report.response_tokens_per_turn:.1f}", f"{script:.3f}"])
        first_rows.append([label] + [f"{first['model'][c]:.2f} ({first['script'][c]:.2f})" for c in first["model"]])
    title = (f"Organism version {organism.RECIPE.version}, build {build}: held-out pass rate with each lesson set "
             f"in context ({MAPS} maps x {args.samples})")
    choices_title = f"Build {build}, the same games' first turns: share of replies making each choice (the script's)"
    tables = {title: markdown_table(["lessons in context", "pass rate [95% CI]", "ended invalid", "tokens/turn",
                                     "the script"], rows),
              choices_title: markdown_table(["lessons in context", *sets["none"]["first_turn"]["model"]], first_rows)}
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
    save("organism_probe", {"organism_version": organism.RECIPE.version, "organism_build": build,
                            "samples": args.samples, "maps": MAPS, "play_seconds": round(t["s"], 1), "sets": sets},
         tables=tables, readme=list(tables))


if __name__ == "__main__":
    quiet_libraries()
    main()
