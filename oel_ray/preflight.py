"""Checks that need the model's tokenizer or the game itself, run after the config is valid and
before Ray starts: a mistake here would otherwise surface minutes later, inside an actor."""

from __future__ import annotations

from oel_ray import checks
from oel_ray.config import OELConfig
from oel_ray.errors import ConfigError
from oel_ray.types import TRAIN, GameSpec

FILLER = "- EXPERIENCE ITEM: keep the box away from the walls.\n"  # knowledge-like text to size prompts


def check(cfg: OELConfig) -> None:
    checks.model_limits(cfg)  # again: model.build=tiny has only now written the model's config.json
    checks.freeze_patterns(cfg)
    checks.run_dir(cfg.output_dir, "output_dir")  # a sweep's job directory was never pre-checked
    _check_teacher_tokenizer(cfg)
    game = _longest_game(cfg)
    _check_prompt_room(cfg, game)
    ifeval_rows(cfg)
    _check_lm_eval(cfg)


def _check_teacher_tokenizer(cfg: OELConfig) -> None:
    """teacher.model scores the student's token ids under the student's chat template: both must be
    the student's, or every log-prob would belong to another token or another prompt."""
    from transformers import AutoTokenizer

    if cfg.teacher.model is None:
        return
    trust = cfg.model.trust_remote_code
    student = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=trust)
    teacher = AutoTokenizer.from_pretrained(cfg.teacher.model, trust_remote_code=trust)
    differs = [what for what, same in (("vocabulary", student.get_vocab() == teacher.get_vocab()),
                                       ("chat template", student.chat_template == teacher.chat_template)) if not same]
    if differs:
        raise ConfigError(f"teacher.model: {cfg.teacher.model} has another {' and '.join(differs)} than model.path "
                          f"({cfg.model.path}); the teacher scores the student's tokens and prompts, so give a "
                          "teacher of the same family (same tokenizer and chat template) or unset teacher.model")


def ifeval_rows(cfg: OELConfig) -> list:
    """The OOD prompts, read and checked (every instruction known or skippable); [] when off or
    measured by lm-eval."""
    from oel_ray import ifeval

    if cfg.ood.ifeval in ("none", "lm_eval"):
        return []
    try:
        rows = ifeval.load_rows(cfg.ood.ifeval)
        ifeval.select_rows(rows, cfg.ood.unknown_instructions)
    except (OSError, ValueError) as err:
        raise ConfigError(f"ood.ifeval: {err}") from None
    return rows


def _check_lm_eval(cfg: OELConfig) -> None:
    """ood.ifeval=lm_eval: lm-eval, its vLLM backend and its IF-Eval data must be on this machine
    (a child process tries them offline, in seconds): otherwise every round would fail at its end."""
    from oel_ray.ifeval_lmeval import lm_eval_problem

    if cfg.ood.ifeval == "lm_eval" and (problem := lm_eval_problem()):
        raise ConfigError(f"ood.ifeval: lm_eval cannot run here: {problem}")


def _longest_game(cfg: OELConfig):
    """A game of the configured env played as long as it lasts (up to env.max_turns - 1 moves):
    its last prompt is the longest history the policy will see. The env's own errors for bad
    kwargs come out here as one line."""
    from oel_ray.games import Game

    spec = GameSpec(cfg.env.id, cfg.env.train_seed_offset, TRAIN, dict(cfg.env.kwargs))
    try:
        game = Game(spec, cfg.env.max_turns)
    except Exception as err:
        raise ConfigError(f"env.kwargs: {cfg.env.id} refused {dict(cfg.env.kwargs)} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); see conf/env/ for working values") from None
    moves = ["[up]", "[left]", "[down]", "[right]"]
    for turn in range(cfg.env.max_turns - 1):
        if game.done:
            break
        game.step(moves[turn % 4], 1)
    return game


def _check_prompt_room(cfg: OELConfig, game) -> None:
    """The teacher's prompt (longest history + knowledge at its cap) plus a full reply must fit the
    context; the student's is shorter. Raise naming the numbers and the knobs."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from oel_ray.prompts import chat_ids, teacher_messages

    if game.done:  # the game ended before the cap: its history up to the end is the longest
        prompt = game.turns[-1].prompt
    else:
        prompt = game.prompt()
    tok = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    hf_logging.set_verbosity_error()  # sizing a too-long prompt is the point: no length warning
    filler_tokens = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    knowledge = FILLER * max(1, cfg.extractor.max_knowledge_tokens // max(1, filler_tokens))
    system, user = teacher_messages(prompt, knowledge, cfg.teacher.knowledge_position)
    prompt_tokens = len(chat_ids(tok, user, system=system, thinking=cfg.model.thinking))
    need = prompt_tokens + cfg.rollout.max_response_tokens
    if need > cfg.model.max_model_len:
        raise ConfigError(
            f"model.max_model_len: {cfg.model.max_model_len} is too small: the teacher's longest prompt "
            f"({prompt_tokens} tokens, with extractor.max_knowledge_tokens={cfg.extractor.max_knowledge_tokens}) "
            f"plus rollout.max_response_tokens={cfg.rollout.max_response_tokens} needs {need}; raise "
            "model.max_model_len or lower those two")
