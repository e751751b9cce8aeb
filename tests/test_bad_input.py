"""Bad input is refused before any expensive work, with one line naming the field or file and the
fix, exit code 2 and no traceback; files an earlier run wrote are left exactly as they were.

Each case runs the real entry point on a run directory that already holds an earlier run's files:
`python -m oel_ray.main`'s own code path (runpy, as `-m` runs it) inside this process, which spares
each case an interpreter's start and imports (about 2 minutes of the suite);
`test_refused_the_same_way_by_a_fresh_interpreter` holds that a separate process refuses alike."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from entry_point import main_in_process, main_in_subprocess

from oel_ray.games import Game
from oel_ray.types import GameSpec, KnowledgeRecord, KnowledgeSnapshot

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
    (["learner.tail=true", "learner.renormalize=true"], "learner.tail: true keeps the mass outside the support"),
    (["learner.support=merged", "learner.loss=k3"], "learner.support: merged joins the teacher's top-k"),
    (["learner.support=merged", "consolidation.mode=off_policy"], "learner.support: merged joins the teacher's top-k"),
    (["extractor.select=best", "teacher.context=shuffled"], "extractor.select: best picks among this run's"),
    (["extractor.select=best", "extractor.eval_steps=[0]"], "extractor.select: best picks by the in-context pass rate"),
    (["learner.loss=seqkd"], "learner.loss: seqkd does not apply to consolidation.mode=on_policy: use one of"),
    (["consolidation.mode=off_policy", "learner.loss=full_reverse_kl"],
     "learner.loss: full_reverse_kl does not apply to consolidation.mode=off_policy: use one of topk_reverse_kl, k1"),
    (["extractor.model=http://127.0.0.1:1/v1"], "extractor.endpoint_model: name the model served"),
    (["extractor.model=/no/such/extractor"], "extractor.model: '/no/such/extractor' does not exist"),
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
    # the controls: another run's knowledge is read at start, not when round 1 extracts
    (["teacher.context=empty"], "teacher.context: 'empty' is not one of knowledge, trajectories, none, shuffled"),
    (["teacher.knowledge_from=/no/such/run"],
     "teacher.knowledge_from: /no/such/run/round_1/knowledge.json is not a knowledge file (FileNotFoundError"),
    (["teacher.context=none", "teacher.knowledge_from=/no/such/run"],
     "teacher.knowledge_from: only with teacher.context=knowledge or shuffled"),
    # non-finite numbers parse as floats and pass every "> 0"
    (["learner.lr=nan"], "learner.lr: nan is not a finite number"),
    (["rollout.temperature=inf"], "rollout.temperature: inf is not a finite number"),  # not learner.temperature
    (["cluster.timeout_s=-inf"], "cluster.timeout_s: -inf is not a finite number"),
    (["rollout.kv_cache_gib=nan"], "rollout.kv_cache_gib: nan is not a finite number"),
    (["learner.betas=[0.9,nan]"], "learner.betas: [0.9, nan] is not a finite number"),
    # beyond the model's own limits (its config.json: vocab_size 512, max_position_embeddings 8192)
    (["learner.support_k=1000"], "learner.support_k: 1000 is above the model's vocabulary (512 tokens"),
    (["model.max_model_len=10000"], "model.max_model_len: 10000 is beyond the model's context (8192 positions"),
    (["ood.max_tokens=5000"], "ood.max_tokens: 5000 must be in 1..model.max_model_len - 1 (4095)"),
    (["learner.freeze=[model.layer.0.*]"], "learner.freeze: 'model.layer.0.*' matches no parameter of"),
    (["learner.freeze=[*]"], "learner.freeze: ['*'] matches every parameter; nothing would train"),
]


def run_main(tiny_model, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m oel_ray.main model.path=... hydra.run.dir=out *overrides`, run in this process."""
    return main_in_process([f"model.path={tiny_model}", f"hydra.run.dir={out}", *overrides])


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
    (out / "manifest.json").write_text(json.dumps({"version": 1, "config": {}, "stages": {"round_0/evaluate": {
        "attempts": 1, "started": 1.0, "finished": 2.0, "outputs": ["round_0/eval.json"]}}}))
    return out


