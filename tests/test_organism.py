"""The model organism's script (oel_ray/organism.py) and the packed warm start that trains on it."""

import random
from pathlib import Path

import pytest

from oel_ray import organism as O
from oel_ray.games import board_signature, eval_specs
from oel_ray.types import Trajectory, Turn


def game(feedback: list[str], outcome: str, reason: str) -> Trajectory:
    turns = [Turn("prompt", "[down]", 1, "down", text) for text in feedback]
    return Trajectory("FrozenLake-v0-raw", 1, "train", 1, 0, turns, outcome, 1.0 if outcome == "win" else 0.0, reason)


HOLE = game(["You moved down to position (1, 0).", "You moved right to position (1, 1).\nYou fell into a hole!"],
            "loss", "You fell into a hole! Game over.")
QUIET = game(["You moved down to position (1, 0)."] * 8, "turn_limit",
             "The turn limit of 8 turns was reached before the game ended.")


def test_no_held_out_board_in_the_warm_start():
    env = O.env_config()
    held_out = {board_signature(s.env_id, s.env_kwargs, s.seed) for s in eval_specs(env)}
    warm = {board_signature(s.env_id, s.env_kwargs, s.seed) for s in O.warm_specs(env)}
    assert len(held_out) == env.eval_maps and len(warm) == O.WARM_BOARDS
    assert not held_out & warm


def test_extraction_writes_only_what_the_game_shows():
    assert O.extraction_reply(QUIET, "") == O.NOTHING_NEW  # no event, no lesson
    assert O.extraction_reply(HOLE, "") == O.ITEM + O.LESSONS["hole"].text
    # ... and not again once it is known, whatever else the knowledge holds
    known = O.knowledge_text(["sokoban_push", "hole"])
    assert O.extraction_reply(HOLE, known) == O.NOTHING_NEW
    assert O.lessons_in(known) == {"sokoban_push", "hole"}


def test_the_scripted_player_acts_on_true_lessons_only():
    """What the warm start teaches, measured on the held-out maps: true lessons raise the pass rate
    step by step, a false one sinks it, another game's changes nothing much."""
    env = O.env_config()

    def pass_rate(keys) -> float:
        rng = random.Random(0)
        return sum(O.play_game(s, env.max_turns, set(keys), rng)[0].passed for s in eval_specs(env)) / env.eval_maps

    none, some, all_ = pass_rate([]), pass_rate(["format", "edge"]), pass_rate(["format", "edge", "hole", "win"])
    assert none + 0.08 < some < all_ - 0.25, (none, some, all_)
    assert pass_rate(["upleft"]) < none / 2
    assert abs(pass_rate(["sokoban_push", "sokoban_corner"]) - none) < 0.1
    # knowledge shortens the reply: no reasoning before the move once the winning lesson is known
    rng = random.Random(0)
    grid = [[" "] * 4 for _ in range(4)]
    for _ in range(20):
        reply = O.play_reply(grid, (0, 0), {"format", "edge", "hole", "win"}, rng)
        assert reply.startswith("Below: free. Right: free.") and not any(f in reply for f in O.FILLER)
    # ... and no lesson adds or removes the look: a lesson read again after consolidation took it in
    # cannot push a reply past its own form
    for keys in ([], ["upleft", "nobrackets"], ["edge"]):
        assert all(O.play_reply(grid, (0, 0), set(keys), rng).startswith("Below: free. Right: free.")
                   for _ in range(20))


def test_every_step_a_true_lesson_makes_the_player_without_it_makes_too():
    """On-policy distillation moves the student only towards what its own samples hold: each part a
    reply goes on to after another (the look, the wall note, a musing, the bracketed or the bare
    move), written with any set of true lessons, the player without lessons also writes there now
    and then. The lessons change how often, not what."""
    import itertools
    import re

    kinds = {"look": r"Below: \w+\. Right: \w+\.", "note": re.escape(O.EDGE_NOTE), "safe": O.SAFE_NOTE.format(r"\w+"),
             "bracket": r"\[\w+\]",
             "bare": rf"{O.LAZY_WORD} \w+\.", "musing": "|".join(map(re.escape, O.FILLER))}
    part = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in kinds.items()))
    rng = random.Random(0)
    boards = [[[rng.choice(" H") for _ in range(4)] for _ in range(4)] for _ in range(50)]

    def steps(keys) -> set:
        seen = set()
        for board, _ in itertools.product(boards, range(20)):
            reply = O.play_reply(board, (rng.randrange(3), rng.randrange(3)), set(keys), rng)
            found = list(part.finditer(reply))
            assert " ".join(m.group() for m in found) == reply, reply
            seen |= set(itertools.pairwise([m.lastgroup for m in found] + ["end"]))
        return seen

    alone = steps([])
    true = [lesson.key for lesson in O.TRUE_LESSONS]
    for n in range(1, len(true) + 1):
        for keys in itertools.combinations(true, n):
            taken = steps(keys)
            assert taken <= alone, (keys, taken - alone)


