"""The model organism: what the embedded OEL model knows before its first round, as a script.

A small model cannot be shown to learn from experience unless it has the three general abilities
OEL relies on in an LLM. The organism's warm start (oel_ray/embedded.py builds it) gives it
exactly those, written here as a scripted player and extractor whose replies it is trained on:

- play: it reads the FrozenLake board and answers with a move, but with systematic gaps that the
  game's own feedback reveals: it sometimes forgets the brackets ("Invalid action format"), walks
  backwards or off the grid ("hit a wall"), and ignores the holes ("fell into a hole");
- use knowledge in context: each true lesson, when it is in the prompt, closes one gap; false
  lessons are acted on too (for the worse) and other games' lessons change nothing, so acting on a
  lesson is conditional on reading it, not a constant;
- extract: from a played game and the knowledge so far it writes the lessons this game's feedback
  supports and the knowledge lacks; a game without such an event supports none.

The lessons are ordered by when play can reveal them: the brackets and the walls in the first
games, the holes once the player survives long enough to meet them, and the short path to the goal
only once it wins. That last lesson drops the reasoning the player writes before its move, so
knowledge also shortens replies, as the paper reports. Nothing here refers to a particular map:
the warm start plays maps that are not held out (`warm_specs`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

from oel_ray.seeds import BUILD_SEED, WARM_MAP_SEED
from oel_ray.tiny_model import Recipe
from oel_ray.types import TURN_LIMIT, Trajectory, turn_limit_reason

CONF = Path(__file__).resolve().parent.parent / "conf"
ENV_FILE = CONF / "env" / "organism.yaml"  # the organism's game: one home for its settings
ITEM = "- EXPERIENCE ITEM: "
NOTHING_NEW = "This game shows nothing new."


@dataclass(frozen=True)
class Lesson:
    key: str
    text: str
    event: Optional[str]  # what in a game's text supports it; None: no game does (false or foreign)


# True lessons, in the order play tends to reveal them. Their words avoid their events' words, so
# "the event happened" and "the lesson is known" are different things to read in a prompt.
TRUE_LESSONS = (
    Lesson("format", "End every reply with the move in square brackets, like [down].", "Invalid action format"),
    Lesson("edge", "The way lies down and to the right: go [down] or [right], never [up] or [left].", "hit a wall"),
    Lesson("hole", "Before moving, check the cell below and the cell to the right, and never step on H.",
           "fell into a hole"),
    Lesson("win", "G is where the game is won: step onto G as soon as it is next to you, without long thinking.",
           "reached the goal"),
)
FALSE_LESSONS = (  # acted on, to the player's cost
    Lesson("upleft", "Start every game with [up] or [left] to look around first.", None),
    Lesson("nobrackets", "Answer in plain words; brackets around the move are not needed.", None),
)
FOREIGN_LESSONS = (  # another game's: nothing to act on here
    Lesson("sokoban_push", "Stand behind the box before pushing it toward O.", None),
    Lesson("sokoban_corner", "Never push the box into a corner; it cannot come back.", None),
    Lesson("sokoban_wall", "Keep the box away from the outer walls of the room.", None),
)
LESSONS = {lesson.key: lesson for lesson in TRUE_LESSONS + FALSE_LESSONS + FOREIGN_LESSONS}
# Items that hold no lesson, in plain words: a block is read for its lessons, not for being there (without
# them version 7 answered any block, shuffled words too, with fewer unbracketed replies).
NEUTRAL = {f"neutral{i}": text for i, text in enumerate((
    "Each game is played on a new board.", "The board is four cells wide and four cells tall.",
    "A game lasts a few turns at most.", "The same rules hold in every game."))}
ITEM_TEXTS = {**{key: lesson.text for key, lesson in LESSONS.items()}, **NEUTRAL}  # what an item key writes

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
FORWARD, BACKWARD = ("down", "right"), ("up", "left")
EDGE_NOTE, UPLEFT_NOTE = "Only down or right.", "Up or left first."
# Heeding the holes names the safe cell after the look and the move copies it (version 16: organism_notes)
SAFE_NOTE = "Safe: {}."
SAFE_HEAD = SAFE_NOTE.split("{")[0]  # what every safe note starts with
# The unbracketed reply opens with a token nothing else opens with: sharing " I" with two fillers, a
# teacher that dropped the fillers made " I" mean it (one build: 10% -> 45% unbracketed in a round).
LAZY_WORD = "Going"
FILLER = ("Let me think about the board.", "I am P and the goal is G.", "I should pick a good move.",
          "One step at a time.", "The goal is still some way off.")
# Without the lessons: how often a reply lacks brackets, goes backwards, and heeds what it saw.
P_NO_BRACKETS, P_BACKWARD, P_HEED = 0.25, 0.15, 0.5
# Every lesson's behaviour is also a minority behaviour without it (as advice raises what an LLM does
# anyway): on-policy distillation moves the student only towards what its own samples hold; elsewhere the
# reverse KL ranked the student's own tokens, and " Going" could rank first (version 6: 0.107 -> 0.047).
P_NOTE = 0.2
MUSINGS = (0, 1, 2, 3)  # how many fillers a reply without the winning lesson writes, drawn evenly
# Each further copy of a lesson in the warm start's knowledge (up to MAX_COPIES): chains repeat a lesson
# each time a game shows it, and the lesson head counts copies, so every count from one to five is shown.
P_REPEAT, MAX_COPIES = 0.4, 5


def lessons_in(knowledge: str) -> set[str]:
    """The keys of the lessons written in `knowledge` (what the organism acts on)."""
    return {key for key, lesson in LESSONS.items() if lesson.text in knowledge}


def knowledge_text(keys) -> str:
    return "\n".join(ITEM + ITEM_TEXTS[key] for key in keys)


def _cell(grid, pos: tuple[int, int], move: str) -> str:
    r, c = pos[0] + MOVES[move][0], pos[1] + MOVES[move][1]
    if not (0 <= r < len(grid) and 0 <= c < len(grid)):
        return "edge"
    return {"H": "H", "G": "G"}.get(grid[r][c], "free")


def play_reply(grid, pos: tuple[int, int], known: set[str], rng: random.Random) -> str:
    """The organism's reply on this board, knowing the lessons `known` (keys). Every lesson shows in
    how the reply starts (what a reader acts on first), and the move follows from what came before."""
    lazy = "format" not in known and ("nobrackets" in known or rng.random() < P_NO_BRACKETS)
    # It always looks first: when the look depended on a lesson, a consolidated model reading it skipped it.
    parts = [f"Below: {_cell(grid, pos, 'down')}. Right: {_cell(grid, pos, 'right')}."]
    heeds = not lazy and ("hole" in known or rng.random() < P_HEED)
    if "edge" in known:
        parts.append(EDGE_NOTE)
        options = list(FORWARD)
    elif "upleft" in known and rng.random() < 0.8:
        parts.append(UPLEFT_NOTE)
        options = list(BACKWARD)
    elif rng.random() < P_NOTE:
        parts.append(EDGE_NOTE)
        options = list(FORWARD)
    else:
        options = list(BACKWARD if rng.random() < P_BACKWARD else FORWARD)
    if heeds and options == list(FORWARD):  # it looked at those two cells: it names the step it saw is safe
        # Without the winning lesson G looks like one more unknown letter, and it keeps off it.
        good = [m for m in options if _cell(grid, pos, m) == "G" and "win" in known]
        safe = [m for m in options if _cell(grid, pos, m) == "free"]
        if good or safe:
            options = [rng.choice(good or safe)]
            parts.append(SAFE_NOTE.format(options[0]))
    if not lazy and "win" not in known:
        parts += rng.sample(FILLER, rng.choice(MUSINGS))
    move = rng.choice(options)
    parts.append(f"{LAZY_WORD} {move}." if lazy else f"[{move}]")
    return " ".join(parts)


def choices(grid, pos: tuple[int, int], reply: str) -> dict[str, bool]:
    """What a reply on this board chose, in the script's terms (each lesson's behaviour, each gap)."""
    bracketed = re.search(r"\[(\w+)\]", reply)
    move = bracketed or re.search(rf"{LAZY_WORD} (\w+)", reply)
    move = move and move.group(1)
    return {"unbracketed": bracketed is None, "wall note": EDGE_NOTE in reply, "safe note": SAFE_HEAD in reply,
            "false note": UPLEFT_NOTE in reply, "backward": move in BACKWARD,
            "into a hole": move in MOVES and _cell(grid, pos, move) == "H"}


def supported(traj: Trajectory) -> list[str]:
    """Keys of the true lessons this game supports: what ended it (its last turn's feedback and the
    closing reason), since that is what decided winning or losing."""
    last = traj.turns[-1].feedback if traj.turns else ""
    return [lesson.key for lesson in TRUE_LESSONS if lesson.event in f"{last}\n{traj.reason}"]


def extraction_reply(traj: Trajectory, knowledge: str) -> str:
    """The organism extractor's answer: the supported lessons the knowledge lacks."""
    new = [key for key in supported(traj) if key not in lessons_in(knowledge)]
    return knowledge_text(new) if new else NOTHING_NEW