@pytest.mark.parametrize("overrides,message", CONFIG, ids=[" ".join(c[0]) for c in CONFIG])
def test_bad_config(overrides, message, tiny_model, earlier_run):
    before = snapshot(earlier_run)
    proc = run_main(tiny_model, earlier_run, *overrides)
    assert_refused(proc, earlier_run, before, "config", message)
    assert "ray" not in proc.stdout.lower()  # nothing started


# one refused before Hydra composes, one by the preflight (the tokenizer and a game loaded)
FRESH = [case for case in CONFIG if case[0] in (["learner.lrr=1"], ["model.max_model_len=96"])]


@pytest.mark.parametrize("overrides,message", FRESH, ids=[" ".join(c[0]) for c in FRESH])
def test_refused_the_same_way_by_a_fresh_interpreter(overrides, message, tiny_model, earlier_run):
    """The real command in a process of its own: the same one line, exit code 2, no traceback, and no
    warning on the way."""
    assert len(FRESH) == 2
    before = snapshot(earlier_run)
    proc = main_in_subprocess([f"model.path={tiny_model}", f"hydra.run.dir={earlier_run}", *overrides])
    assert_refused(proc, earlier_run, before, "config", message)
    assert "warning" not in proc.stderr.lower(), proc.stderr[-3000:]


def test_a_refused_run_leaves_a_ray_connection_it_found_open(ray_cluster, tiny_model, earlier_run):
    """main closes only a Ray connection it opened: called where one is open (a notebook's, this
    session's cluster), a run the preflight refuses leaves it open and usable."""
    before = snapshot(earlier_run)
    proc = run_main(tiny_model, earlier_run, "model.max_model_len=96")  # refused inside main's try
    assert_refused(proc, earlier_run, before, "config", "model.max_model_len: 96 is too small")
    assert ray_cluster.is_initialized() and ray_cluster.get(ray_cluster.put(1)) == 1


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
    from oel_ray.overrides import CONF_DIR
    from oel_ray.manifest import config_snapshot
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    config.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=[f"model.path={tiny_model}", f"output_dir={out}", *SMALL])
    snap = config_snapshot(OmegaConf.to_object(raw))
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        snap[section][key] = value
    stages = {name: {"attempts": 1, "started": 1.0, "finished": 2.0} for name in finished}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"version": 1, "config": snap, "stages": stages}))


def knowledge(texts: list[str], chains: list) -> str:
    return json.dumps(KnowledgeRecord(2, "unstructured", "knowledge", texts, chains).to_json())


def rows(*items) -> str:
    return "".join((json.dumps(i) if isinstance(i, dict) else i) + "\n" for i in items)