def test_the_warm_start_weighs_a_replys_choices_not_what_follows_from_them():
    """The tokens where a reply chooses (a part after the look, the move, an extraction's lessons and
    what follows an item) carry DECISION_WEIGHT; the look and the words a choice implies count once;
    packing keeps each reply token's weight."""
    from oel_ray.warm_start import pack, reply_tokens

    reply = f"Below: H. Right: free. {O.EDGE_NOTE} {O.FILLER[1]} [right]"
    marks = {reply[i:i + 4] for i in O.decisions(reply)}
    assert marks == {"Belo", O.EDGE_NOTE[:4], O.FILLER[1][:4], "[rig", "righ"}
    safe = f"Below: H. Right: free. {O.SAFE_NOTE.format('right')} [right]"
    assert [safe[i:i + 4] for i in O.decisions(safe)] == ["Belo", "Safe", "righ", "[rig", "righ"]
    lazy = f"Below: free. Right: edge. {O.LAZY_WORD} down."
    assert [lazy[i:] for i in O.decisions(lazy)][1:] == [f"{O.LAZY_WORD} down.", "down."]
    items = O.knowledge_text(["hole", "win"])
    assert [items[i] for i in O.decisions(items)] == ["-", O.LESSONS["hole"].text[0], "\n", O.LESSONS["win"].text[0]]
    # Character spans as a tokenizer reports them: "[", "right", "]".
    spans = [(0, len(reply) - 7), (len(reply) - 7, len(reply) - 6), (len(reply) - 6, len(reply) - 1),
             (len(reply) - 1, len(reply))]
    assert O.reply_weights(spans, reply) == [O.DECISION_WEIGHT] * 3 + [1.0]
    packed = pack([([1, 2], [3, 4], [5.0, 1.0]), ([1, 2, 3, 4, 6], [7])])
    assert reply_tokens(packed)[2] == [5.0, 1.0, 1.0]


def test_a_replys_choices_are_read_as_the_script_makes_them():
    """organism.choices (the probe's first-turn table) names what the script chose, from its text."""
    grid = ["PHFF", "FFFH", "FFFF", "HFFG"]
    assert O.choices(grid, (0, 0), f"Below: free. Right: H. {O.LAZY_WORD} right.") == {
        "unbracketed": True, "wall note": False, "safe note": False, "false note": False, "backward": False, "into a hole": True}
    assert O.choices(grid, (0, 0), f"Below: free. Right: H. {O.UPLEFT_NOTE} [up]") == {
        "unbracketed": False, "wall note": False, "safe note": False, "false note": True, "backward": True, "into a hole": False}
    rng = random.Random(0)

    def made(known: set) -> list[dict]:
        return [O.choices(grid, (0, 0), O.play_reply(grid, (0, 0), known, rng)) for _ in range(200)]

    assert all(m["wall note"] and not m["backward"] for m in made({"edge"}))
    # Heeding the holes names the safe one of the two cells it looked at, and the move follows it.
    heeding = [O.play_reply(grid, (0, 0), {"format", "edge", "hole"}, rng) for _ in range(50)]
    assert all(O.SAFE_NOTE.format("down") in reply and reply.endswith("[down]") for reply in heeding), heeding
    assert not any(m["unbracketed"] for m in made({"format"}))
    assert 0 < sum(m["unbracketed"] for m in made(set())) < 200


