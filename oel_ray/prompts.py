"""Chat messages for the student, the teacher and the extractor, in one place.

The student's prompt for a turn is the game's flattened history (`Game.prompt()`), with no
knowledge. The teacher sees the same message with the knowledge placed before the situation, so
the only difference between the two distributions is the knowledge.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from oel_ray.types import TURN_LIMIT, Trajectory

if TYPE_CHECKING:
    from oel_ray.games import Game

# ChatML's special tokens, as Qwen3 spells them: a message starts and ends, the text ends (padding),
# and the reasoning block opens and closes.
MESSAGE_START, MESSAGE_END, TEXT_END = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

KNOWLEDGE_PREAMBLE = (
    "Before acting, read the experience you have gathered from earlier games. "
    "It may be incomplete or wrong; use what helps.\n"
)


def chat_ids(tokenizer, user: str, *, system: str | None = None, thinking: bool = False) -> list[int]:
    """Token ids of a one-turn chat ready for the assistant's reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def knowledge_block(knowledge: str) -> str:
    return f"{KNOWLEDGE_PREAMBLE}<experience>\n{knowledge.strip()}\n</experience>"


def teacher_messages(prefix: str, knowledge: str, position: str, *,
                     empty_block: bool = False) -> tuple[str | None, str]:
    """(system, user) for the teacher: the knowledge inside the user turn (paper) or as system.

    Blank knowledge is no block at all, the student's own prompt, as the paper's code writes a prompt
    without its experience section when the experience is empty: a chain that has learned nothing
    yet, and the empty-knowledge control, give the teacher nothing to read, not an empty frame.
    `empty_block` writes the frame anyway (the organism's warm start, since version 12, trains on it)."""
    if not knowledge.strip() and not empty_block:
        return None, prefix
    if position == "system":
        return knowledge_block(knowledge), prefix
    intro, sep, situation = prefix.partition("\n\n")
    if not sep:  # no intro paragraph: the whole prefix is the situation
        return None, f"{knowledge_block(knowledge)}\n\n{prefix}"
    return None, f"{intro}\n\n{knowledge_block(knowledge)}\n\n{situation}"


def trajectory_parts(traj: Trajectory) -> list[str]:
    """What the extractor reads, in pieces: one per turn (its input and raw output), then a summary
    of how the game ended."""
    parts = [f"### Turn {i}\nObservation:\n{turn.prompt}\n\nYour output:\n{turn.response}"
             for i, turn in enumerate(traj.turns, 1)]
    if traj.outcome == TURN_LIMIT:
        ending = f"The turn limit ({len(traj.turns)} turns) was reached without success."
    else:
        result = "SUCCESS" if traj.passed else "FAILURE"
        ending = f"Final result: {result}. {traj.reason}".strip()
    return parts + [f"### Summary\n{ending}"]


def trajectory_text(traj: Trajectory) -> str:
    return "\n\n".join(trajectory_parts(traj))


def extraction_prompt(template: str, knowledge: str, traj: Trajectory, trajectory: str | None = None) -> str:
    """`trajectory`: the game's text when already rendered (e.g. shortened to fit the context)."""
    return template.format(
        knowledge=knowledge.strip() or "(none yet)",
        trajectory=trajectory_text(traj) if trajectory is None else trajectory,
    )


def turn_prompt_ids(tokenizer, game: "Game", *, history: str, thinking: bool, keep_reasoning: bool,
                    knowledge: str = "", position: str = "user") -> list[int]:
    """Token ids of the game's next turn for the policy.

    "flattened" (paper): one user message with the whole history, no earlier replies.
    "chat": the observations as user turns and the earlier replies as assistant turns, rendered by
    the model's chat template; with `keep_reasoning` the raw replies go back in verbatim, so a
    template that drops earlier <think> blocks (Qwen3) does not.
    `knowledge`: placed as the teacher reads it (`teacher_messages`, `position` user or system; blank:
    nowhere): flattened, the teacher's prompt itself; chat, the block goes into the first user
    message (after its intro line) or the system prompt, once, so the later turns keep it in view.
    """
    if history == "flattened":
        system, user = teacher_messages(game.prompt(), knowledge, position)
        return chat_ids(tokenizer, user, system=system, thinking=thinking)
    if history != "chat":
        raise ValueError(f"history {history!r} is not one of flattened, chat")
    messages = game.messages()
    system, first = teacher_messages(messages[0]["content"], knowledge, position)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": first}] + messages[1:]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if keep_reasoning:
        # Placeholders carry no </think>, so the template renders them untouched; the raw replies
        # are put back in one pass (a reply that happens to contain a placeholder stays as it is).
        count = iter(range(len(replies)))
        messages = [{**m, "content": f"@@oel-reply-{next(count)}@@"} if m["role"] == "assistant" else m
                    for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
    if keep_reasoning:
        found = re.findall(r"@@oel-reply-(\d+)@@", text)
        if sorted(map(int, found)) != list(range(len(replies))):
            raise ValueError("this chat template rewrites assistant messages; rollout.keep_reasoning "
                             "cannot put the raw replies back")
        text = re.sub(r"@@oel-reply-(\d+)@@", lambda m: replies[int(m.group(1))], text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