FILES = [  # (stages finished, {file: content}, manifest config changes, kind, message)
    ([], {"manifest.json": "{not json"}, None, "input", "manifest.json: not valid JSON"),
    (["round_0/evaluate"], {}, {"learner__steps": 5}, "config", "learner.steps: is 6 but the run in"),
    # learner.temperature (compared first) is ${rollout.temperature}: the line names what the user sets
    (["round_0/evaluate"], {}, {"rollout__temperature": 0.5, "learner__temperature": 0.5}, "config",
     "rollout.temperature: is 0.7 but the run in"),
    (["round_0/evaluate", "round_1/collect"], {"round_1/trajectories.jsonl": rows(played(1), "{\"env_id\": 3")},
     {}, "input", "trajectories.jsonl:2: not a trajectory row"),
    (["round_0/evaluate", "round_1/collect"], {"round_1/trajectories.jsonl": rows(played(1))}, {}, "input",
     "trajectories.jsonl: 1 games but the chains read 2 (extractor.k=2, extractor.trajectories=pool)"),
    (["round_0/evaluate", "round_1/collect", "round_1/extract", "round_1/knowledge_eval", "round_1/deploy"],
     {"round_1/deploy.jsonl": rows(played(1), played(2)), "round_1/knowledge.json": knowledge(["", " "], [])},
     {}, "input", "knowledge.json: the knowledge set is empty"),
    (["round_0/evaluate", "round_1/collect", "round_1/extract", "round_1/deploy"],  # the curve reads it first
     {"round_1/deploy.jsonl": rows(played(1), played(2)), "round_1/knowledge.json": "[1, 2"},
     {}, "input", "knowledge.json: not a knowledge file (JSONDecodeError"),
    (["round_0/evaluate", "round_1/collect", "round_1/extract"],
     {"round_1/knowledge.json": knowledge(["a"], [[KnowledgeSnapshot(0, 0, "", 0, [])]])},
     {}, "input", "knowledge.json: its chains do not reach accumulation step 2"),
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


@pytest.mark.parametrize("manifest,message", [("{not json", "manifest.json: not valid JSON"),
                                              (None, "learner.steps: is 6 but the run in")])
def test_a_run_that_cannot_be_resumed_is_refused_before_its_model_is_built(manifest, message, tiny_model,
                                                                            earlier_run, tmp_path):
    """model.build's minutes (the organism's: 11) come after the run directory's manifest is checked."""
    if manifest is None:
        resumable(earlier_run, tiny_model, ["round_0/evaluate"], learner__steps=5)
    else:
        (earlier_run / "manifest.json").write_text(manifest)
    unbuilt = tmp_path / "model"
    proc = run_main(str(unbuilt), earlier_run, *SMALL)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]
    assert not unbuilt.exists() and "build" not in proc.stderr


# ----------------------------------------------------------------------------- what model.path points at

MODEL_DIRS = [  # (what the directory holds: {file: text} or the tiny checkpoint's files by name, model.build,
    #              the message's part after "model.path: '<dir>' ")
    ({"notes.txt": "mine"}, "null", "is not a checkpoint: no config.json"),
    ({"config.json": "{garbage"}, "null", "is not a checkpoint: config.json is not valid JSON"),
    ({"config.json": "[1, 2]"}, "null", "is not a checkpoint: config.json is not a model config (no model_type)"),
    (("config.json", "tokenizer.json", "tokenizer_config.json"), "null",
     "is not a checkpoint: no weights (*.safetensors)"),
    (("config.json", "model.safetensors"), "null", "is not a checkpoint: no tokenizer"),
    # model.build=tiny (the default) would have replaced the directory, files and all
    ({"notes.txt": "mine", "data/a.csv": "1,2"}, "tiny",
     "is not a place to build the tiny model: it holds files but no config.json"),
    ({"config.json": json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32})}, "tiny",
     "is not a place to build the tiny model: it holds a model that is not oel_ray's tiny model"),
]


