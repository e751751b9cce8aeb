"""The embedded default model: a tiny Qwen3-architecture LM and a BPE tokenizer, built offline.

No hub is reachable on CPU machines, so the project builds its own checkpoint, deterministically
(fixed seeds, single thread), and saves it with `save_pretrained`; from then on it is loaded by the
same code path as a real checkpoint such as Qwen/Qwen3-4B-Instruct-2507.

A randomly initialised model never emits `<|im_end|>` or a bracketed move: every reply would run to
the token limit and every game would be lost, so a demo round would show nothing. The model is
therefore warm-started for a few hundred steps on synthetic chats: the real game prompts answered
with a short reply ending in one move (the BFS solver's best move half the time, a random legal one
otherwise: a weak but non-trivial player), and the real extraction prompts answered with a few
generic lessons from a small phrase grammar.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from oel_ray.config import TINY_MODEL
from oel_ray.prompts import MESSAGE_END, MESSAGE_START, TEXT_END, THINK_CLOSE, THINK_OPEN
from oel_ray.seeds import BUILD_SEED, WARM_MAP_SEED

# Training a BPE in-process leaves Rust worker threads that slow later torch work ~15x.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = [TEXT_END, MESSAGE_START, MESSAGE_END, THINK_OPEN, THINK_CLOSE]

# Qwen-style chat template: ChatML turns; earlier assistant turns keep only their answer (as Qwen3
# does); `enable_thinking=False` pre-fills an empty reasoning block like Qwen3's hybrid models.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    f"{{%- if message['role'] == 'assistant' and '{THINK_CLOSE}' in content %}}"
    f"{{%- set content = content.split('{THINK_CLOSE}')[-1].lstrip('\\n') %}}"
    "{%- endif %}"
    f"{{{{- '{MESSAGE_START}' + message['role'] + '\\n' + content + '{MESSAGE_END}\\n' }}}}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    f"{{{{- '{MESSAGE_START}assistant\\n' }}}}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    f"{{{{- '{THINK_OPEN}\\n\\n{THINK_CLOSE}\\n\\n' }}}}"
    "{%- endif %}"
    "{%- endif %}"
)

# Architecture: Qwen3 with tied embeddings (as Qwen3-0.6B/1.7B/4B) so weight sync is tested on the
# hard case; head_dim 64 because vLLM's CPU attention kernels reject 16.
TINY_ARCH = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
VOCAB_SIZE = 512
# Bump whenever the built model changes: a cache holding another version is rebuilt. Saved in
# config.json; version 1 (random weights) predates the field.
TINY_VERSION = 2
VERSION_KEY = "oel_tiny_version"
NAME_KEY = "oel_embedded"  # which embedded model (model.build) a checkpoint is

# Warm-start data: the games of the paper's settings, on seeds from WARM_MAP_SEED (oel_ray/seeds.py).
WARM_GAMES = [("Sokoban-v0", {"dim_room": (6, 6), "num_boxes": 1}, 120),
              ("FrozenLake-v0-raw", {"size": 3, "num_holes": 2}, 60)]
WARM_MAX_TURNS = 5
EXTRACTORS = Path(__file__).resolve().parent.parent / "conf" / "extractor"
# Training: one pass over length-sorted batches of at most this many tokens (little padding).
BATCH_TOKENS, LR = 1500, 3e-3

# The phrase grammar of replies and lessons. Reasons need not be true: the point is varied lengths.
REASONS = {
    "Sokoban": ["I need to get behind the box.", "The box must reach the goal O.",
                "Pushing the box {a} brings it closer to O.", "The way {a} is open."],
    "FrozenLake": ["The holes H are dangerous.", "Going {a} keeps me away from the holes.",
                   "The goal G is down and to the right.", "The cell {a} looks safe."],
}
COMMON_REASONS = ["I move {a}.", "Let me try {a}.", "This is the shortest path.", "A wall is not in the way."]
CONDITIONS = ["", "", "Before each move, ", "At the start, ", "When a move fails, ", "Near a wall, "]
ADVICE = {
    "Sokoban": ["push the box toward the goal O", "stand behind the box before pushing it",
                "never push the box into a corner", "keep the box away from the walls",
                "walk around the box to push it the other way"],
    "FrozenLake": ["avoid the holes H", "step around the holes to reach G", "stay on safe cells",
                   "go down or right to reach the goal G"],
}
COMMON_ADVICE = ["plan the shortest path to the goal", "do not repeat a move that was invalid",
                 "never walk into a wall", "use as few steps as possible"]
TAILS = ["", "", " to save turns", " because the turn limit is short", " since one wrong move can lose"]
MOVES = ["up", "down", "left", "right"]


def _lesson(rng: random.Random, family: str) -> str:
    text = rng.choice(CONDITIONS) + rng.choice(ADVICE[family] + COMMON_ADVICE) + rng.choice(TAILS)
    return text[0].upper() + text[1:] + "."


def _items(rng: random.Random, family: str, count: int) -> str:
    return "\n".join("- EXPERIENCE ITEM: " + _lesson(rng, family) for _ in range(count))


def _reply(rng: random.Random, family: str, move: str) -> str:
    reasons = [rng.choice(REASONS[family] + COMMON_REASONS).format(a=move)
               for _ in range(rng.choice([0, 0, 1, 1, 2]))]
    return " ".join(reasons + [f"[{move}]"])


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    """Game-like text so the BPE learns boards, actions, prompts, replies and knowledge items."""
    words = ("you are the player P on a grid reach the goal box push wall hole ice move step "
             "current board action in square brackets experience item avoid walls first then "
             "success failure the game ended turn limit reached invalid move reason previous "
             "knowledge rule strategy always never before after left right up down").split()
    out = []
    for _ in range(lines):
        kind, family = rng.random(), rng.choice(list(REASONS))
        if kind < 0.35:
            size = rng.choice([3, 4, 6])
            rows = [" ".join(rng.choice("#_OXP√F HG") for _ in range(size)) for _ in range(size)]
            out.append("Current Board:\n" + "\n".join(rows))
        elif kind < 0.6:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + " "
                       + _reply(rng, family, rng.choice(MOVES)))
        elif kind < 0.8:
            out.append(_items(rng, family, 1))
        else:
            out.append(f"Turn {rng.randint(1, 5)}: action [{rng.choice(MOVES)}] -> " + rng.choice(words))
    return out


def build_tokenizer(out_dir: Path, corpus: Optional[list[str]] = None, vocab_size: int = VOCAB_SIZE,
                    whole: tuple[str, ...] = ()):
    """A byte-level BPE trained on `corpus` (default: the tiny model's game-like text). `whole`:
    strings kept as single tokens (board cells), so every board has the same length in tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(BUILD_SEED)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(rng) if corpus is None else corpus, trainer=trainer)
    bpe.add_tokens([AddedToken(text, normalized=False) for text in whole])
    # Constructor arguments, not attributes: attributes set afterwards are not saved (transformers 5).
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=MESSAGE_END,
        pad_token=TEXT_END,
        bos_token=None,
        additional_special_tokens=[MESSAGE_START, THINK_OPEN, THINK_CLOSE],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=TINY_ARCH["max_position_embeddings"],
    )
    tok.save_pretrained(out_dir)
    return tok


