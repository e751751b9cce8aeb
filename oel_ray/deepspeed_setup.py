"""What DeepSpeed runs for a learner rank: its import (no JIT compile on CPU), its config, the
model load (partitioned from the start under ZeRO-3), and the module whose forward is the whole
loss (the model and the distillation loss, so the engine owns every parameter it touches)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from oel_ray import batching, losses
from oel_ray.config import BFLOAT16, FLOAT16, LearnerConfig
from oel_ray.strategy import FORWARD_KL, FULL_REVERSE_KL, TOPK_REVERSE_KL, scores_sampled_tokens


def name_the_accelerator() -> None:
    """Tell DeepSpeed it runs on the CPU where there is no GPU, before anything imports it (transformers
    does, saving a model): left to detect it, DeepSpeed warns that it could not find a GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed():
    """Import DeepSpeed so that `init_distributed` skips its ~60-100 s JIT compile on CPU: the
    `deepspeed_shm_comm` op it builds only serves `inference_all_reduce` (training never calls it;
    gloo does every collective), so we mark it incompatible in DeepSpeed's per-process op table."""
    name_the_accelerator()
    import deepspeed
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


# The support losses, by name; full_reverse_kl takes the teacher's hidden states instead.
SUPPORT_LOSSES = {TOPK_REVERSE_KL: losses.topk_reverse_kl_from_hidden,
                  FORWARD_KL: losses.topk_forward_kl_from_hidden}


class DistillModule(torch.nn.Module):
    """The causal LM plus the loss, so DeepSpeed's engine runs the whole forward.

    The output head is applied chunk by chunk inside the loss (never the full [B, T, V] logits);
    under ZeRO-3 its weight is registered as an external parameter of this module so DeepSpeed
    gathers it for the whole forward and backward. The frozen teacher copy of full_reverse_kl is
    not part of this module (DeepSpeed would shard, save and optimise it): its hidden states and
    head come in as inputs.
    """

    chunk_tokens = 1024  # positions per logits chunk: peak fp32 ~ 3 x chunk_tokens x V floats

    def __init__(self, model, cfg: LearnerConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, input_ids, gather_idx, mask, num_units, loss, support=None, teacher_lp=None,
                teacher_hidden=None, teacher_head=None, shared=None):
        """input_ids / gather_idx / shared: one per length bucket (see `batching.plan_step`,
        `batching.shared_starts`); the rows of the other inputs are the buckets' rows one after another."""
        shared = shared or (0,) * len(input_ids)
        hidden = torch.cat([batching.response_hidden(self.model, ids, idx, shared=s)
                            for ids, idx, s in zip(input_ids, gather_idx, shared)])
        weight = self.model.get_output_embeddings().weight
        kw = dict(temperature=self.cfg.temperature, aggregation=self.cfg.aggregation,
                  chunk_tokens=self.chunk_tokens, num_units=num_units)
        if loss == FULL_REVERSE_KL:
            out = losses.full_reverse_kl_from_hidden(hidden, weight, teacher_hidden, teacher_head, mask, **kw)
        elif scores_sampled_tokens(loss):
            out = losses.sampled_reverse_kl_from_hidden(hidden, weight, support[..., 0], teacher_lp[..., 0],
                                                        mask, loss=loss, **kw)
        else:
            out = SUPPORT_LOSSES[loss](hidden, weight, support, teacher_lp, mask,
                                       renormalize=self.cfg.renormalize, tail=self.cfg.tail, **kw)
        return out.loss, out.kl, out.student_mass, out.teacher_mass


def ds_config(cfg: LearnerConfig, world_size: int, overrides: Optional[dict] = None) -> dict:
    """The DeepSpeed config of a learner rank, with `overrides` (tests, benchmarks) merged in."""
    micro = cfg.batch_size // (cfg.grad_accum * world_size)
    config = {
        "train_batch_size": micro * cfg.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == BFLOAT16},
        "fp16": {"enabled": cfg.dtype == FLOAT16},
        "steps_per_print": 1 << 30,
    }
    return merge(config, overrides or {})


def load_model(path: str, dtype: torch.dtype, ds_config: dict):
    """The causal LM at `path`. Under ZeRO-3 it is built inside DeepSpeed's `zero.Init`, which
    transformers does while an `HfDeepSpeedConfig` is alive: each rank allocates only its partition
    and rank 0 copies each layer in from the checkpoint while that layer is gathered, so no rank
    ever holds the whole model. The config is dropped after the load (transformers only holds a
    weak reference), so nothing built later in this process is partitioned."""
    from transformers import AutoModelForCausalLM

    if ds_config["zero_optimization"]["stage"] != 3:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while from_pretrained reads it)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
