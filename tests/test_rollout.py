"""Rollout collection and evaluation: real Ray, two real vLLM CPU engines, the tiny model, real games.

Also the pieces that need no engine: map selection in both board modes, chat-history token ids,
per-game seeds, core placement, the eval report's counts."""

from __future__ import annotations

import pytest

from oel_ray.config import EnvConfig, ModelConfig, OELConfig, RolloutConfig
from oel_ray.errors import ConfigError
from oel_ray.evaluate import evaluate, summarize
from oel_ray.games import Game, board_signature, eval_specs, invalid_turns, train_specs
from oel_ray.placement import core_slices
from oel_ray.prompts import turn_prompt_ids
from oel_ray.seeds import game_sampling_seeds, turn_sampling_seed
from oel_ray.types import GameSpec, Sampling
from oel_ray.validate import validate

SOKOBAN = EnvConfig(id="Sokoban-v0", kwargs={"dim_room": [6, 6], "num_boxes": 1}, eval_maps=4)
FROZENLAKE = dict(id="FrozenLake-v0-raw", kwargs={"size": 3, "num_holes": 2})
GAMES = 7  # odd: the two workers get unequal shards (4 + 3)


def boards(specs):
    return [board_signature(s.env_id, s.env_kwargs, s.seed) for s in specs]


# ----------------------------------------------------------------------------- map selection

def test_paper_frozenlake_has_128_held_out_seeds_with_repeating_boards():
    lake = EnvConfig(**FROZENLAKE, eval_maps=128, distinct_boards=False)
    held = eval_specs(lake)
    assert [s.seed for s in held] == list(range(lake.eval_seed_offset, lake.eval_seed_offset + 128))
    assert all(s.split == "eval" for s in held)
    assert len(set(boards(held))) < 128  # only 19 boards exist: they repeat, as in the paper
    train = train_specs(lake, 1, 64, stream=1)
    assert len(train) == 64 and len({s.seed for s in train}) == 64
    assert max(s.seed for s in train) < lake.eval_seed_offset  # disjoint by seed
    assert not {s.seed for s in train} & {s.seed for s in train_specs(lake, 1, 64, stream=0)}
    with pytest.raises(ValueError, match="too small"):  # distinct boards: refused, as before
        eval_specs(EnvConfig(**FROZENLAKE, eval_maps=128))


def test_distinct_boards_mode_keeps_boards_apart():
    env = EnvConfig(id=SOKOBAN.id, kwargs=SOKOBAN.kwargs, eval_seed_offset=3, eval_maps=12)
    held = set(boards(eval_specs(env)))
    train = boards(train_specs(env, 0, 12))
    assert len(held) == 12 and len(set(train)) == 12 and not held & set(train)


def compose(*overrides: str) -> OELConfig:
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from oel_ray import config

    config.register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=["output_dir=/tmp/x", *overrides]))


def test_config_for_new_fields():
    lake = validate(compose("env=frozenlake"))
    assert (lake.env.distinct_boards, lake.env.eval_maps, lake.rollout.history) == (False, 128, "flattened")
    validate(compose("rollout.history=chat", "rollout.keep_reasoning=true"))
    bad = [
        (["rollout.history=threaded"], "rollout.history"),
        (["rollout.keep_reasoning=true"], "rollout.keep_reasoning"),
        # seeds alone keep the sets apart: the last round's training seeds would reach held-out ones
        (["env=frozenlake", "rounds=10", "env.eval_seed_offset=1000000"], "env.eval_seed_offset"),
        (["learner.steps=100", "rollout.deploy_games_per_step=200"], "deploy_games_per_step"),
    ]
    for overrides, field in bad:
        with pytest.raises(ConfigError, match=field):
            validate(compose(*overrides))


# ----------------------------------------------------------------------------- pieces without an engine

def test_core_slices():
    two = [("a", [0, 1]), ("a", [0, 1])]
    assert core_slices(two) == [[0], [1]]
    assert core_slices([("a", [0, 1])]) == [[0, 1]]
    assert core_slices([("a", list(range(5)))] * 2) == [[0, 1, 2], [3, 4]]
    assert core_slices([("a", [0, 1])] * 3) == [[0], [1], [0]]  # oversubscribed: round robin
    assert core_slices([("a", [0, 1]), ("b", [0, 1]), ("a", [0, 1])]) == [[0], [0, 1], [1]]  # per node


def test_game_seeds_repeat_maps_get_their_own_stream():
    maps = eval_specs(SOKOBAN)
    once, twice = game_sampling_seeds(7, maps), game_sampling_seeds(7, maps * 2)
    assert twice[:len(maps)] == once  # sample 0 is the same whatever the number of samples
    assert len(set(twice)) == 2 * len(maps)
    assert game_sampling_seeds(8, maps) != once and game_sampling_seeds(7, maps) == once