@pytest.mark.parametrize("content,build,message", MODEL_DIRS, ids=[m[2][:50] for m in MODEL_DIRS])
def test_model_path_that_is_not_a_checkpoint(content, build, message, tiny_model, earlier_run, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    if isinstance(content, tuple):
        content = {name: (Path(tiny_model) / name).read_bytes() for name in content}
    for name, data in content.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    before, model_before = snapshot(earlier_run), snapshot(model)
    proc = run_main(str(model), earlier_run, f"model.build={build}")
    assert_refused(proc, earlier_run, before, "config", f"model.path: '{model}' {message}")
    assert snapshot(model) == model_before and not (earlier_run / ".hydra").exists()  # refused before Hydra


# ----------------------------------------------------------------------------- the run directory

def foreign(tmp_path: Path) -> tuple[Path, Path]:
    """Someone's directory that is not an oel_ray run, given as the run directory."""
    (tmp_path / "mine" / "data").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    (tmp_path / "mine" / "data" / "a.csv").write_text("1,2")
    return tmp_path / "mine", tmp_path / "mine"


def a_file(tmp_path: Path, below: str = "") -> tuple[Path, Path]:
    """A regular file given as the run directory, or in the way of it (`below`)."""
    (tmp_path / "file").write_text("in the way")
    return tmp_path / "file", tmp_path / "file" / below if below else tmp_path / "file"


RUN_DIRS = [  # (make(tmp_path) -> (what is on disk, the path passed), field, message after the path)
    (foreign, "hydra.run.dir", "holds files that are not an oel_ray run (data, notes.txt)"),
    (a_file, "hydra.run.dir", "is a file, not a directory"),
    (lambda t: a_file(t, "run"), "hydra.run.dir", "cannot be created: {top} is a file, not a directory"),
    # output_dir names the run directory apart from Hydra's (which stays new and untouched)
    (foreign, "output_dir", "holds files that are not an oel_ray run (data, notes.txt)"),
]


@pytest.mark.parametrize("make,field,message", RUN_DIRS, ids=[f"{r[1]} {r[2][:30]}" for r in RUN_DIRS])
def test_run_directory_that_cannot_be_used(make, field, message, tiny_model, tmp_path):
    top, path = make(tmp_path)
    hydra_dir = tmp_path / "hydra_run" if field == "output_dir" else path
    before = snapshot(top) if top.is_dir() else {"": top.read_text()}
    proc = run_main(tiny_model, hydra_dir, *([f"output_dir={path}"] if field == "output_dir" else []))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"oel_ray: config error: {field}: {path} {message.format(top=top)}; choose " +
        ("a new or empty directory, or an earlier run's directory to resume it" if "oel_ray run" in message
         else "another directory"))
    assert (snapshot(top) if top.is_dir() else {"": top.read_text()}) == before
    assert not list(tmp_path.rglob(".hydra")) and not list(tmp_path.rglob("oel.log"))  # nothing written anywhere


def test_run_directory_that_is_not_writable(tmp_path):
    """A directory this user cannot write: as root (CI), the command runs as `nobody`, for whom
    permissions hold."""
    import os
    import shutil
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix="oel_ray_ro."))  # in /tmp: reachable by nobody
    try:
        parent.chmod(0o555)
        out, model = parent / "run", parent / "model"  # model.build=tiny would build later: never reached
        cmd = [sys.executable, "-m", "oel_ray.main", f"model.path={model}", f"hydra.run.dir={out}"]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no user for whom the directory is read-only")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(tmp_path)})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"oel_ray: config error: hydra.run.dir: {out} cannot be written ({parent} is not writable by this user); "
            "choose another directory")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent)


# ----------------------------------------------------------------------------- what teacher.model points at

def changed_copy(tiny_model: str, where: Path, change: str) -> Path:
    """The tiny checkpoint copied, with its tokenizer's vocabulary or chat template changed."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tiny_model, where)
    tok = AutoTokenizer.from_pretrained(where)
    if change == "vocabulary":
        tok.add_tokens(["<an-extra-token>"])
    else:
        tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tok.save_pretrained(where)
    return where


TEACHERS = [  # (teacher.model: a changed copy of the student, or a path; extra overrides; message after "teacher.model: ")
    ("vocabulary", [], "{t} has another vocabulary than model.path"),
    ("chat template", [], "{t} has another chat template than model.path"),
    ("/no/such/teacher", [], "'/no/such/teacher' does not exist"),
    ("same", ["consolidation.mode=off_policy"], "{t} cannot teach off_policy consolidation"),
    ("same", ["learner.loss=full_reverse_kl"], "{t} cannot teach learner.loss=full_reverse_kl"),
]


@pytest.mark.parametrize("teacher,extra,message", TEACHERS, ids=[f"{t[0]} {' '.join(t[1])}" for t in TEACHERS])
def test_teacher_model_that_cannot_teach_this_student(teacher, extra, message, tiny_model, earlier_run, tmp_path):
    if teacher in ("vocabulary", "chat template"):
        teacher = str(changed_copy(tiny_model, tmp_path / "teacher", teacher))
    elif teacher == "same":
        teacher = tiny_model
    before = snapshot(earlier_run)
    proc = run_main(tiny_model, earlier_run, f"teacher.model={teacher}", *extra, *SMALL)
    assert_refused(proc, earlier_run, before, "config", "teacher.model: " + message.format(t=teacher))