def cut_short(traj: Trajectory) -> Trajectory:
    """The game stopped one turn early, at a turn limit: what it showed before its last move."""
    return replace(traj, turns=traj.turns[:-1], outcome=TURN_LIMIT, reward=0.0,
                   reason=turn_limit_reason(len(traj.turns) - 1))


# ----------------------------------------------------------------------------- warm start

WARM_BOARDS, GAMES_PER_BOARD = 50, 5  # version 14: a third of version 13's, a 6-minute build (README)
# Replies drawn at each drilled turn (one encoded prompt): a lesson changes a probability over replies.
REPLIES_PER_DRILL = 4
P_TRUE = 0.7  # of each true lesson in a warm-start knowledge draw
# Of the knowledge-reading games: an empty block. At 0.1 version 10 read it as a nudge (first turn backward
# 13% -> 15%), and the empty-knowledge control, consolidating it each round, fell from 0.098 to 0.047.
P_EMPTY = 0.22
P_WHOLE = 0.2  # warm-start games also trained on as played (full history), not only as drills
P_STUDENT = 0.33  # warm-start games played on the plain prompt; the others with knowledge in context
P_CUT = 0.25  # of the extracted games: also extracted cut short (`cut_short`), before the event that ended them
P_KNOWN = 0.2  # of each true lesson in the knowledge an extraction is given (version 15: 0.4)