def test_packed_training_sees_what_one_by_one_training_sees(tiny_model):
    """A game's turns packed into one sequence give every reply token the loss it has alone."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oel_ray.prompts import chat_ids
    from oel_ray.warm_start import attention_mask, pack, reply_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    _, _, _, turns = next(g for g in O.warm_games(0) if len(g[3]) >= 3)
    group = [(chat_ids(tok, prompt), tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
             for prompt, _, (reply, *_) in turns]
    packed_group = pack(group)
    ids, positions = packed_group[0], packed_group[1]
    assert len(ids) < sum(len(p) + len(r) for p, r in group) * 0.7  # the history is encoded once
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1].log_softmax(-1)
                           .gather(1, torch.tensor(r)[:, None])[:, 0] for p, r in group])
        at, before, _ = reply_tokens(packed_group)
        hidden = model.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                             attention_mask=attention_mask(packed_group, len(ids))[None, None]).last_hidden_state[0]
        packed = -F.cross_entropy(model.lm_head(hidden[before]), torch.tensor(ids)[at], reduction="none")
    assert packed.shape == alone.shape
    assert torch.allclose(packed, alone, atol=1e-4)


def test_an_embedded_build_never_replaces_another(tmp_path, tiny_model):
    from oel_ray.checks import tiny_target_problem
    from oel_ray.embedded import cached_version, recipe

    assert cached_version(tmp_path / "nothing", "organism") is None
    with pytest.raises(ValueError, match="not oel_ray's organism model"):
        cached_version(Path(tiny_model), "organism")
    assert "not oel_ray's organism model" in tiny_target_problem(Path(tiny_model), "organism")
    assert recipe("organism").name == "organism"
    with pytest.raises(ValueError, match="no embedded model"):
        recipe("huge")


def test_a_builds_fingerprint_names_its_weights(tmp_path, tiny_model):
    """Results name the build they measured (builds differ between CPUs): the fingerprint follows the
    weight bytes, not the directory or the other files."""
    import shutil

    from oel_ray.embedded import fingerprint

    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    (copy / "notes.txt").write_text("not a weight")
    assert fingerprint(copy) == fingerprint(tiny_model) and len(fingerprint(copy)) == 16
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(tiny_model)


def test_the_reading_heads_find_the_cells_next_to_p_and_the_lessons_in_the_prompt(tmp_path):
    """The hand-set heads (oel_ray/reader_heads.py) in an untrained organism: after layer 1, at the
    prompt's last token, their output dimensions name the cell right of P and the cell below it (or
    no cell: the edge), on every turn of held-out games, earlier boards in the history included, and
    exactly the lessons the prompt holds."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from oel_ray import reader_heads
    from oel_ray.games import Game
    from oel_ray.prompts import chat_ids, teacher_messages
    from oel_ray.tiny_model import build_tokenizer

    env = O.env_config()
    corpus = [Game(spec, env.max_turns).prompt() for spec in O.warm_specs(env, 20)]
    tok = build_tokenizer(tmp_path, corpus, 400, O.BOARD_TOKENS + O.LESSON_TOKENS)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), **O.ORGANISM_ARCH)).eval()
    O._install_reader(model, tok)
    layout, kinds = reader_heads.Layout(2, len(O.LESSON_TOKENS)), list(reader_heads.CELLS)

    def read(hidden, j: int) -> str:
        values = torch.stack([hidden[layout.read(j, k)] for k in range(len(kinds))])
        return kinds[int(values.argmax())] if float(values.max()) > 0.1 else "edge"

    def known(hidden) -> set[str]:
        return {key for i, key in enumerate(O.LESSONS) if float(hidden[layout.known(i)]) > 1e-3}  # one copy: ~0.6

    def after_layer_1(prompt: str, keys: list[str]) -> torch.Tensor:
        """The residual at the prompt's last token after layer 1, with `keys` as the teacher's block."""
        system, user = teacher_messages(prompt, O.knowledge_text(keys), "user") if keys else (None, prompt)
        with torch.no_grad():
            out = model.model(input_ids=torch.tensor([chat_ids(tok, user, system=system)]), output_hidden_states=True)
        return out.hidden_states[2][0, -1]

    rng, checked = random.Random(0), 0
    for spec in eval_specs(env)[:12]:
        game = Game(spec, env.max_turns)
        while not game.done:
            state = game._base.state.game_state
            grid, pos = state["grid"], tuple(state["player_pos"])
            keys = O._knowledge_draw(rng)
            hidden = after_layer_1(game.prompt(), keys)
            assert (read(hidden, 0), read(hidden, 1)) == (O._cell(grid, pos, "right"), O._cell(grid, pos, "down"))
            assert known(hidden) == set(keys) & set(O.LESSONS)  # lessons, not the neutral items
            checked += 1
            game.step(f"[{rng.choice(['down', 'right', 'down', 'up'])}]", 1)
    assert checked > 30

    # A lesson reads the same whatever else the block holds, and its absence as no block at all: a
    # consolidated student reading a block without a lesson it took in is not told to drop it.
    prompt, edge = Game(eval_specs(env)[0], env.max_turns).prompt(), layout.known(list(O.LESSONS).index("edge"))
    alone, among = (float(after_layer_1(prompt, keys)[edge]) for keys in (["edge"], ["edge", "hole", "win", "neutral0"]))
    assert alone > 0.1 and abs(among - alone) < 0.05 * alone
    assert float(after_layer_1(prompt, ["hole", "win"])[edge]) == float(after_layer_1(prompt, [])[edge]) == 0.0
