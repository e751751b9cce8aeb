"""Bad input is refused before any expensive work, with one line naming the field or file and the
fix, exit code 2 and no traceback; files an earlier run wrote are left exactly as they were.

Each case runs the real entry point (`python -m oel_ray.main`) on a run directory that already
holds an earlier run's files."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from oel_ray.games import Game
from oel_ray.types import GameSpec

CONFIG = [  # (overrides, the message's start after "oel_ray: config error: ")
    (["learner.lrr=1"], "learner.lrr: no such field; did you mean learner.lr?"),
    (["lerner.lr=1"], "lerner.lr: no such field; did you mean learner?"),
    (["learner.lr=abc"], "learner.lr: 'abc' is not a valid float"),
    (["env.id=Sokoban-v9"], "env.id: 'Sokoban-v9' is not one of FrozenLake-v0"),
    (["model.build=null", "model.path=/no/such/model"], "model.path: '/no/such/model' does not exist"),
    (["learner.zero_stage=5"], "learner.zero_stage: 5 is not one of 0, 1, 2, 3"),
    (["extractor.k=100"], "extractor.k: 100 trajectories per chain but rollout.games_per_round is"),
    (["rollout.temperature=-1"], "rollout.temperature: -1.0 must be > 0"),
    (["learner.steps=0"], "learner.steps: 0 must be > 0"),
    (["rounds=0"], "rounds: 0 must be > 0"),
    (["env.eval_maps=0"], "env.eval_maps: 0 must be > 0"),
    (["rollout.games_per_round=0"], "rollout.games_per_round: 0 must be > 0"),
    (["extractor.num_chains=0"], "extractor.num_chains: 0 must be > 0"),
    (["extractor.use_step=99"], "extractor.use_step: 99 must be in 1..extractor.k"),
    (["extractor.format=xml"], "extractor.format: 'xml' is not one of structured, unstructured"),
    (["teacher.knowledge_position=middle"], "teacher.knowledge_position: 'middle' is not one of user, system"),
    (["learner.loss=forward"], "learner.loss: 'forward' is not one of topk_reverse_kl"),
    (["learner.aggregation=median"], "learner.aggregation: 'median' is not one of token_mean"),
    (["extractor.model=http://127.0.0.1:1/v1"], "extractor.endpoint_model: name the model served"),
    (["extractor.model=/no/such/extractor"], "model.path: '/no/such/extractor' does not exist"),
    (["tracking.wandb=true"], "tracking.wandb: true needs the wandb package"),
    (["env.max_turns=0"], "env.max_turns: 0 must be in 1..100"),
    (["cluster.cpus_per_actor=0"], "cluster.cpus_per_actor: 0.0 must be > 0"),
    (["+experiment=nope"], "experiment: 'nope' is not one of frozenlake_1p7b"),
    (["env=nope"], "env: 'nope' is not one of frozenlake"),
    (["learner.weight_sync=nccl"], "learner.weight_sync: nccl needs GPUs"),
    (["learner.num_ranks=0"], "learner.num_ranks: 0 must be > 0"),
    (["model.dtype=int8"], "model.dtype: 'int8' is not one of float32"),
    (["rollout.top_p=2"], "rollout.top_p: 2.0 must be in (0, 1]"),
    (["env.kwargs.bogus=1"], "Could not override 'env.kwargs.bogus'. To append to your config use +env.kwargs.bogus=1"),
    (["learner.batch_size=7", "learner.grad_accum=2"], "learner.batch_size: 7 must be divisible by learner.grad_accum x learner.num_ranks"),
    # found with the tokenizer and a real game, still before Ray
    (["model.max_model_len=64"], "extractor.max_response_tokens: 64 must be below model.max_model_len (64)"),
    (["model.max_model_len=96"], "model.max_model_len: 96 is too small: the teacher's longest prompt"),
    (["extractor.max_knowledge_tokens=100000"], "model.max_model_len: 4096 is too small"),
    (["env.kwargs.dim_room=[2,2]"], "env.kwargs: Sokoban-v0 refused {'dim_room': [2, 2], 'num_boxes': 1} (ValueError"),
    # lm-eval (with its IF-Eval data, offline) is not on this machine: said at start, not after round 0
    (["ood.ifeval=lm_eval"], "ood.ifeval: lm_eval cannot run here: "),
    (["ood.ifeval=/no/such/ifeval.jsonl"], "ood.ifeval: '/no/such/ifeval.jsonl' is not a file; give fixture, lm_eval"),
]


def run_main(tiny_model, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oel_ray.main", f"model.path={tiny_model}", f"hydra.run.dir={out}",
                           *overrides], capture_output=True, text=True, timeout=300)


def snapshot(out: Path, skip: tuple = ()) -> dict[str, str]:
    """Every file of the run directory but Hydra's own record of the latest command (and `skip`)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and str(p.relative_to(out)) not in skip}


