"""oel_ray.games against the real TextArena environments (no mocks)."""

from __future__ import annotations

import json
import random
from collections import deque

import pytest
import textarena

from oel_ray import games
from oel_ray.config import EnvConfig
from oel_ray.games import Game, board_signature, eval_specs, parse_action, train_specs
from oel_ray.types import GameSpec, Trajectory

SOKOBAN = ("Sokoban-v0", {"dim_room": [6, 6], "num_boxes": 1})  # list, as Hydra hands it over
FROZENLAKE = ("FrozenLake-v0-raw", {"size": 3, "num_holes": 2})
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}


def raw_env(env_id, kwargs, seed):
    env = textarena.make(env_id, **games.normalise_kwargs(kwargs))
    env.reset(num_players=1, seed=seed)
    while isinstance(env, textarena.Wrapper):
        env = env.env
    return env


def bfs(start, successors, is_goal, max_depth):
    """Shortest action list from start to a goal state, or None within max_depth."""
    queue, seen = deque([(start, [])]), {start}
    while queue:
        state, path = queue.popleft()
        if is_goal(state):
            return path
        if len(path) < max_depth:
            for action, nxt in successors(state):
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, path + [action]))
    return None


def solve_sokoban(seed, max_depth=5, game=SOKOBAN):
    env = raw_env(*game, seed)
    fixed, room = env.room_fixed, env.room_state
    rows, cols = fixed.shape
    goals = {(r, c) for r in range(rows) for c in range(cols) if fixed[r, c] == 2}
    boxes = frozenset((r, c) for r in range(rows) for c in range(cols) if room[r, c] in (3, 4))
    player = tuple(int(x) for x in env.player_position)

    def free(cell):
        r, c = cell
        return 0 <= r < rows and 0 <= c < cols and fixed[r, c] != 0

    def successors(state):
        (pr, pc), bx = state
        for action, (dr, dc) in MOVES.items():
            nxt, beyond = (pr + dr, pc + dc), (pr + 2 * dr, pc + 2 * dc)
            if not free(nxt):
                continue
            if nxt in bx:
                if free(beyond) and beyond not in bx:
                    yield action, (nxt, (bx - {nxt}) | {beyond})
            else:
                yield action, (nxt, bx)

    return bfs((player, boxes), successors, lambda s: s[1] <= goals, max_depth)


def solve_frozenlake(seed, game=FROZENLAKE, max_depth=5):
    env = raw_env(*game, seed)
    grid, size = env.state.game_state["grid"], env.size

    def successors(pos):
        for action, (dr, dc) in MOVES.items():
            r, c = pos[0] + dr, pos[1] + dc
            if 0 <= r < size and 0 <= c < size and grid[r][c] != "H":
                yield action, (r, c)

    return bfs((0, 0), successors, lambda p: grid[p[0]][p[1]] == "G", max_depth), grid


def spec(game, seed):
    return GameSpec(game[0], seed, "train", game[1])


def play(game_spec, replies, max_turns=5):
    game = Game(game_spec, max_turns)
    for reply in replies:
        if game.step(reply, len(reply)):
            break
    return game


@pytest.fixture(scope="module")
def sokoban_solutions():
    found = {}
    for seed in range(200):
        path = solve_sokoban(seed)
        if path:
            found[seed] = path
        if len(found) == 3:
            return found
    pytest.fail("no Sokoban 6x6 map solvable in 5 moves among 200 seeds")


# ----------------------------------------------------------------------------- parse_action

def test_parse_action():
    assert parse_action("first [up], then I changed my mind: [Left]") == "left"
    assert parse_action("[w]") == "up" and parse_action("[A]") == "left"
    assert parse_action("[s] [D]") == "right" and parse_action("[ down ]") == "down"
    assert parse_action("go up") is None and parse_action("[north]") is None
    assert parse_action("") is None


# ----------------------------------------------------------------------------- scripted policies

def test_sokoban_known_solution_wins(sokoban_solutions):
    for seed, path in sokoban_solutions.items():
        game = play(spec(SOKOBAN, seed), [f"thinking... [{a}]" for a in path])
        traj = game.trajectory(round=0, model_version=0)
        assert (traj.outcome, traj.reward) == ("win", 1.0), traj.reason
        assert [t.action for t in traj.turns] == path


