"""Breadth-first solvers for the two grid games, on a live `Game`'s current state.

Used to label the tiny model's warm-start data with good moves; the games are small enough
(Sokoban 6x6 with one box: at most 36 x 36 states) for a plain BFS without a depth limit.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Iterable, Optional

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
Successors = Callable[[Hashable], Iterable[tuple[str, Hashable]]]


def first_move(start: Hashable, successors: Successors, is_goal: Callable[[Hashable], bool]) -> Optional[str]:
    """The first move of a shortest path to a goal state; None if solved already or unsolvable."""
    queue, seen = deque([(start, None)]), {start}
    while queue:
        state, first = queue.popleft()
        if is_goal(state):
            return first
        for move, nxt in successors(state):
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, first or move))
    return None


def _sokoban(env) -> tuple[Hashable, Successors, Callable]:
    fixed, room = env.room_fixed, env.room_state  # fixed: 0 wall, 2 target; room: 3/4 box
    rows, cols = fixed.shape
    targets = {(r, c) for r in range(rows) for c in range(cols) if fixed[r, c] == 2}
    boxes = frozenset((r, c) for r in range(rows) for c in range(cols) if room[r, c] in (3, 4))

    def free(r: int, c: int) -> bool:
        return 0 <= r < rows and 0 <= c < cols and fixed[r, c] != 0

    def successors(state):
        (pr, pc), bx = state
        for move, (dr, dc) in MOVES.items():
            nxt, beyond = (pr + dr, pc + dc), (pr + 2 * dr, pc + 2 * dc)
            if not free(*nxt):
                continue
            if nxt not in bx:
                yield move, (nxt, bx)
            elif free(*beyond) and beyond not in bx:
                yield move, (nxt, (bx - {nxt}) | {beyond})

    start = (tuple(int(x) for x in env.player_position), boxes)
    return start, successors, lambda s: s[1] <= targets


def _frozenlake(env) -> tuple[Hashable, Successors, Callable]:
    grid = env.state.game_state["grid"]
    size = len(grid)

    def successors(pos, holes_ok: bool = False):
        for move, (dr, dc) in MOVES.items():
            r, c = pos[0] + dr, pos[1] + dc
            if 0 <= r < size and 0 <= c < size and (holes_ok or grid[r][c] != "H"):
                yield move, (r, c)

    start = tuple(env.state.game_state["player_pos"])
    return start, successors, lambda p: grid[p[0]][p[1]] == "G"


def moves(family: str, env) -> tuple[Optional[str], list[str]]:
    """(best move or None, moves that change the state) for an unwrapped TextArena env.

    A FrozenLake move into a hole counts as legal: it is a real, if losing, move.
    """
    if family == "Sokoban":
        start, successors, is_goal = _sokoban(env)
        legal = [m for m, _ in successors(start)]
    else:
        start, successors, is_goal = _frozenlake(env)
        legal = [m for m, _ in successors(start, holes_ok=True)]
    return first_move(start, successors, is_goal), legal