def assert_refused(proc, out: Path, before: dict, kind: str, message: str, skip: tuple = ()) -> None:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"oel_ray: {kind} error: ") and message in last, last
    after = snapshot(out, skip)
    assert {k: after.get(k) for k in before} == before, "files written before the error changed"
    assert set(after) - set(before) <= {"oel.log"}, "only the run's log may be added"


@pytest.fixture
def earlier_run(tmp_path):
    """A run directory with an earlier run's result in it."""
    out = tmp_path / "run"
    (out / "round_0").mkdir(parents=True)
    (out / "round_0" / "eval.json").write_text(json.dumps({"round": 0, "pass_rate": 0.25}))
    return out


@pytest.mark.parametrize("overrides,message", CONFIG, ids=[" ".join(c[0]) for c in CONFIG])
def test_bad_config(overrides, message, tiny_model, earlier_run):
    before = snapshot(earlier_run)
    proc = run_main(tiny_model, earlier_run, *overrides)
    assert_refused(proc, earlier_run, before, "config", message)
    assert "ray" not in proc.stdout.lower()  # nothing started


# ----------------------------------------------------------------------------- files on disk

SMALL = ["rollout.games_per_round=2", "extractor.k=2", "tracking.progress_bars=false"]


def played(seed: int) -> dict:
    game = Game(GameSpec("Sokoban-v0", seed, "train", {"dim_room": (6, 6), "num_boxes": 1}), 2)
    game.step("[up]", 1)
    game.step("[left]", 1)
    return game.trajectory(1, 0).to_json()


def resumable(out: Path, tiny_model, finished: list[str], **config_changes) -> None:
    """A manifest as the run would have written it, with `finished` stages done."""
    from oel_ray import config
    from oel_ray.driver import config_snapshot
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    config.register()
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=[f"model.path={tiny_model}", f"output_dir={out}", *SMALL])
    snap = config_snapshot(OmegaConf.to_object(raw))
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        snap[section][key] = value
    stages = {name: {"attempts": 1, "started": 1.0, "finished": 2.0} for name in finished}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"version": 1, "config": snap, "stages": stages}))


def rows(*items) -> str:
    return "".join((json.dumps(i) if isinstance(i, dict) else i) + "\n" for i in items)


FILES = [  # (stages finished, {file: content}, manifest config changes, kind, message)
    ([], {"manifest.json": "{not json"}, None, "input", "manifest.json: not valid JSON"),
    (["round_0/evaluate"], {}, {"learner__steps": 5}, "config", "learner.steps: is 6 but the run in"),
    (["round_0/evaluate", "round_1/collect"], {"round_1/trajectories.jsonl": rows(played(1), "{\"env_id\": 3")},
     {}, "input", "trajectories.jsonl:2: not a trajectory row"),
    (["round_0/evaluate", "round_1/collect"], {"round_1/trajectories.jsonl": rows(played(1))}, {}, "input",
     "trajectories.jsonl: 1 games but extractor.k is 2"),
    (["round_0/evaluate", "round_1/collect", "round_1/extract", "round_1/deploy"],
     {"round_1/deploy.jsonl": rows(played(1), played(2)), "round_1/knowledge.json": json.dumps({"set": ["", " "]})},
     {}, "input", "knowledge.json: the knowledge set is empty"),
    (["round_0/evaluate", "round_1/collect", "round_1/extract", "round_1/deploy"],
     {"round_1/deploy.jsonl": rows(played(1), played(2)), "round_1/knowledge.json": "[1, 2"},
     {}, "input", "knowledge.json: not a knowledge file (JSONDecodeError"),
]


@pytest.mark.parametrize("finished,files,changes,kind,message", FILES, ids=[f[-1][:40] for f in FILES])
def test_bad_files(finished, files, changes, kind, message, tiny_model, earlier_run):
    if changes is not None:
        resumable(earlier_run, tiny_model, finished, **changes)
    for name, text in files.items():
        (earlier_run / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier_run / name).write_text(text)
    # a valid manifest counts the refused attempt; nothing else may change
    skip = ("manifest.json",) if changes is not None else ()
    before = snapshot(earlier_run, skip)
    proc = run_main(tiny_model, earlier_run, *SMALL)
    assert_refused(proc, earlier_run, before, kind, message, skip)
    assert not list(earlier_run.rglob("*.partial")) and not list(earlier_run.rglob("*.tmp"))