def test_sokoban_walking_into_a_wall_never_wins(sokoban_solutions):
    for seed in sokoban_solutions:
        env = raw_env(*SOKOBAN, seed)
        pr, pc = env.player_position
        wall = next(a for a, (dr, dc) in MOVES.items() if env.room_state[pr + dr, pc + dc] == 0)
        traj = play(spec(SOKOBAN, seed), [f"[{wall}]"] * 5).trajectory(0, 0)
        assert traj.outcome == "invalid" and traj.reward < 1.0 and len(traj.turns) == 2
        assert "wall" in traj.turns[0].feedback and "wall" in traj.reason


def test_frozenlake_known_solution_wins_and_hole_loses():
    wins = losses = 0
    for seed in range(6):
        path, grid = solve_frozenlake(seed)
        traj = play(spec(FROZENLAKE, seed), [f"[{a}]" for a in path]).trajectory(0, 0)
        assert (traj.outcome, traj.reward) == ("win", 1.0), traj.reason
        wins += 1
        into_hole = [a for a, (r, c) in (("down", (1, 0)), ("right", (0, 1))) if grid[r][c] == "H"]
        if into_hole:
            traj = play(spec(FROZENLAKE, seed), [f"[{into_hole[0]}]"]).trajectory(0, 0)
            assert traj.outcome == "loss" and 0.0 < traj.reward < 1.0 and "hole" in traj.reason
            losses += 1
    assert wins == 6 and losses > 0
    # A fixed wrong sequence (off the top edge) wins nothing.
    traj = play(spec(FROZENLAKE, 0), ["[up]"] * 5).trajectory(0, 0)
    assert traj.outcome == "invalid" and len(traj.turns) == 2


@pytest.mark.parametrize("game", [
    ("Sokoban-v0-train", SOKOBAN[1]),  # wrapped
    ("Sokoban-v0-raw", SOKOBAN[1]),
    ("FrozenLake-v0", FROZENLAKE[1]),  # wrapped
    ("FrozenLake-v0-train", FROZENLAKE[1]),
    ("FrozenLake-v0-hardcore-raw", {}),  # the variant's own size (5x5, 6 holes)
], ids=lambda g: g[0])
def test_variant_ids_play_a_known_solution_and_lose_a_wrong_one(game):
    sokoban = game[0].startswith("Sokoban")
    turns = 5 if game[1] else 10  # 5x5: the goal is 8 moves away
    for seed in range(200):
        path = solve_sokoban(seed, game=game) if sokoban else solve_frozenlake(seed, game, max_depth=turns)[0]
        if path:
            break
    else:
        pytest.fail(f"no {game[0]} map solvable in {turns} moves among 200 seeds")
    won = play(spec(game, seed), [f"so [{a}]" for a in path], max_turns=turns)
    traj = won.trajectory(0, 0)
    assert (traj.outcome, traj.reward, traj.env_id) == ("win", 1.0, game[0]), traj.reason
    assert traj.turns[0].prompt.startswith(games.INTROS[game[0].split("-")[0]])  # our prompt, not the wrapper's
    assert board_signature(game[0], game[1], seed) in traj.turns[0].prompt
    wrong = "up"  # FrozenLake starts top-left: off the board
    if sokoban:
        env = raw_env(*game, seed)
        pr, pc = env.player_position
        wrong = next(a for a, (dr, dc) in MOVES.items() if env.room_state[pr + dr, pc + dc] == 0)  # a wall
    lost = play(spec(game, seed), [f"[{wrong}]"] * turns, max_turns=turns).trajectory(0, 0)
    assert (lost.outcome, len(lost.turns)) == ("invalid", 2) and lost.reward < 1.0


@pytest.mark.parametrize("game", [SOKOBAN, FROZENLAKE], ids=["sokoban", "frozenlake"])
def test_turn_cap(game):
    seed = 1
    if game is SOKOBAN:
        env = raw_env(*game, seed)
        pr, pc = env.player_position
        step = next(a for a, (dr, dc) in MOVES.items() if env.room_state[pr + dr, pc + dc] in (1, 2))
    else:
        grid = raw_env(*game, seed).state.game_state["grid"]
        step = "down" if grid[1][0] != "H" else "right"
    replies = [f"[{step}]", f"[{OPPOSITE[step]}]"] * 10  # shuffles back and forth forever
    game_ = play(spec(game, seed), replies, max_turns=4)
    traj = game_.trajectory(0, 0)
    assert game_.done and traj.outcome == "turn_limit" and len(traj.turns) == 4
    assert traj.reward < 1.0 and "turn limit" in traj.reason
    with pytest.raises(RuntimeError):
        game_.prompt()


