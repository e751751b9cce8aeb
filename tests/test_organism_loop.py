"""The loop learns, end to end, on the model organism (conf/experiment/organism.yaml): one round of
the main experiment through the entry point (real Ray, vLLM, DeepSpeed, TextArena) must raise the
held-out pass rate beyond round 0's interval, and the empty-knowledge control, identical but for
what the teacher reads, must not move it out of that interval. A loop that stopped learning (a
teacher that lost its knowledge, workers left on stale weights, knowledge placed where the teacher
never reads it, a flipped loss sign) fails the first; a gain that came from training alone fails
the second.

The organism is built once (minutes, cached where `make run` keeps it) before the runs."""

import pytest
from built_models import composed_model_path

from benchmarks.common import cpu_model
from benchmarks.organism_draws import HOLE_GAMES, LOOPS, hole_games, hole_lessons, loop_checks, one_round_each
from oel_ray.embedded import fingerprint


@pytest.fixture(scope="module")
def organism_path() -> str:
    from oel_ray.embedded import build_model

    return str(build_model(composed_model_path("organism"), "organism"))


def test_one_round_beats_round_0_and_the_empty_knowledge_control_does_not(organism_path, tmp_path,
                                                                          joins_session_cluster):
    proc, runs = one_round_each(list(LOOPS), tmp_path, organism_path, joins_session_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, [line for line in proc.stderr.splitlines() if "Warning" in line][:3]
    assert "reusing the 1 rollout worker(s) and the teacher" in (tmp_path / LOOPS[1] / "oel.log").read_text()
    (before, after), (control_before, control) = runs[LOOPS[0]], runs[LOOPS[1]]
    # Which build was measured: builds differ between CPUs (embedded.fingerprint), and so do their gains
    # (benchmarks/organism_draws.py puts other draws of the recipe through this test).
    build = f"organism build {fingerprint(organism_path)} on {cpu_model()}"
    print(build, "round 0", before["pass_rate"], "OEL", after["pass_rate"], "empty knowledge", control["pass_rate"])
    assert control_before["pass_rate"] == before["pass_rate"]  # same model, maps and sampling seeds
    failed = [name for name, ok in loop_checks(before, after, control).items() if not ok]
    assert not failed, (build, failed, before["pass_rate"], after["pass_rate"], control["pass_rate"])


def test_the_organism_extracts_a_lesson_from_a_game_only_when_the_game_shows_its_event(organism_path):
    """Games that ended in a hole, played on training maps: each yields the hole lesson; the same game
    stopped one turn earlier (no event) yields none. (With the lesson already known the organism
    writes it again: the chains repeat lessons, they do not invent them.)"""
    from oel_ray import organism as O

    games = hole_games(HOLE_GAMES)
    assert not any(O.supported(O.cut_short(game)) for game in games)
    with_event, without = hole_lessons(organism_path, games)
    lesson = O.LESSONS["hole"].text
    assert all(lesson in reply for reply in with_event), (fingerprint(organism_path), cpu_model(), with_event)
    assert not any(lesson in reply for reply in without), without


def test_every_trained_layer_sees_which_lessons_the_prompt_holds(organism_path):
    """The lesson head's read (layer 1) reaches the inputs of every trained attention and MLP at the
    scale of a feature, not drowned by the residual the trained layers grow (version 15's build: 0.8%
    of a feature past layer 2's attention, where every MLP acted on the lessons it barely saw)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oel_ray import organism as O
    from oel_ray import reader_heads
    from oel_ray.games import Game, eval_specs
    from oel_ray.prompts import chat_ids, teacher_messages

    tok, model = AutoTokenizer.from_pretrained(organism_path), AutoModelForCausalLM.from_pretrained(organism_path).eval()
    hole = reader_heads.Layout(2, len(O.LESSON_TOKENS)).known(list(O.LESSONS).index("hole"))
    env = O.env_config()
    system, user = teacher_messages(Game(eval_specs(env)[0], env.max_turns).prompt(), O.knowledge_text(["hole"]), "user")
    seen = {}
    for i, layer in enumerate(model.model.layers[2:], start=2):
        for name in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, name).register_forward_hook(
                lambda _, __, out, key=f"layer {i} {name}": seen.__setitem__(key, float(out[0, -1, hole])))
    with torch.no_grad():
        model(torch.tensor([chat_ids(tok, user, system=system)]))
    assert len(seen) == 6 and min(seen.values()) > 0.1, seen
