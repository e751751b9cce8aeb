"""The consolidation work every system runs, and what each reports back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Work:
    """On-policy context distillation, step by step: the student samples a reply to its prompt
    (no knowledge), the frozen teacher scores that reply after its own prompt (knowledge in
    context), one AdamW step on the token-mean reverse KL."""

    model_path: str
    batches: list[list[tuple[list[int], list[int]]]]  # per step: (student prompt ids, teacher prompt ids)
    max_new_tokens: int
    temperature: float
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    stop_ids: list[int]
    pad_id: int
    seed: int = 0
    warmup_steps: int = 1  # run first, not timed: lazy initialisation, allocator, first-call costs


@dataclass
class Run:
    """One system's timed steps (the warm-up steps are left out)."""

    system: str
    batch_size: int
    step_seconds: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)  # generated tokens per timed step

    @property
    def samples_per_s(self) -> float:
        return self.batch_size * len(self.step_seconds) / sum(self.step_seconds)

    @property
    def response_tokens_per_s(self) -> float:
        return sum(self.response_tokens) / sum(self.step_seconds)

    def to_json(self) -> dict:
        return {"system": self.system, "batch_size": self.batch_size, "samples_per_s": round(self.samples_per_s, 2),
                "response_tokens_per_s": round(self.response_tokens_per_s, 1),
                "step_seconds": [round(s, 4) for s in self.step_seconds], "response_tokens": self.response_tokens}


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, W], padded on the left so every prompt ends where generation starts."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding shifts them)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask(completion: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on generated tokens up to and including the first stop token, 0 on the padding after it."""
    stops = torch.isin(completion, torch.tensor(stop_ids, device=completion.device)).long()
    return ((stops.cumsum(-1) - stops) == 0).long()


def step_clock(run: Run, warmup_steps: int):
    """A Trainer callback adding to `run.step_seconds` the wall time from one optimizer step's end to
    the next (data, generation, loss, step), after the first `warmup_steps` steps."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last = None

        def on_step_begin(self, args, state, control, **kw):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if state.global_step > warmup_steps:
                run.step_seconds.append(now - self.last)
            self.last = now

    return StepClock()


def train_quietly(trainer) -> None:
    """`trainer.train()` without the dict of metrics a Trainer whose progress bar is off prints after
    each log (PrinterCallback): the benchmark reports its own timings, and `make bench` stays readable."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