def test_unparsable_replies_are_invalid_then_end_the_game():
    game = Game(spec(SOKOBAN, 0), 5)
    board = game.board()
    # "up" without brackets would be bracketed into a real move by TextArena's ActionFormattingWrapper.
    assert game.step("up", 1) is False
    first = game.turns[0]
    assert first.action is None and "invalid move" in first.feedback.lower()
    assert game.board() == board
    assert game.step("I am not sure.", 4) is True
    traj = game.trajectory(0, 0)
    assert traj.outcome == "invalid" and traj.reason.startswith("Invalid Move")


def test_global_random_is_not_perturbed():
    random.seed(1234)
    before = random.getstate()
    Game(spec(FROZENLAKE, 7), 5)
    board_signature(*SOKOBAN, 7)
    assert random.getstate() == before


# ----------------------------------------------------------------------------- prompts

def test_prompt_has_board_history_and_no_rules(sokoban_solutions):
    seed, path = next(iter(sokoban_solutions.items()))
    game = Game(spec(SOKOBAN, seed), 5)
    first_board = game.board()
    assert first_board in game.prompt()
    game.step(f"SECRET-REASONING-42 so [{path[0]}]", 10)
    prompt = game.prompt()
    assert game.board() in prompt and first_board in prompt
    assert f"Action: [{path[0]}]" in prompt
    assert "SECRET-REASONING-42" not in prompt
    for rule_text in ("You are solving the Sokoban puzzle", "represented", "Available Moves", "[GAME]"):
        assert rule_text not in prompt
    assert prompt.startswith(games.INTROS["Sokoban"])
    assert game.turns[0].prompt.count("Turn ") == 1  # the first prompt had no history

    lake = Game(spec(FROZENLAKE, 0), 5)
    assert lake.board() in lake.prompt() and "Welcome to Frozen Lake" not in lake.prompt()
    assert "Grid symbols" not in lake.prompt()


def test_trajectory_round_trips_through_json(sokoban_solutions):
    seed, path = next(iter(sokoban_solutions.items()))
    traj = play(spec(SOKOBAN, seed), ["hmm [x]"] + [f"[{a}]" for a in path]).trajectory(2, 17)
    again = Trajectory.from_json(json.loads(json.dumps(traj.to_json())))
    assert again == traj and again.round == 2 and again.model_version == 17
    assert traj.turns[0].action is None


# ----------------------------------------------------------------------------- map selection

def test_train_and_held_out_boards_never_overlap():
    # Held-out seeds deliberately next to round 0's training seeds, so boards do collide.
    env = EnvConfig(id=SOKOBAN[0], kwargs=SOKOBAN[1], eval_seed_offset=5, eval_maps=32)
    held_out = eval_specs(env)
    assert len(held_out) == 32 and all(s.split == "eval" for s in held_out)
    held_boards = {board_signature(s.env_id, s.env_kwargs, s.seed) for s in held_out}
    assert len(held_boards) == 32
    seeds = set()
    for round_ in range(3):
        for stream in range(2):
            train = train_specs(env, round_, 16, stream)
            boards = {board_signature(s.env_id, s.env_kwargs, s.seed) for s in train}
            assert len(train) == len(boards) == 16 and all(s.split == "train" for s in train)
            assert not boards & held_boards
            assert not seeds & {s.seed for s in train}
            seeds |= {s.seed for s in train}
            assert train[0].env_kwargs["dim_room"] == (6, 6)
    round0 = [s.seed for s in train_specs(env, 0, 16, 0)]
    assert round0[-1] - round0[0] >= 16  # some seeds were skipped as held-out or repeated boards

    games._eval_maps.cache_clear()
    assert eval_specs(env) == held_out  # deterministic, not only cached


def test_small_map_space_is_split_and_exhaustion_is_reported():
    lake = EnvConfig(id=FROZENLAKE[0], kwargs=FROZENLAKE[1], eval_maps=8)
    held = {board_signature(s.env_id, s.env_kwargs, s.seed) for s in eval_specs(lake)}
    train = {board_signature(s.env_id, s.env_kwargs, s.seed) for s in train_specs(lake, 0, 8)}
    assert len(held) == len(train) == 8 and not held & train
    with pytest.raises(ValueError, match="too small"):
        eval_specs(EnvConfig(id=FROZENLAKE[0], kwargs=FROZENLAKE[1], eval_maps=128))
    # More training maps than boards left (19 in all, 8 held out): each of the 11 comes round again
    many = [board_signature(s.env_id, s.env_kwargs, s.seed) for s in train_specs(lake, 0, 30)]
    assert len(many) == 30 and len(set(many)) == 11 and not held & set(many)
    assert many[:11] == many[11:22]
