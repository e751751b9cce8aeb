"""Extractor: turns trajectories into accumulated experiential knowledge, over N independent chains.

knowledge_i = truncate_L(knowledge_{i-1} + extract(trajectory_i, knowledge_{i-1})). Chains differ in
trajectory order and sampling seed and are independent, so each accumulation step sends every
chain's prompt at once, spread over the generation engines.
"""

from __future__ import annotations

import random
import re
from typing import Optional

import ray

from oel_ray.config import ExtractorConfig
from oel_ray.endpoint import ChatEndpoint
from oel_ray.engine import Sampling
from oel_ray.prompts import chat_ids, extraction_prompt, trajectory_text
from oel_ray.types import KnowledgeSnapshot, Trajectory

ITEM_LINE = re.compile(r"^\s*-+\s*EXPERIENCE ITEM:", re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Only the answer of a thinking model: what follows the last </think> (nothing if unclosed)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    return "" if "<think>" in text else text.strip()


def keep_items(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if ITEM_LINE.match(line)]


def truncate_items(items: list[str], max_tokens: int, count) -> list[str]:
    """Keep the newest whole items whose total length fits in max_tokens."""
    kept, total = [], 0
    for item in reversed(items):
        total += count(item + "\n")
        if total > max_tokens:
            break
        kept.append(item)
    return kept[::-1]


def truncate_tokens(text: str, max_tokens: int, tokenizer) -> str:
    """Keep the newest max_tokens tokens of free text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:]).lstrip()


def chain_orders(trajectories: list[Trajectory], k: int, num_chains: int, seed: int) -> list[list[Trajectory]]:
    """Each chain reads its own seeded selection and order of k trajectories."""
    return [random.Random(seed * 1000 + c).sample(trajectories, k) for c in range(num_chains)]


class Extractor:
    """Runs the chains. `engines`: rollout-worker actors (the policy, or a worker holding the
    extractor's own model) fed token ids; or one ChatEndpoint fed messages."""

    def __init__(self, cfg: ExtractorConfig, policy_path: str, engines: list, *, thinking: bool, seed: int):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.engines = engines
        self.endpoint = engines[0] if engines and isinstance(engines[0], ChatEndpoint) else None
        # Knowledge length L is counted in the policy's tokens: the teacher (the policy) reads it.
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        chat_path = policy_path if cfg.model in ("policy",) or self.endpoint else cfg.model
        self.chat_tokenizer = self.tokenizer if chat_path == policy_path else AutoTokenizer.from_pretrained(chat_path)
        self.thinking = thinking
        self.seed = seed

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def accumulate(self, knowledge: str, reply: str) -> str:
        answer = strip_reasoning(reply)
        limit = self.cfg.max_knowledge_tokens
        if self.cfg.format == "structured":
            items = keep_items(knowledge) + keep_items(answer)
            return "\n".join(truncate_items(items, limit, self.count_tokens))
        merged = f"{knowledge}\n\n{answer}".strip() if answer else knowledge
        return truncate_tokens(merged, limit, self.tokenizer)

    def _append_raw(self, context: str, trajectory: str) -> str:
        return truncate_tokens(f"{context}\n\n{trajectory}".strip(), self.cfg.max_knowledge_tokens, self.tokenizer)

    def run(self, trajectories: list[Trajectory], chains: Optional[list[int]] = None,
            raw: bool = False) -> list[list[KnowledgeSnapshot]]:
        """Snapshots per chain per step (step 0 is the empty start). `chains` picks a subset of the
        configured chains; chain c reads and samples exactly the same whichever others run with it.
        `raw`: the paper's ablation: no extraction, each chain's context is the trajectories
        themselves, accumulated and truncated to L tokens the same way (newest kept)."""
        cfg = self.cfg
        chains = list(range(cfg.num_chains)) if chains is None else chains
        orders = chain_orders(trajectories, cfg.k, cfg.num_chains, self.seed)
        knowledge = {c: "" for c in chains}
        snapshots = {c: [KnowledgeSnapshot(c, 0, "", 0, [])] for c in chains}
        sampling = Sampling(max_tokens=cfg.max_response_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
        for step in range(cfg.k):
            if raw:
                replies = [trajectory_text(orders[c][step]) for c in chains]
            else:
                texts = [extraction_prompt(cfg.prompt, knowledge[c], orders[c][step]) for c in chains]
                seeds = [(self.seed * 1_000_003 + c * 10_007 + step) % 2**31 for c in chains]
                replies = self._generate(texts, sampling, seeds)
            for c, reply in zip(chains, replies):
                knowledge[c] = self._append_raw(knowledge[c], reply) if raw else self.accumulate(knowledge[c], reply)
                seeds_so_far = [t.seed for t in orders[c][: step + 1]]
                snapshots[c].append(
                    KnowledgeSnapshot(c, step + 1, knowledge[c], self.count_tokens(knowledge[c]), seeds_so_far))
        return [snapshots[c] for c in chains]

    def _generate(self, texts: list[str], sampling: Sampling, seeds: list[int]) -> list[str]:
        """Chain c goes to engine c mod E: every engine gets one batched call per step."""
        if self.endpoint:
            return self.endpoint.complete(texts, sampling, seeds)
        prompts = [chat_ids(self.chat_tokenizer, t, thinking=self.thinking) for t in texts]
        n = min(len(self.engines), len(prompts))
        refs = [self.engines[e].generate.remote(prompts[e::n], sampling, seeds[e::n]) for e in range(n)]
        shards = ray.get(refs)
        return [shards[c % n][c // n].text for c in range(len(prompts))]
