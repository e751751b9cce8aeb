"""Model FLOPs of a Qwen3-style decoder and the machine's matmul peak, for the "fraction of peak"
(MFU) figures of the benchmarks.

FLOPs count the matrix products only (2 per multiply-add): the layers' projections and MLP, the
attention scores and their weighted sum over the keys each position attends to (causal), and the
output head where it is applied. Norms, activations and softmax are left out, as in the usual MFU
accounting, so the figures are comparable with other trainers' reports. A backward pass is twice
its forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

# Dense bf16 matmul peak by the vendor's datasheet (the SXM parts), FLOP/s: the reference line.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Arch":
        """From a Hugging Face Qwen3 (or Llama-like) config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size)

    @property
    def layer_params(self) -> int:
        """Weights of one layer's matrix products (q, k, v, o projections and the gated MLP)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """Matrix-product weights of the whole model, the output head included once."""
        return self.layers * self.layer_params + self.hidden * self.vocab

    def forward(self, new: int, past: int = 0, head: Optional[int] = None) -> float:
        """One sequence's forward FLOPs: `new` positions after `past` cached ones, the output head
        applied at `head` positions (default all `new`)."""
        attended = (past + new) * (past + new + 1) // 2 - past * (past + 1) // 2  # keys seen, summed
        layers = 2 * self.layer_params * new + 4 * self.heads * self.head_dim * attended
        return float(self.layers * layers + 2 * self.hidden * self.vocab * (new if head is None else head))

    # The three stages of a consolidation step, per sample, as a plain implementation runs them (every
    # prompt in full: what prefix caches skip counts as done, so the figures compare systems doing the
    # same work however they do it).

    def generation(self, prompt: int, reply: int) -> float:
        """Prefill `prompt` (the head at its last position), then decode `reply` tokens on the cache."""
        return self.forward(prompt, head=1) + self.forward(max(reply - 1, 0), prompt)

    def scoring(self, prompt: int, reply: int) -> float:
        """One forward pass over prompt + reply, the head at the reply's positions (the teacher)."""
        return self.forward(prompt + reply, head=reply)

    def training(self, prompt: int, reply: int) -> float:
        """`scoring`'s forward and its backward (twice the forward): the learner."""
        return 3 * self.scoring(prompt, reply)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args):
    """(fn(*args), its wall seconds), the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - start


def measured_peak(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on `device` (after warm-ups): the limit line every stage is
    measured against in the same run."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def datasheet_peak(device: torch.device) -> Optional[float]:
    """The datasheet's dense bf16 peak of this GPU, when it is one we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)