def test_vllm_start_up_is_quiet_unless_a_level_is_chosen(monkeypatch):
    import logging
    import os

    from oel_ray.rollout import quiet_vllm_start

    vllm_log, level = logging.getLogger("vllm"), logging.getLogger("vllm").level
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "unset")  # so that the test's changes are undone
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    try:
        quiet_vllm_start()
        assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and vllm_log.level == logging.ERROR
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", "debug")
        quiet_vllm_start()
        assert os.environ["VLLM_LOGGING_LEVEL"] == "debug" and vllm_log.level == logging.DEBUG
    finally:
        vllm_log.setLevel(level)


def test_chat_history_token_ids(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    game = Game(GameSpec(SOKOBAN.id, 1, "train", SOKOBAN.kwargs), 5)
    first_user = game.prompt()  # no history yet: the chat's first user turn is the same text
    reply = "<think>\nthe box is left of me\n</think>\n\nI go [up]"
    game.step(reply, 9)
    flat_prompt = game.prompt()
    note = game._notes[0]

    def expected(answer: str) -> str:
        return (f"<|im_start|>user\n{first_user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
                f"<|im_start|>user\nResult: {note}\n\nTurn 2 (now):\n{game.board()}\nYour action?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n")

    def ids(history, keep):
        return turn_prompt_ids(tok, game, history=history, thinking=False, keep_reasoning=keep)

    # The template drops an earlier reply's reasoning (as Qwen3's does); keep_reasoning puts it back.
    assert ids("chat", False) == tok(expected("I go [up]"), add_special_tokens=False)["input_ids"]
    assert ids("chat", True) == tok(expected(reply), add_special_tokens=False)["input_ids"]
    flat = ("<|im_start|>user\n" + flat_prompt + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids("flattened", False) == tok(flat, add_special_tokens=False)["input_ids"]
    assert "the box is left of me" not in flat_prompt and "Action: [up]" in flat_prompt

    # Whatever the model saw, the recorded prefix is the flattened history (consolidation uses it).
    game.step("[left]", 1)
    assert game.turns[1].prompt == flat_prompt


def test_a_knowledge_game_sends_the_teachers_prompt(tiny_model):
    """The in-context curve plays with the knowledge where the teacher reads it: flattened, the very
    ids consolidation scores the teacher on; chat, the block once, in the first user message."""
    import random

    from transformers import AutoTokenizer

    from oel_ray.config import TeacherConfig
    from oel_ray.consolidate import make_samples
    from oel_ray.prompts import knowledge_block

    tok = AutoTokenizer.from_pretrained(tiny_model)
    knowledge = "- EXPERIENCE ITEM: push a box from the side opposite to where it should go"
    game = Game(GameSpec(SOKOBAN.id, 1, "eval", SOKOBAN.kwargs, knowledge=knowledge), 5)
    game.step("I go [up]", 3)

    def ids(history, position, text=knowledge):
        return turn_prompt_ids(tok, game, history=history, thinking=False, keep_reasoning=False, knowledge=text,
                               position=position)

    for position in ("user", "system"):
        cfg = OELConfig(teacher=TeacherConfig(knowledge_position=position))
        student, teacher = make_samples([game.prompt()], [knowledge], tok, cfg, random.Random(0))[0]
        assert ids("flattened", position) == teacher != student
        assert ids("flattened", position, text=" \n") == student  # blank knowledge: the plain prompt
    intro = game.prompt().split("\n\n", 1)[0]
    plain = tok.decode(ids("chat", "user", text=""))
    with_knowledge = tok.decode(ids("chat", "user"))
    assert with_knowledge == plain.replace(f"{intro}\n\n", f"{intro}\n\n{knowledge_block(knowledge)}\n\n", 1)
    assert with_knowledge.count(knowledge) == 1 and plain.count(intro) == 1
    in_system = tok.decode(ids("chat", "system"))
    assert in_system.startswith(f"<|im_start|>system\n{knowledge_block(knowledge)}<|im_end|>\n")
    assert in_system.endswith(plain)
    # Each knowledge text's games of a map sample with the plain games' seeds (common random numbers).
    plain_spec = GameSpec(SOKOBAN.id, 1, "eval", SOKOBAN.kwargs)
    seeds = game_sampling_seeds(7, [plain_spec, plain_spec, game.spec, plain_spec, game.spec])
    assert (seeds[2], seeds[4]) == (seeds[0], seeds[1]) and len({seeds[0], seeds[1], seeds[3]}) == 3


def test_invalid_turns_and_per_sample_report():
    spec = GameSpec(SOKOBAN.id, 1, "eval", SOKOBAN.kwargs)

    def play(replies):
        game = Game(spec, 5)
        for r in replies:
            if game.step(r, 3):
                break
        return game.trajectory(0, 0)

    moved = play(["[up]", "[up]", "[down]", "[down]", "[up]"])  # valid moves to the turn cap
    walls = play(["[up]", "[up]", "[left]", "[left]"])  # two wall bumps in a row: ends invalid
    garbled = play(["hmm", "[up]", "[up]", "[down]", "[down]"])  # one unparsable reply, then valid moves
    assert (invalid_turns(moved), invalid_turns(walls), invalid_turns(garbled)) == (0, 2, 1)
    assert walls.outcome == "invalid"
    report = summarize([moved, walls, garbled, moved], round=3, samples=2)
    assert (report.maps, report.samples, report.games) == (2, 2, 4)
    assert report.per_sample_pass_rates == [0.0, 0.0] and report.invalid_rate == 0.25
    assert report.invalid_turn_rate == pytest.approx(3 / (5 + 4 + 5 + 5))
    assert "2 x 2" in report.markdown() and "invalid turns" in report.markdown()
    with pytest.raises(ValueError):
        summarize([moved, walls, garbled], round=0, samples=2)


# ----------------------------------------------------------------------------- two real engines

@pytest.fixture(scope="module")
def group(ray_cluster, tiny_model):
    from oel_ray.rollout import RolloutGroup

    group = RolloutGroup(ModelConfig(path=tiny_model, build=None, max_model_len=2048), num_workers=2, seed=0,
                         max_logprobs=1, kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    yield group
    group.shutdown()


SAMPLING = Sampling(max_tokens=16, temperature=0.7, top_p=0.8, top_k=20)


def test_two_workers_compute_on_distinct_cores(group):
    import os

    placed = ray_get([w.threads.remote() for w in group.workers])
    cores = [set(p["cores"]) for p in placed]
    assert all(cores) and not cores[0] & cores[1] and cores[0] | cores[1] <= os.sched_getaffinity(0)
    assert [p["torch_threads"] for p in placed] == [len(c) for c in cores]


def test_collection_is_exact_and_in_spec_order(group):
    specs = train_specs(SOKOBAN, 0, GAMES)
    assert len(set(boards(specs))) == GAMES
    streamed = []
    trajectories = group.play(specs, SAMPLING, 2, round=1, on_games=streamed.append)
    assert len(trajectories) == GAMES
    assert [t.seed for t in trajectories] == [s.seed for s in specs]  # none lost, none repeated, in order
    for spec, board, traj in zip(specs, boards(specs), trajectories):
        assert board in traj.turns[0].prompt and traj.split == "train" and traj.round == 1
        assert 1 <= len(traj.turns) <= 2
    # streamed as the games end, each once, in several deliveries (two workers, up to two turns)
    assert sorted(t.seed for part in streamed for t in part) == sorted(s.seed for s in specs)
    assert len(streamed) >= 2
    indexed = sorted((i, t.seed) for ended in group.play_iter(specs, SAMPLING, 1, 1) for i, t in ended)
    assert indexed == [(i, s.seed) for i, s in enumerate(specs)]


def test_eval_samples_of_one_map_differ_and_reproduce(group, tiny_model):
    cfg = OELConfig(model=ModelConfig(path=tiny_model, build=None), env=EnvConfig(
        id=SOKOBAN.id, kwargs=SOKOBAN.kwargs, eval_maps=3, eval_samples=2, max_turns=2),
        rollout=RolloutConfig(max_response_tokens=16), seed=5)
    report, trajectories = evaluate(group, cfg, round=0)
    assert (report.games, report.maps, report.samples) == (6, 3, 2) and len(report.per_sample_pass_rates) == 2
    first, second = trajectories[:3], trajectories[3:]
    assert [t.seed for t in first] == [t.seed for t in second] == [s.seed for s in eval_specs(cfg.env)]
    replies = lambda ts: [[turn.response for turn in t.turns] for t in ts]  # noqa: E731
    assert replies(first) != replies(second)  # two samples of the same maps are not copies
    assert replies(evaluate(group, cfg, round=0)[1]) == replies(trajectories)  # seeded: same again


def test_in_context_curve_plays_each_knowledge_once_on_the_eval_seeds(group, tiny_model):
    from oel_ray.evaluate import evaluate_knowledge
    from oel_ray.types import KnowledgeSnapshot

    cfg = OELConfig(model=ModelConfig(path=tiny_model, build=None), env=EnvConfig(
        id=SOKOBAN.id, kwargs=SOKOBAN.kwargs, eval_maps=3, eval_samples=2, max_turns=2),
        # Sampled from the whole distribution: any shift the lesson makes in the logits can change
        # a reply (top-k 20 / top-p 0.8 left the tiny model's short replies unchanged on one CPU).
        rollout=RolloutConfig(max_response_tokens=16, temperature=1.0, eval_top_p=1.0, eval_top_k=-1), seed=5)
    plain_report, plain = evaluate(group, cfg, round=0)
    lesson = "- EXPERIENCE ITEM: walk around the box, then push it towards the goal"
    chains = [[KnowledgeSnapshot(c, 0, "", 0, []), KnowledgeSnapshot(c, 1, text, 9 * (c == 0), [1])]
              for c, text in enumerate([lesson, ""])]  # chain 1 extracted nothing
    played = []
    step0, step1 = evaluate_knowledge(group, cfg, 0, chains, [0, 1], on_games=played.extend)
    assert len(played) == 2 * 6  # the plain games once (step 0, chain 1 at step 1), the lesson's once
    assert (step0["games"], step0["pass_rate"], step0["empty_chains"]) == (12, plain_report.pass_rate, 2)
    assert (step1["empty_chains"], step1["knowledge_tokens"]) == (1, 4.5)
    assert step1["per_chain_pass_rates"][1] == plain_report.pass_rate
    replies = sorted(turn.response for t in played for turn in t.turns)
    assert replies != sorted(turn.response for t in plain * 2 for turn in t.turns)  # the lesson was read
    # Given evaluate's games (the driver passes round r-1's), only the lesson is played: same rows.
    again = []
    rows = evaluate_knowledge(group, cfg, 0, chains, [0, 1], on_games=again.extend, plain=plain)
    assert len(again) == 6 and rows == [step0, step1]
    other = []  # games that are not evaluate's, in its order: played again
    evaluate_knowledge(group, cfg, 0, chains, [0, 1], on_games=other.extend, plain=plain[::-1])
    assert len(other) == 12


def test_one_batched_engine_call_per_turn_on_every_worker(group):
    specs = train_specs(SOKOBAN, 0, GAMES)
    before = ray_get([w.generate_calls.remote() for w in group.workers])
    trajectories = group.play(specs, SAMPLING, 3, round=1)
    calls = [after - b for after, b in zip(ray_get([w.generate_calls.remote() for w in group.workers]), before)]
    # Shards are contiguous (4 + 3 games): a worker makes one call per turn of its longest game.
    longest = [max(len(t.turns) for t in part) for part in (trajectories[:4], trajectories[4:])]
    assert calls == longest and max(calls) <= 3


def test_a_long_prompt_does_not_shorten_the_other_replies(group, tiny_model):
    from transformers import AutoTokenizer

    worker = group.workers[0]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    short = tok("the box is near the wall and the goal", add_special_tokens=False)["input_ids"]
    long = (short * 400)[:2048 - 8]  # leaves 8 tokens of room in the 2048-token context
    sampling = Sampling(max_tokens=32, temperature=1.0)
    alone, = ray_get(worker.generate.remote([short], sampling, [11]))
    together = ray_get(worker.generate.remote([short, long], sampling, [11, 12]))
    assert len(alone.token_ids) > 8  # a shared budget would have cut it to the long prompt's room
    assert together[0].token_ids == alone.token_ids and together[0].text == alone.text
    assert len(together[1].token_ids) <= 8


def test_response_tokens_leave_out_the_stop_token(group, tiny_model):
    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(tiny_model)
    specs = train_specs(SOKOBAN, 0, 4)
    sampling = Sampling(max_tokens=32, temperature=0.7, seed=9)
    worker = group.workers[0]
    ended = [pair for ref in worker.play.remote(specs, sampling, 1, 0) for pair in ray_get(ref)]  # streamed
    played = [traj for _, traj in sorted(ended, key=lambda pair: pair[0])]
    prompts = [turn_prompt_ids(tok, Game(s, 1), history="flattened", thinking=False, keep_reasoning=False)
               for s in specs]
    turn_seeds = [turn_sampling_seed(seed, 0) for seed in game_sampling_seeds(9, specs)]
    replies = ray_get(worker.generate.remote(prompts, sampling, turn_seeds))  # the same samples again
    stopped = 0
    for traj, gen in zip(played, replies):
        turn = traj.turns[0]
        assert turn.response == gen.text
        stopped += gen.finished
        assert turn.response_tokens == len(gen.token_ids) - gen.finished  # the stop token is not counted
    assert stopped  # the tiny model ends its replies itself


def ray_get(refs):
    import ray

    return ray.get(refs)
