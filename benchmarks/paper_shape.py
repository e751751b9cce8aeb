"""The paper's consolidation step on random-initialised models: what the consolidation benchmark and
the GPU check run where no real checkpoint can be loaded.

The step's cost is its shape: 64 samples, teacher prompts carrying one of 10 knowledge texts of
L = 2048 tokens, student prompts of a few hundred tokens, replies of up to 128 (`teacher.Step`).
Random weights carry it as well as trained ones, and a random model's replies run to the token
limit, as most of the paper's long replies do. The prompts are random lowercase words in oel_ray's
BPE, so the roles meet them as text, the way they meet a run's prefixes and knowledge.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch

# Larger than tiny (hidden 128, 4 layers) and small enough that every system of the consolidation
# benchmark can run a few paper-shaped steps on 2 cores: ~3M parameters. "mid" (~20M without a large
# vocabulary) is the teacher benchmark's MID_ARCH with oel_ray's vocabulary.
SMALL_ARCH = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64)
# ~48M parameters with oel_ray's vocabulary, nearly all of them in the layers (the compute of a model
# that size, not of its embeddings): a paper-shaped step takes minutes per system on 2 cores, so it is
# measured by hand, outside `make bench` (benchmarks/consolidation.py, workload paper-large). Wide
# and shallow: the baselines hold a batch of 64 at once, and 8 layers of 768 (55M) took TRL's
# GKDTrainer past a 23 GiB machine's memory; 4 layers of 1024 keep a third fewer activations.
LARGE_ARCH = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64)


def build_random(arch: dict, out: Path, vocab: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")) -> Path:
    """A random-initialised Qwen3 of `arch`, saved with oel_ray's BPE, whose ids it uses. `vocab`: the
    output head's rows (default: the tokenizer's; a larger one costs what a real vocabulary costs,
    its extra rows never prompted)."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from oel_ray.tiny_model import build_tokenizer

    tok = build_tokenizer(out)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    config = Qwen3Config(**{"tie_word_embeddings": True, "max_position_embeddings": 8192, **arch,
                            "vocab_size": vocab or len(tok), "bos_token_id": pad, "eos_token_id": eos,
                            "pad_token_id": pad})
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out, safe_serialization=True)
    return out


def words(tok, n: int, rng: random.Random) -> str:
    """Random lowercase words, `n` tokens of `tok` (give or take the merges of re-encoding)."""
    text = ""
    while len(ids := tok(text, add_special_tokens=False)["input_ids"]) < n:
        text += " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(32)) + " "
    return tok.decode(ids[:n])


def paper_prompts(tok, step, steps: int, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    """`steps` batches of `step.batch` student prompts (`step.situation` tokens each) and the
    `step.distinct` knowledge texts (`step.knowledge` tokens each) their teacher prompts draw from."""
    rng = random.Random(seed)
    knowledge = [words(tok, step.knowledge, rng) for _ in range(step.distinct)]
    return [[words(tok, step.situation, rng) for _ in range(step.batch)] for _ in range(steps)], knowledge
