"""TextArena games played one turn at a time by an outside policy, and the maps they are played on.

A `Game` never calls a model: rollout workers batch the prompts of many games into one LLM call and
feed each reply back with `step`. Prompts follow the OEL reference: one short framing line instead
of the game's rule text and symbol legend, then the flattened history (boards, parsed actions and
the environment's short feedback, never earlier replies), then the current board.

Map identity is the initial board, not the seed: neighbouring Sokoban seeds often give the same
room (generation retries with seed+1, ...), so by default train and held-out maps are kept apart by
board. Small map spaces (FrozenLake 3x3 with 2 holes has 19 boards) cannot give 128 distinct
held-out boards; with `env.distinct_boards=false` maps are seeds, as in the paper, and train and
held-out sets are kept apart by seed only.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Optional

import textarena
from textarena.core import ObservationType

from oel_ray.config import EnvConfig
from oel_ray.seeds import ROUND_SEED_STRIDE, STREAM_SEED_STRIDE, train_map_start
from oel_ray.types import (ERROR, EVAL, INVALID, LOSS, TRAIN, TURN_LIMIT, WIN, GameSpec, Trajectory, Turn,
                           turn_limit_reason)

ACTION_PATTERN = re.compile(r"\[\s*(up|down|left|right|w|a|s|d)\s*\]", re.IGNORECASE)
ALIASES = {"w": "up", "a": "left", "s": "down", "d": "right"}

_ACTION_LINE = "Answer with one action in square brackets: [up], [down], [left] or [right]."
INTROS = {
    "Sokoban": "You are P on a grid. Push the box onto the goal in as few steps as possible. " + _ACTION_LINE,
    "FrozenLake": "You are P on a grid. Reach the goal in as few steps as possible. " + _ACTION_LINE,
}

EXHAUSTED_AFTER = 2_000  # this many seeds in a row without a new board: the map space is used up

_INVALID = re.compile(r"You attempted an invalid move\. Reason: (.*?)\s*Please resubmit", re.DOTALL)


def parse_action(text: str) -> Optional[str]:
    """The last bracketed move in `text` (the paper's rule; the env itself takes the first)."""
    matches = ACTION_PATTERN.findall(text or "")
    if not matches:
        return None
    action = matches[-1].lower()
    return ALIASES.get(action, action)


def game_family(env_id: str) -> str:
    family = env_id.split("-")[0]
    if family not in INTROS:
        raise ValueError(f"{env_id!r}: no prompt for this game; supported: {', '.join(INTROS)}")
    return family


def normalise_kwargs(kwargs: Optional[Mapping]) -> dict[str, Any]:
    """Hydra hands lists (or ListConfig); Sokoban needs dim_room as a tuple, and caches need hashables."""

    def freeze(value: Any) -> Any:
        if isinstance(value, Sequence) and not isinstance(value, str):
            return tuple(freeze(v) for v in value)
        return value

    return {str(k): freeze(v) for k, v in (kwargs or {}).items()}


def _unwrap(env: Any) -> Any:
    while isinstance(env, textarena.Wrapper):
        env = env.env
    return env


def _new_env(env_id: str, kwargs: Mapping, seed: int) -> Any:
    # A fresh env per game: a reused one's observation wrapper keeps the previous game's history.
    env = textarena.make(env_id, **normalise_kwargs(kwargs))
    # TextArena's State reseeds the global `random` on reset (FrozenLake then draws holes from it):
    # keep every other user of `random` in this process unperturbed.
    saved = random.getstate()
    try:
        env.reset(num_players=1, seed=seed)
    finally:
        random.setstate(saved)
    return env


def _board(family: str, base_env: Any) -> str:
    if family == "Sokoban":
        return base_env.create_board_str(base_env.room_state).rstrip("\n")
    return base_env._render_board()


def board_signature(env_id: str, env_kwargs: Mapping, seed: int) -> str:
    """The initial board text of a map: what identifies it to the model."""
    return _board(game_family(env_id), _unwrap(_new_env(env_id, env_kwargs, seed)))


def invalid_turns(traj: Trajectory) -> int:
    """Turns whose reply had no parsable action or made a move the env refused. The move that ends
    a game as invalid is reported only in the closing reason, so it is counted from the outcome."""
    flagged = [t.action is None or bool(_INVALID.search(t.feedback)) for t in traj.turns]
    if traj.outcome == INVALID and flagged:
        flagged[-1] = True
    return sum(flagged)


def _short_note(text: str) -> str:
    invalid = _INVALID.search(text)
    return f"Invalid move: {invalid.group(1)}" if invalid else " ".join(text.split())


class Game:
    """One map of one TextArena env; `prompt()` -> policy -> `step(reply)` until `done`."""

    def __init__(self, spec: GameSpec, max_turns: int):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.spec = spec
        self.max_turns = max_turns
        self.family = game_family(spec.env_id)
        self._env = _new_env(spec.env_id, spec.env_kwargs, spec.seed)
        # Talk to the unwrapped env so wrapped and -raw ids behave alike: the wrappers' string
        # observation repeats the rule prompt, and ActionFormattingWrapper would bracket an
        # unbracketed "up" into a valid move that we recorded as unparsable.
        self._base = _unwrap(self._env)
        self._base.get_observation()  # drop the env's rule prompt and first board: we render our own
        self.turns: list[Turn] = []
        self._boards: list[str] = []  # the board each recorded turn was played on
        self._notes: list[str] = []  # the env's short feedback per turn, for later prompts
        self._result: Optional[tuple[str, float, str]] = None  # outcome, reward, reason

    @property
    def done(self) -> bool:
        return self._result is not None

    def board(self) -> str:
        return _board(self.family, self._base)

    def prompt(self) -> str:
        """The paper's prefix: one user message with every earlier board, parsed action and result,
        never an earlier reply. Recorded as `Turn.prompt` whatever history format the policy sees."""
        if self.done:
            raise RuntimeError("the game is over; there is no next prompt")
        lines = [INTROS[self.family], ""]
        for number, (board, turn, note) in enumerate(zip(self._boards, self.turns, self._notes), 1):
            action = f"[{turn.action}]" if turn.action else "none"
            lines += [f"Turn {number}:", board, f"Action: {action}", f"Result: {note}", ""]
        lines.append(self._situation())
        return "\n".join(lines)

    def messages(self) -> list[dict[str, str]]:
        """The same game as a multi-turn chat: each turn's observation is a user message and each
        earlier reply, raw (reasoning included), an assistant message. The chat template decides
        what of an earlier reply the model sees again (Qwen3 drops its <think> block)."""
        if self.done:
            raise RuntimeError("the game is over; there is no next prompt")
        chat = [{"role": "user", "content": f"{INTROS[self.family]}\n\n{self._situation(0)}"}]
        for number, (turn, note) in enumerate(zip(self.turns, self._notes), 1):
            chat.append({"role": "assistant", "content": turn.response})
            chat.append({"role": "user", "content": f"Result: {note}\n\n{self._situation(number)}"})
        return chat

    def _situation(self, played: Optional[int] = None) -> str:
        """The board before turn `played + 1` (default: now) and the question."""
        played = len(self.turns) if played is None else played
        board = self.board() if played == len(self.turns) else self._boards[played]
        return f"Turn {played + 1} (now):\n{board}\nYour action?"

    def step(self, response: str, response_tokens: int) -> bool:
        """Play one reply; returns whether the game is over."""
        prompt, board = self.prompt(), self.board()
        action = parse_action(response)
        try:
            # An unparsable reply goes to the env as is, so the env reports its own invalid-format move.
            env_done, _ = self._base.step(f"[{action}]" if action else response)
            answer = [(text, kind) for _, text, kind in self._base.get_observation()[1]
                      if kind != ObservationType.PLAYER_ACTION]  # the echo of what we sent
        except Exception as err:  # a bug in a game must not crash the round: the game ends as "error"
            self._result = (ERROR, 0.0, f"the environment raised {type(err).__name__}: {err}")
            self.turns.append(Turn(prompt, response, response_tokens, action, self._result[2]))
            self._boards.append(board)
            self._notes.append(ERROR)
            return True
        note = " ".join(_short_note(t) for t, kind in answer if kind != ObservationType.GAME_BOARD)
        if env_done:
            self._finish(turn_limit=False)
        elif len(self.turns) + 1 >= self.max_turns:
            # Ours, not the env's: Sokoban's max_turns is off by one and FrozenLake's is fixed at 100.
            self._finish(turn_limit=True)
        feedback = [t for t, _ in answer] + ([self._result[2]] if self.done else [])
        self.turns.append(Turn(prompt, response, response_tokens, action, "\n".join(feedback)))
        self._boards.append(board)
        self._notes.append(note or "-")
        return self.done

    def _finish(self, turn_limit: bool) -> None:
        rewards, info = self._env.close()  # the only close(): called once, when the game ends
        info = info.get(0, {})
        if turn_limit:
            # The env has not scored an unfinished game; use its own partial credit.
            completion = getattr(self._base, "_get_percentage_completion", lambda: 0.0)
            reward = float(completion())
            reason = turn_limit_reason(self.max_turns)
        else:
            reward = float(rewards[0])
            reason = str(info.get("reason") or "")
        if reward == 1.0:
            outcome = WIN
        elif info.get("invalid_move"):
            outcome = INVALID
        elif turn_limit or "turn limit" in reason.lower():  # the env's own limit, when set lower
            outcome = TURN_LIMIT
        else:
            outcome = LOSS
        self._result = (outcome, reward, reason)

    def trajectory(self, round: int, model_version: int) -> Trajectory:
        if self._result is None:
            raise RuntimeError("trajectory() needs a finished game")
        outcome, reward, reason = self._result
        s = self.spec
        return Trajectory(s.env_id, s.seed, s.split, round, model_version, list(self.turns),
                          outcome, reward, reason)


# ----------------------------------------------------------------------------- map selection

def _scan(env_id: str, kwargs: dict, start: int, count: int, stop: Optional[int],
          exclude: frozenset = frozenset(), partial: bool = False) -> list[tuple[int, str]]:
    """(seed, board) of the first `count` distinct boards from seed `start` upward, minus `exclude`
    (`partial`: fewer when the map space runs out, instead of an error)."""
    found: list[tuple[int, str]] = []
    seen = set(exclude)
    seed = last_new = start
    while len(found) < count:
        if stop is not None and seed >= stop:
            problem = f"in seeds {start}..{stop - 1}; ask for fewer maps"
        elif seed - last_new >= EXHAUSTED_AFTER:
            problem = (f"({len(exclude)} held out) before no new board came for {EXHAUSTED_AFTER} seeds; "
                       "this map space is too small, ask for fewer maps")
        else:
            problem = None
        if problem and partial:
            return found
        if problem:
            raise ValueError(f"{env_id} {kwargs}: only {len(found)} of {count} new boards {problem}")
        board = board_signature(env_id, kwargs, seed)
        if board not in seen:
            seen.add(board)
            found.append((seed, board))
            last_new = seed
        seed += 1
    return found


@lru_cache(maxsize=16)
def _eval_maps(env_id: str, kwargs_key: tuple, offset: int, count: int) -> tuple[tuple[int, str], ...]:
    return tuple(_scan(env_id, dict(kwargs_key), offset, count, stop=None))


def _eval_key(env: EnvConfig) -> tuple:
    kwargs = normalise_kwargs(env.kwargs)
    return env.id, tuple(sorted(kwargs.items())), int(env.eval_seed_offset), int(env.eval_maps)


def eval_specs(env: EnvConfig) -> list[GameSpec]:
    """The held-out maps, the same every round: `env.eval_maps` distinct boards, or with
    `distinct_boards=false` the `eval_maps` seeds from `eval_seed_offset` (boards may repeat)."""
    key = _eval_key(env)
    if not env.distinct_boards:
        offset, count = key[2], key[3]
        return [GameSpec(env.id, seed, EVAL, dict(key[1])) for seed in range(offset, offset + count)]
    return [GameSpec(env.id, seed, EVAL, dict(key[1])) for seed, _ in _eval_maps(*key)]


def train_specs(env: EnvConfig, round: int, count: int, stream: int = 0) -> list[GameSpec]:
    """`count` training maps for (round, stream): distinct boards none of which is held out, or with
    `distinct_boards=false` consecutive seeds (the config keeps them below the held-out seeds).
    A map space with fewer boards than `count` beside the held-out ones (FrozenLake 4x4 with 3
    holes: 206) gives each of them in turn again; every replay samples on its own seed."""
    if not 0 <= stream < ROUND_SEED_STRIDE // STREAM_SEED_STRIDE or round < 0:
        raise ValueError(f"round {round} must be >= 0 and stream {stream} in "
                         f"0..{ROUND_SEED_STRIDE // STREAM_SEED_STRIDE - 1}")
    key = _eval_key(env)
    start = train_map_start(env.train_seed_offset, round, stream)
    if not env.distinct_boards:
        if count > STREAM_SEED_STRIDE:
            raise ValueError(f"{count} maps do not fit in one stream's {STREAM_SEED_STRIDE} seeds; ask for fewer")
        return [GameSpec(env.id, seed, TRAIN, dict(key[1])) for seed in range(start, start + count)]
    held_out = frozenset(board for _, board in _eval_maps(*key))
    found = _scan(env.id, dict(key[1]), start, count, stop=start + STREAM_SEED_STRIDE, exclude=held_out,
                  partial=True)
    if not found:
        raise ValueError(f"{env.id} {dict(key[1])}: every board is held out ({len(held_out)}); "
                         "ask for fewer held-out maps")
    return [GameSpec(env.id, found[i % len(found)][0], TRAIN, dict(key[1])) for i in range(count)]