def synthetic_chats(tok, seed: int = BUILD_SEED) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids ending in <|im_end|>) for the warm start, in a fixed order.

    Prompts are built by the real code paths (`Game`, `teacher_messages`, `extraction_prompt` with
    the shipped extractor templates), so the model sees exactly what rollouts will send it.
    """
    import yaml

    from oel_ray.games import Game
    from oel_ray.prompts import chat_ids, extraction_prompt, teacher_messages
    from oel_ray.solver import moves
    from oel_ray.types import TRAIN, GameSpec

    rng = random.Random(seed)
    templates = [yaml.safe_load((EXTRACTORS / f"{name}.yaml").read_text())["prompt"]
                 for name in ("structured", "unstructured")]
    chats = []  # (system, user, reply)
    for env_id, kwargs, count in WARM_GAMES:
        for i in range(count):
            game = Game(GameSpec(env_id, WARM_MAP_SEED + i, TRAIN, kwargs), WARM_MAX_TURNS)
            while not game.done:
                best, legal = moves(game.family, game._base)  # the live, unwrapped env
                move = best if best and rng.random() < 0.5 else rng.choice(legal or MOVES)
                reply, system, user = _reply(rng, game.family, move), None, game.prompt()
                if rng.random() < 0.25:  # the teacher's view of the same turn: knowledge in context
                    knowledge = _items(rng, game.family, rng.randint(1, 6))
                    system, user = teacher_messages(user, knowledge, rng.choice(["user", "user", "system"]))
                chats.append((system, user, reply))
                game.step(reply, len(tok(reply, add_special_tokens=False)["input_ids"]))
            if i % 3 == 0:  # extraction prompts are long (every turn's prompt again): fewer of them
                structured = i % 2 == 0
                knowledge = _items(rng, game.family, rng.randint(1, 6)) if rng.random() < 0.6 else ""
                prompt = extraction_prompt(templates[not structured], knowledge, game.trajectory(0, 0))
                count_ = rng.choice([1, 2, 2, 3])
                # Unstructured replies stay short: that extractor allows only 64 tokens.
                reply = (_items(rng, game.family, count_) if structured
                         else " ".join(_lesson(rng, game.family) for _ in range(min(count_, 2))))
                chats.append((None, prompt, reply))
    return [(chat_ids(tok, user, system=system), tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            for system, user, reply in chats]


@dataclass(frozen=True)
class Recipe:
    """How one embedded model is built: its architecture, tokenizer and warm start."""

    name: str  # model.build's value, saved in config.json under NAME_KEY
    version: int  # bump whenever what it builds changes: a cache holding another version is rebuilt
    arch: dict
    vocab_size: int
    corpus: Callable[[], Optional[list[str]]]  # the tokenizer's training text (None: the tiny corpus)
    groups: Callable[[Any, Path], list]  # (tokenizer, its directory) -> warm-start chat groups
    whole: tuple[str, ...] = ()  # strings kept as single tokens
    lr: float = LR
    batch_tokens: int = BATCH_TOKENS
    epochs: int = 1
    # Torch threads while training: a fixed count gives the same float sums, so the same bytes, on
    # every run of one machine. One for the tiny model; two (every core CI has) for larger ones.
    threads: int = 1
    prepare: Optional[Callable[[Any, Any], Any]] = None  # (model, tokenizer) -> None, before training


def _tiny_groups(tok, _: Path) -> list:
    return [[chat] for chat in synthetic_chats(tok)]  # independent chats: nothing to share


TINY = Recipe(TINY_MODEL, TINY_VERSION, TINY_ARCH, VOCAB_SIZE, lambda: None, _tiny_groups)
