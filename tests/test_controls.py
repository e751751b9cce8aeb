"""The controls of the organism experiment (oel_ray/controls.py): what the teacher reads under
teacher.context=none (no knowledge: the student's own prompt) and =shuffled (each line's words shuffled), and
teacher.knowledge_from (another run's knowledge). Unit tests, then two one-round `tiny` runs through
the entry point with every real part: the empty-knowledge control, and another run's knowledge
shuffled, whose first-step KL shows the teacher reads the content it is given."""

import json
import random

import pytest
from distill_setup import KNOWLEDGE

from oel_ray import artifacts, controls, tracking
from oel_ray.config import TeacherConfig
from oel_ray.errors import ConfigError
from oel_ray.prompts import KNOWLEDGE_PREAMBLE, teacher_messages
from oel_ray.types import KnowledgeRecord

MARKER = "- EXPERIENCE ITEM:"
ITEMS = (f"{MARKER} Push the box toward the goal, never into a corner.\n"
         f"{MARKER} A wall blocks every move into it.\n"
         "free text without a marker but with several words\n"
         "\n"
         f"{MARKER} two words")
PREFIX = "You are an agent on a grid.\n\nCurrent situation:\nP . O\nAnswer with one action in brackets."


def marker_and_words(line: str) -> tuple[bool, list[str]]:
    has = line.startswith(MARKER)
    return has, (line[len(MARKER):] if has else line).split()


def test_shuffle_keeps_each_lines_words_and_its_marker():
    shuffled = controls.shuffle_words(ITEMS, seed=7)
    assert len(shuffled.splitlines()) == len(ITEMS.splitlines())
    for before, after in zip(ITEMS.splitlines(), shuffled.splitlines()):
        (had, words), (has, moved) = marker_and_words(before), marker_and_words(after)
        assert has == had and sorted(moved) == sorted(words), (before, after)


def test_shuffle_changes_every_line_of_more_than_three_words_whatever_the_seed():
    lines = [line for line in ITEMS.splitlines() if len(marker_and_words(line)[1]) > 3]
    for seed in range(200):  # a plain shuffle draws the identity 1 time in 4! for four words
        after = controls.shuffle_words("\n".join(lines), seed).splitlines()
        assert all(marker_and_words(a)[1] != marker_and_words(b)[1] for a, b in zip(after, lines)), seed
    assert controls.shuffle_line("same same same same", random.Random(0)) == "same same same same"


def test_shuffled_set_is_seeded_by_run_seed_round_and_chain():
    cfg = TeacherConfig(context="shuffled")
    texts = [ITEMS, ITEMS]
    first = controls.teacher_set(cfg, texts, seed=3, round=1)
    assert first == controls.teacher_set(cfg, texts, seed=3, round=1)
    assert first[0] != first[1]  # each chain its own seed
    assert controls.teacher_set(cfg, texts, seed=3, round=2) != first
    assert controls.teacher_set(cfg, texts, seed=4, round=1) != first
    assert controls.teacher_set(TeacherConfig(), texts, seed=3, round=1) == texts  # knowledge: as extracted


def test_empty_knowledge_is_the_students_own_prompt():
    """Blank knowledge is no block at all (the paper's code drops the experience section when the
    experience is empty): no preamble, no tags, wherever the knowledge would go."""
    cfg = TeacherConfig(context="none")
    assert controls.teacher_set(cfg, [ITEMS], seed=0, round=1) == [""]
    for position in ("user", "system"):
        for blank in ("", " \n"):
            assert teacher_messages(PREFIX, blank, position) == (None, PREFIX)
        system, user = teacher_messages(PREFIX, ITEMS, position)
        assert KNOWLEDGE_PREAMBLE in (system or user) and ITEMS in (system or user)
        # The organism's warm start (since version 12) still writes the empty frame where it asks to.
        system, user = teacher_messages(PREFIX, "", position, empty_block=True)
        assert f"{KNOWLEDGE_PREAMBLE}<experience>\n\n</experience>" in (system or user)


def record(teacher_reads: str, texts: list[str]) -> str:
    """A knowledge.json that holds `texts` as what the teacher reads (no chains)."""
    return json.dumps(KnowledgeRecord(1, "structured", teacher_reads, texts, []).to_json())


def test_only_the_empty_knowledge_control_may_record_an_empty_set(tmp_path):
    path = tmp_path / "knowledge.json"
    path.write_text(record("none", [""]))
    assert artifacts.read_knowledge_set(path) == [""]
    path.write_text(record("knowledge", [""]))
    with pytest.raises(ConfigError, match="the knowledge set is empty"):
        artifacts.read_knowledge_set(path)