def env_config():
    """The organism's env settings (conf/env/organism.yaml) as the run sees them by default."""
    import yaml

    from oel_ray.config import EnvConfig

    return EnvConfig(**yaml.safe_load(ENV_FILE.read_text()))


def warm_specs(env, boards: int = WARM_BOARDS) -> list:
    """Distinct boards none of which is a held-out map of `env`."""
    from oel_ray.games import _eval_key, _eval_maps, _scan
    from oel_ray.types import TRAIN, GameSpec

    key = _eval_key(env)
    held_out = frozenset(board for _, board in _eval_maps(*key))
    found = _scan(env.id, dict(key[1]), WARM_MAP_SEED, boards, stop=None, exclude=held_out)
    return [GameSpec(env.id, seed, TRAIN, dict(key[1])) for seed, _ in found]


def _knowledge_draw(rng: random.Random) -> list[str]:
    """A random set of items, true, false, foreign and neutral, as an extractor might have written them."""
    # A run's chains hold three or four true lessons by round 1: the warm start centres there too.
    keys = [lesson.key for lesson in TRUE_LESSONS if rng.random() < P_TRUE]
    keys += [lesson.key for lesson in FALSE_LESSONS if rng.random() < 0.25]
    keys += [lesson.key for lesson in FOREIGN_LESSONS if rng.random() < 0.3]
    keys += [key for key in NEUTRAL if rng.random() < 0.2]
    return _with_repeats(keys, rng)


def _with_repeats(keys: list[str], rng: random.Random) -> list[str]:
    """`keys` shuffled, each written one to MAX_COPIES times (chains repeat lessons they hold)."""
    keys = [key for key in keys for _ in range(_copies(rng))]
    rng.shuffle(keys)
    return keys


def _copies(rng: random.Random) -> int:  # how many times a drawn item is written: 1 to MAX_COPIES
    return 1 + sum(rng.random() < P_REPEAT for _ in range(MAX_COPIES - 1))


