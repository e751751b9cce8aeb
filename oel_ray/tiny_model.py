"""The embedded default model: a tiny Qwen3-architecture LM and a BPE tokenizer, built offline.

No hub is reachable on CPU machines, so the project builds its own checkpoint, deterministically
(fixed seeds, single thread), and saves it with `save_pretrained`; from then on it is loaded by the
same code path as a real checkpoint such as Qwen/Qwen3-4B-Instruct-2507.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

# Training a BPE in-process leaves Rust worker threads that slow later torch work ~15x.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Qwen-style chat template: ChatML turns; earlier assistant turns keep only their answer (as Qwen3
# does); `enable_thinking=False` pre-fills an empty reasoning block like Qwen3's hybrid models.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

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
SEED = 1234


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    """Game-like text so the BPE learns boards, actions, prompts and knowledge items."""
    moves = ["[up]", "[down]", "[left]", "[right]"]
    words = ("you are the player P on a grid reach the goal box push wall hole ice move step "
             "current board action in square brackets experience item avoid walls first then "
             "success failure the game ended turn limit reached invalid move reason previous "
             "knowledge rule strategy always never before after left right up down").split()
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.35:
            size = rng.choice([3, 4, 6])
            rows = [" ".join(rng.choice("#_OXP√F HG") for _ in range(size)) for _ in range(size)]
            out.append("Current Board:\n" + "\n".join(rows))
        elif kind < 0.6:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + " " + rng.choice(moves))
        elif kind < 0.8:
            out.append("- EXPERIENCE ITEM: " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
        else:
            out.append(f"Turn {rng.randint(1, 5)}: action {rng.choice(moves)} -> " + rng.choice(words))
    return out


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(SEED)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(rng), trainer=trainer)
    # Constructor arguments, not attributes: attributes set afterwards are not saved (transformers 5).
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=TINY_ARCH["max_position_embeddings"],
    )
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(path: str | os.PathLike) -> Path:
    """Build the tiny checkpoint at `path` unless it is already there; returns the path.

    Written to a temporary sibling directory and renamed, so an interrupted build never leaves a
    half-written checkpoint that a later run would trust.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    path = Path(path).expanduser()
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        tok = build_tokenizer(tmp)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        pad = tok.convert_tokens_to_ids("<|endoftext|>")
        config = Qwen3Config(
            vocab_size=len(tok), bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
            dtype="float32", **TINY_ARCH,
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(SEED)
            model = Qwen3ForCausalLM(config)
        finally:
            torch.set_num_threads(threads)
        model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(path)
        except OSError:  # another process built it first: keep theirs
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/oel_ray/tiny-qwen3"))
