"""Extractor: turns trajectories into accumulated experiential knowledge, over N independent chains.

knowledge_i = truncate_L(knowledge_{i-1} + extract(trajectory_i, knowledge_{i-1})). Chains differ in
trajectory order and sampling seed and are independent, so each accumulation step sends every
chain's prompt at once, spread over the generation engines. The prompts of an engine that dies are
answered by the live ones, with their own seeds: the knowledge is what an undisturbed run writes.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import replace
from typing import Callable, Optional

import ray

from oel_ray.config import PER_STEP, ExtractorConfig
from oel_ray.endpoint import ChatEndpoint
from oel_ray.prompts import THINK_CLOSE, THINK_OPEN, chat_ids, extraction_prompt, trajectory_parts, trajectory_text
from oel_ray.rollout import generate_on
from oel_ray.seeds import chain_order_seed, chain_sampling_seed
from oel_ray.types import KnowledgeSnapshot, Sampling, Trajectory

log = logging.getLogger("oel_ray")
ITEM_LINE = re.compile(r"^\s*-+\s*EXPERIENCE ITEM:", re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Only the answer of a thinking model: what follows the last </think> (nothing if unclosed)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].strip()
    return "" if THINK_OPEN in text else text.strip()


def without_reasoning(traj: Trajectory) -> Trajectory:
    """The game with each reply cut to its answer (`strip_reasoning`): extractor.keep_reasoning=false."""
    return replace(traj, turns=[replace(turn, response=strip_reasoning(turn.response)) for turn in traj.turns])


def keep_items(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if ITEM_LINE.match(line)]


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def truncate_tokens(text: str, max_tokens: int, tokenizer, keep: str = "newest") -> str:
    """At most max_tokens tokens of `text`: its newest (last) ones, or with keep="oldest" its first.
    Decoding a cut and encoding it again can merge or split tokens at the cut, so the result is
    counted again and cut deeper until it fits."""
    limit = max(0, max_tokens)
    ids = token_ids(tokenizer, text)
    cut, count = limit, len(ids)
    while count > limit:
        part = ids[len(ids) - cut:] if keep == "newest" else ids[:cut]
        text = tokenizer.decode(part).lstrip() if keep == "newest" else tokenizer.decode(part).rstrip()
        count = len(token_ids(tokenizer, text))
        cut -= 1
    return text


def truncate_items(items: list[str], max_tokens: int, tokenizer) -> list[str]:
    """The newest whole items whose total length fits in max_tokens. If the newest item alone is
    longer, its beginning (where the item marker is) cut to max_tokens: never nothing."""
    kept, total = [], 0
    for item in reversed(items):
        total += len(token_ids(tokenizer, item + "\n"))
        if total > max_tokens:
            break
        kept.append(item)
    if not kept and items:
        return [truncate_tokens(items[-1], max_tokens, tokenizer, keep="oldest")]
    return kept[::-1]


def fit_trajectory(traj: Trajectory, max_tokens: int, tokenizer) -> str:
    """The extractor's trajectory text in about max_tokens: the summary and the newest turns that fit
    whole; older turns are left out, which loses little, since each turn's observation lists every
    earlier board and move. If not even the newest turn fits, its beginning is kept. The summary
    always stays, whatever its length."""
    *turns, summary = trajectory_parts(traj)
    note = "(Turns 1 to {} are left out for length; the observations below list their moves.)"
    room = max_tokens - len(token_ids(tokenizer, f"{note.format(len(turns))}\n\n{summary}"))
    kept: list[str] = []
    for turn in reversed(turns):
        need = len(token_ids(tokenizer, turn + "\n\n"))
        if need > room:
            break
        kept.insert(0, turn)
        room -= need
    if not kept and turns and room > 0:
        kept = [truncate_tokens(turns[-1], room, tokenizer, keep="oldest") + " [...]"]
    left_out = len(turns) - len(kept)
    return "\n\n".join(([note.format(left_out)] if left_out and kept else []) + kept + [summary])


def shrink_to_fit(render: Callable[[int], str], length: Callable[[str], int], budget: int, size: int) -> str:
    """render(n) for the largest n <= size, stepping down, whose length is within budget; render(0)
    if none is."""
    text = render(size)
    while (over := length(text) - budget) > 0 and size > 0:
        size = max(0, size - over)
        text = render(size)
    return text


def chain_orders(trajectories: list[Trajectory], k: int, num_chains: int, seed: int,
                 round: int, per_step: bool = False) -> list[list[Trajectory]]:
    """Each chain's k trajectories in reading order. per_step (extractor.trajectories): chain c reads
    its own games of maps 0..k-1, which the collect stage played map after map, each once per chain
    in chain order (`driver.collect_specs`); pool: its own selection and order, new in every round."""
    if per_step:
        return [[trajectories[i * num_chains + c] for i in range(k)] for c in range(num_chains)]
    return [random.Random(chain_order_seed(seed, round, c)).sample(trajectories, k) for c in range(num_chains)]


def knowledge_set(chains: list[list[KnowledgeSnapshot]], use_step: int) -> tuple[list[str], int]:
    """The texts the teacher reads: each chain's knowledge at `use_step`, without the empty ones (a
    chain whose extractions had no items so far), and how many were left out for being empty."""
    texts = [chain[use_step].text for chain in chains]
    kept = [text for text in texts if text.strip()]
    return kept, len(texts) - len(kept)


class Extractor:
    """Runs the chains. `engines`: rollout-worker actors (the policy, or a worker holding the
    extractor's own model) fed token ids; or one ChatEndpoint fed messages.

    `context_length`: tokens of prompt and reply the engines take (default: asked from the rollout
    workers; None for an endpoint, whose prompts are sent whole). Each prompt is then cut to leave
    room for a full reply of extractor.max_response_tokens."""

    def __init__(self, cfg: ExtractorConfig, policy_path: str, engines: list, *, thinking: bool, seed: int,
                 context_length: Optional[int] = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.engines = list(engines)  # the live ones: a dead engine is dropped
        self.endpoint = engines[0] if engines and isinstance(engines[0], ChatEndpoint) else None
        # Knowledge length L is counted in the policy's tokens: the teacher (the policy) reads it.
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        chat_path = policy_path if cfg.model in ("policy",) or self.endpoint else cfg.model
        self.chat_tokenizer = self.tokenizer if chat_path == policy_path else AutoTokenizer.from_pretrained(chat_path)
        self.thinking = thinking
        self.seed = seed
        if context_length is None and engines and not self.endpoint:
            context_length = min(ray.get([e.context_length.remote() for e in engines]))
        self.prompt_budget = None if context_length is None else context_length - cfg.max_response_tokens

    def count_tokens(self, text: str) -> int:
        return len(token_ids(self.tokenizer, text))

    def accumulate(self, knowledge: str, reply: str) -> str:
        answer = strip_reasoning(reply)
        limit = self.cfg.max_knowledge_tokens
        if self.cfg.format == "structured":
            items = keep_items(knowledge) + keep_items(answer)
            return "\n".join(truncate_items(items, limit, self.tokenizer))
        merged = f"{knowledge}\n\n{answer}".strip() if answer else knowledge
        return truncate_tokens(merged, limit, self.tokenizer)

    def _append_raw(self, context: str, trajectory: str) -> str:
        return truncate_tokens(f"{context}\n\n{trajectory}".strip(), self.cfg.max_knowledge_tokens, self.tokenizer)

    def shown(self, traj: Trajectory) -> Trajectory:
        """The game as the extractor reads it: with the policy's reasoning, unless extractor.keep_reasoning=false."""
        return traj if self.cfg.keep_reasoning else without_reasoning(traj)

    def prompt(self, knowledge: str, traj: Trajectory) -> str:
        """The extraction prompt (showing `knowledge` when extractor.with_previous), short enough that a
        full reply still fits the engine's context:
        the trajectory gives way first (oldest turns), then, should the template, knowledge and
        summary alone be too long, the oldest knowledge shown."""
        template, tok = self.cfg.prompt, self.chat_tokenizer
        knowledge = knowledge if self.cfg.with_previous else ""
        traj = self.shown(traj)

        def length(text: str) -> int:
            return len(chat_ids(tok, text, thinking=self.thinking))

        text = extraction_prompt(template, knowledge, traj)
        if self.prompt_budget is None or length(text) <= self.prompt_budget:
            return text
        full = len(token_ids(tok, trajectory_text(traj)))
        text = shrink_to_fit(lambda n: extraction_prompt(template, knowledge, traj, fit_trajectory(traj, n, tok)),
                             length, self.prompt_budget, full)
        if length(text) <= self.prompt_budget:
            return text
        bare = fit_trajectory(traj, 0, tok)
        return shrink_to_fit(lambda n: extraction_prompt(template, truncate_tokens(knowledge, n, tok), traj, bare),
                             length, self.prompt_budget, len(token_ids(tok, knowledge)))

    def run(self, trajectories: list[Trajectory], chains: Optional[list[int]] = None, raw: bool = False,
            round: Optional[int] = None) -> list[list[KnowledgeSnapshot]]:
        """Snapshots per chain per step (step 0 is the empty start). `chains` picks a subset of the
        configured chains; chain c reads and samples exactly the same whichever others run with it.
        `round` (default: the round the trajectories were played in) makes each round's chain
        orders and sampling seeds new. `raw`: the paper's ablation: no extraction, each chain's
        context is the trajectories themselves, accumulated and truncated to L tokens the same way
        (newest kept)."""
        cfg = self.cfg
        chains = list(range(cfg.num_chains)) if chains is None else chains
        round = trajectory_round(trajectories) if round is None else round
        orders = chain_orders(trajectories, cfg.k, cfg.num_chains, self.seed, round, cfg.trajectories == PER_STEP)
        knowledge = {c: "" for c in chains}
        snapshots = {c: [KnowledgeSnapshot(c, 0, "", 0, [])] for c in chains}
        sampling = Sampling(max_tokens=cfg.max_response_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
        for step in range(cfg.k):
            if raw:
                replies = [trajectory_text(self.shown(orders[c][step])) for c in chains]
            else:
                texts = [self.prompt(knowledge[c], orders[c][step]) for c in chains]
                replies = self._generate(texts, sampling, [chain_sampling_seed(self.seed, round, c, step) for c in chains])
            for c, reply in zip(chains, replies):
                knowledge[c] = self._append_raw(knowledge[c], reply) if raw else self.accumulate(knowledge[c], reply)
                seeds_so_far = [t.seed for t in orders[c][: step + 1]]
                snapshots[c].append(
                    KnowledgeSnapshot(c, step + 1, knowledge[c], self.count_tokens(knowledge[c]), seeds_so_far))
        return [snapshots[c] for c in chains]

    def _generate(self, texts: list[str], sampling: Sampling, seeds: list[int]) -> list[str]:
        """One reply per text, in order: every engine gets one batched call per step, and the texts
        of an engine that dies go to the live ones (see rollout.generate_on)."""
        if self.endpoint:
            return self.endpoint.complete(texts, sampling, seeds)
        prompts = [chat_ids(self.chat_tokenizer, t, thinking=self.thinking) for t in texts]
        return [g.text for g in generate_on(self.engines, prompts, sampling, seeds, self._drop)]

    def _drop(self, engine, err: Exception) -> None:
        if engine in self.engines:
            self.engines.remove(engine)
            log.warning("an extraction engine died (%s); %d left, its chains go to them", type(err).__name__,
                        len(self.engines))
        if not self.engines:
            raise RuntimeError("every extraction engine has died; the run stops here and resumes from its "
                               "last finished stage when rerun") from err


def trajectory_round(trajectories: list[Trajectory]) -> int:
    rounds = {t.round for t in trajectories}
    if len(rounds) != 1:
        raise ValueError(f"trajectories from rounds {sorted(rounds)}: pass the extraction's round")
    return rounds.pop()