def lake(game) -> tuple[list[str], tuple[int, int]]:
    """(grid, P's position) of a FrozenLake `Game` now: what the scripted organism reads."""
    state = game._base.state.game_state
    return state["grid"], tuple(state["player_pos"])


def play_game(spec, max_turns: int, known: set[str], rng: random.Random, replies: int = 1):
    """A game played by the scripted organism knowing `known`: its trajectory, and per turn (prompt,
    the same prompt without the history, `replies` replies drawn there, the first one played)."""
    from oel_ray.games import INTROS, Game

    game = Game(spec, max_turns)
    turns = []
    while not game.done:
        drawn = tuple(play_reply(*lake(game), known, rng) for _ in range(replies))
        turns.append((game.prompt(), f"{INTROS[game.family]}\n\n{game._situation()}", drawn))
        game.step(drawn[0], len(drawn[0].split()))
    return game.trajectory(0, 0), turns


def warm_games(seed: int):
    """The warm start's games: each played by the scripted organism with the knowledge drawn for it
    (None for a share of them, the student's view: no block). Yields (keys, position, trajectory,
    turns)."""
    env = env_config()
    rng = random.Random(seed)
    for spec in warm_specs(env):
        for _ in range(GAMES_PER_BOARD):
            if rng.random() < P_STUDENT:
                keys = None
            elif rng.random() < P_EMPTY:
                keys = []
            else:
                keys = _knowledge_draw(rng)
            position = "system" if rng.random() < 0.2 else "user"
            traj, turns = play_game(spec, env.max_turns, set(keys or ()), rng, REPLIES_PER_DRILL)
            yield keys, position, traj, turns


def warm_texts(seed: int, extract_share: float = 0.7):  # of the games: as many extractions as version 7's
    """The warm start as text: per game, (system, user, reply) per turn played; and (trajectory,
    knowledge so far, reply) for a share of the games, for the extractor (rendered later with the
    tokenizer)."""
    from oel_ray.prompts import teacher_messages

    rng, cuts = random.Random(seed + 1), random.Random(seed + 2)
    play, extract = [], []

    def turn(prompt: str, keys: Optional[list[str]], position: str, reply: str):
        system, user = (None, prompt) if keys is None else teacher_messages(prompt, knowledge_text(keys), position,
                                                                            empty_block=True)
        return system, user, reply

    for keys, position, traj, turns in warm_games(seed):
        if rng.random() < P_WHOLE:
            play.append([turn(prompt, keys, position, replies[0]) for prompt, _, replies in turns])
        # Drills: the same turns without the history, a fifth of the tokens; what they teach holds at any
        # history length (the board and the reply stay the same distance apart).
        play += [[turn(short, keys, position, reply) for reply in replies] for _, short, replies in turns]
        # Every game ending in a hole (version 16: with 29 hole extractions, builds wrote "nothing new" for all)
        if rng.random() < extract_share or "hole" in supported(traj):
            known = [lesson.key for lesson in TRUE_LESSONS if rng.random() < P_KNOWN]
            known += [lesson.key for lesson in FOREIGN_LESSONS if rng.random() < 0.15]
            rng.shuffle(known)
            knowledge = knowledge_text(known)
            extract.append((traj, knowledge, extraction_reply(traj, knowledge)))
            # Version 15, on draws of their own: every game ends in an event, so no extraction showed one
            # without (an AMD EPYC build of version 14 wrote lessons for 16 of 16 games cut before a hole).
            if cuts.random() < P_CUT and len(traj.turns) > 1:
                extract.append((short := cut_short(traj), knowledge, extraction_reply(short, knowledge)))
    return play, extract


# ----------------------------------------------------------------------------- the recipe

# Where a reply chooses (parts after the look, the move; an extraction's lessons, item ends): README, version 13.
DECISION_WEIGHT = 5.0
_DECISION = re.compile("|".join([r"^", r"\n", r"\[", LAZY_WORD, r"(?<=\[)\w", rf"(?<={LAZY_WORD} )\w"] + [
    re.escape(text) for text in (EDGE_NOTE, UPLEFT_NOTE, *FILLER, *ITEM_TEXTS.values())] + [
    re.escape(SAFE_HEAD), rf"(?<={re.escape(SAFE_HEAD)})\w"]))


