"""Extractor: turns trajectories into accumulated experiential knowledge, over N independent chains.

knowledge_i = truncate_L(knowledge_{i-1} + extract(trajectory_i, knowledge_{i-1})). Chains differ in
trajectory order and sampling seed and are independent, so each accumulation step sends every
chain's prompt at once, spread over the generation engines.
"""

from __future__ import annotations

import random
import re

import ray

from oel_ray.config import ExtractorConfig
from oel_ray.engine import Sampling
from oel_ray.prompts import chat_ids, extraction_prompt
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


class Extractor:
    def __init__(self, cfg: ExtractorConfig, model_path: str, engines: list, *, thinking: bool, seed: int):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.engines = engines  # actors with .generate(prompts, sampling): the policy's or its own
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
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

    def run(self, trajectories: list[Trajectory]) -> list[list[KnowledgeSnapshot]]:
        """Snapshots per chain per step (step 0 is the empty start)."""
        cfg = self.cfg
        orders = [random.Random(self.seed * 1000 + c).sample(trajectories, cfg.k) for c in range(cfg.num_chains)]
        knowledge = [""] * cfg.num_chains
        snapshots = [[KnowledgeSnapshot(c, 0, "", 0, [])] for c in range(cfg.num_chains)]
        for step in range(cfg.k):
            prompts = [
                chat_ids(self.tokenizer, extraction_prompt(cfg.prompt, knowledge[c], orders[c][step]),
                         thinking=self.thinking)
                for c in range(cfg.num_chains)
            ]
            sampling = Sampling(max_tokens=cfg.max_response_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k, seed=self.seed * 1000 + step)
            for c, reply in enumerate(self._generate(prompts, sampling)):
                knowledge[c] = self.accumulate(knowledge[c], reply)
                seeds = [t.seed for t in orders[c][: step + 1]]
                snapshots[c].append(
                    KnowledgeSnapshot(c, step + 1, knowledge[c], self.count_tokens(knowledge[c]), seeds)
                )
        return snapshots

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[str]:
        """Chain c goes to engine c mod E: every engine gets one batched call per step."""
        n = len(self.engines)
        refs = [self.engines[e].generate.remote(prompts[e::n], sampling) for e in range(min(n, len(prompts)))]
        shards = ray.get(refs)
        return [shards[c % n][c // n].text for c in range(len(prompts))]