def test_knowledge_from_reads_the_other_runs_set_of_each_round(tmp_path):
    for r in (1, 2):
        (tmp_path / f"round_{r}").mkdir()
        (tmp_path / f"round_{r}" / "knowledge.json").write_text(record("knowledge", [f"round {r} items", ""]))
    cfg = TeacherConfig(context="shuffled", knowledge_from=str(tmp_path))
    controls.check_knowledge_from(cfg, rounds=2)
    assert controls.other_run_set(cfg, 2) == ["round 2 items"]
    with pytest.raises(ConfigError, match=r"^teacher.knowledge_from: .*round_3/knowledge.json is not a knowledge"):
        controls.check_knowledge_from(cfg, rounds=3)
    (tmp_path / "round_2" / "knowledge.json").write_text(record("knowledge", [" "]))
    with pytest.raises(ConfigError, match="holds no knowledge"):
        controls.check_knowledge_from(cfg, rounds=2)


def test_rounds_table_names_what_the_teacher_read_and_the_loss():
    reports = [{"round": r, "pass_rate": 0.5, "ci_low": 0.1, "ci_high": 0.9, "response_tokens_per_turn": 3.0,
                "invalid_rate": 0.0} for r in (0, 1)]
    table = tracking.rounds_table(reports, {1: (0.2, 0.1)}, "none (no block)", "off_policy, topk_forward_kl")
    header, _, zero, one = table.splitlines()
    assert "| teacher reads | consolidation |" in header
    assert "| - | - | - |" in zero and "| none (no block) | off_policy, topk_forward_kl | 0.2000 -> 0.1000 |" in one


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def finished():
    return {}


@pytest.fixture
def run(finished, tmp_path_factory, tiny_model, smallest_tiny, warm_run):
    """run(name, *overrides) -> (process, run dir): one round of `tiny` at the smallest sizes, once."""
    base = [arg for arg in smallest_tiny if not arg.startswith("+experiment=")]  # each names its own

    def get(name: str, *overrides: str):
        if name not in finished:
            out = tmp_path_factory.mktemp("controls") / name
            finished[name] = (warm_run([*base, *overrides, f"model.path={tiny_model}", f"hydra.run.dir={out}"]), out)
        return finished[name]
    return get


def first_step_kl(out) -> float:
    return json.loads((out / "round_1" / "metrics.jsonl").read_text().splitlines()[0])["kl"]


@pytest.mark.e2e
def test_empty_knowledge_control_runs_and_its_teacher_reads_no_knowledge(run, tiny_model):
    from transformers import AutoTokenizer

    from oel_ray import config
    from oel_ray.consolidate import make_samples, step_prefixes

    proc, out = run("empty", "+experiment=tiny_empty_knowledge")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = json.loads((out / "round_1" / "knowledge.json").read_text())
    assert saved["teacher_reads"] == "none" and saved["set"] == [""]
    assert any(step["text"] for chain in saved["chains"] for step in chain)  # extraction ran, for the record
    # The teacher's prompts, built from that file as consolidation builds them: the student's own.
    cfg = config.OELConfig(teacher=config.TeacherConfig(context="none"))
    prefixes = step_prefixes(artifacts.read_trajectories(out / "round_1" / "deploy.jsonl"), 1, 2, 1)[0]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    knowledge = artifacts.read_knowledge_set(out / "round_1" / "knowledge.json")
    for student_ids, teacher_ids in make_samples(prefixes, knowledge, tok, cfg, random.Random(0)):
        assert teacher_ids == student_ids
    # Student and teacher are the same model on the same prompt: what is left is float noise.
    assert abs(first_step_kl(out)) < 1e-5  # measured -3e-9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_reads"] == "none (no block)"
    row = (out / "rounds.md").read_text().splitlines()[3]
    assert row.startswith("| 1 |") and "| none (no block) | on_policy, topk_reverse_kl |" in row
    assert "the teacher reads none (no block)" in proc.stdout


@pytest.mark.e2e
def test_another_runs_knowledge_shuffled_is_what_the_teacher_reads(run, tmp_path_factory):
    """teacher.knowledge_from with context=shuffled: the other run's round-1 set, shuffled, is recorded and
    read; its first-step KL stands well above the empty-knowledge control's (measured 0.0041 vs -3e-9)."""
    other = tmp_path_factory.mktemp("other_game")
    (other / "round_1").mkdir()
    (other / "round_1" / "knowledge.json").write_text(record("knowledge", [KNOWLEDGE]))
    proc, out = run("shuffled_other", "+experiment=tiny_shuffled_knowledge", f"teacher.knowledge_from={other}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    saved = json.loads((out / "round_1" / "knowledge.json").read_text())
    assert saved["teacher_reads"] == "shuffled" and saved["knowledge_from"] == str(other / "round_1" / "knowledge.json")
    assert saved["set"] == controls.teacher_set(TeacherConfig(context="shuffled"), [KNOWLEDGE], 0, 1)
    assert saved["set"] != [KNOWLEDGE] and any(step["text"] for step in saved["chains"][0])  # own chains kept
    assert f"| shuffled knowledge of {other} |" in (out / "rounds.md").read_text()
    _, empty = run("empty", "+experiment=tiny_empty_knowledge")
    print(f"\nfirst-step KL: another run's knowledge shuffled {first_step_kl(out):.5f}, "
          f"empty knowledge {first_step_kl(empty):.5f}")
    assert first_step_kl(out) > 5 * first_step_kl(empty)