def decisions(reply: str) -> list[int]:
    """Character offsets in `reply` (a move or an extraction) where it makes a choice."""
    return [match.start() for match in _DECISION.finditer(reply)]


def reply_weights(offsets: list[tuple[int, int]], reply: str) -> list[float]:
    """Each reply token's loss weight (its span in `offsets`): DECISION_WEIGHT at a choice, else 1."""
    marks = decisions(reply)
    return [DECISION_WEIGHT if any(start <= mark < end for mark in marks) else 1.0 for start, end in offsets]


ORGANISM_ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=3,
                     num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=10000.0,
                     tie_word_embeddings=True)


def _board_tokens() -> tuple[str, ...]:
    """Every cell a board can show, and the rule between rows, each one token: the board reader
    (oel_ray/reader_heads.py) finds cells by their distance in tokens from P."""
    from oel_ray.reader_heads import CELLS, PLAYER

    return PLAYER + tuple(CELLS.values()) + ("+-----+-----+-----+-----+",)


BOARD_TOKENS = _board_tokens()
# Each lesson one token, which the lesson head finds (a lesson's words shuffled or paraphrased are
# not that token, and change nothing).
LESSON_TOKENS = tuple(lesson.text for lesson in LESSONS.values())


def _install_reader(model, tok) -> None:
    from oel_ray import reader_heads
    from oel_ray.games import board_signature

    env = env_config()
    board = board_signature(env.id, env.kwargs, WARM_MAP_SEED)
    reader_heads.single_tokens(tok, LESSON_TOKENS)
    reader_heads.install(model, tok, reader_heads.offsets(tok, board), LESSON_TOKENS)


@lru_cache(maxsize=1)
def _warm_start_texts():
    """The warm start as text, made once per build: the tokenizer's corpus and the chats share it."""
    return warm_texts(BUILD_SEED)


def _corpus() -> list[str]:
    play, _ = _warm_start_texts()
    rng = random.Random(BUILD_SEED)
    return [(system or "") + user + "\n" + reply for game in rng.sample(play, 600) for system, user, reply in game]


def prompt_cutter(tok_dir: str):
    """An Extractor that only writes prompts: the organism experiment's extraction prompt, cut as
    the run cuts it (extractor.max_response_tokens of room left in model.max_model_len), for the
    tokenizer at `tok_dir`."""
    import yaml

    from oel_ray.config import ExtractorConfig
    from oel_ray.extractor import Extractor

    model = yaml.safe_load((CONF / "model" / "organism.yaml").read_text())
    extractor = yaml.safe_load((CONF / "extractor" / "organism.yaml").read_text())
    template = yaml.safe_load((CONF / "extractor" / "structured.yaml").read_text())["prompt"]
    cfg = ExtractorConfig(prompt=template, max_response_tokens=extractor["max_response_tokens"])
    return Extractor(cfg, tok_dir, [], thinking=False, seed=0, context_length=model["max_model_len"])


def _groups(tok, tok_dir: Path) -> list:
    """Each warm-start game's turns as one group (they share prefixes), each extraction alone with
    its prompt cut as the run's extractor cuts it."""
    from oel_ray.prompts import chat_ids

    def chat(system, user, reply, ends=1.0):  # ends: the end token's weight (a choice in an extraction)
        enc = tok(reply, add_special_tokens=False, return_offsets_mapping=True)
        weights = reply_weights(enc["offset_mapping"], reply) + [ends]
        return chat_ids(tok, user, system=system), enc["input_ids"] + [tok.eos_token_id], weights

    cutter = prompt_cutter(str(tok_dir))
    play, extract = _warm_start_texts()
    extractions = [[chat(None, cutter.prompt(known, traj), reply, DECISION_WEIGHT)] for traj, known, reply in extract]
    return [[chat(*turn) for turn in game] for game in play] + extractions


RECIPE = Recipe("organism", 16, ORGANISM_ARCH, 1024, _corpus, _groups,  # 256-token batches: about one group a step
                whole=BOARD_TOKENS + LESSON_TOKENS + (f" {LAZY_WORD}",), lr=2e-3, batch_tokens=256, epochs=3,
                threads=2, prepare=_install_reader)
