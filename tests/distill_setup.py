"""What the consolidation tests on real roles share: a knowledge text that moves the tiny model,
a validated config around it, and the roles themselves."""

import contextlib

# Experience items as the extractor writes them. In the tiny model's context this text shifts the
# teacher's replies: ~0.03 nats per token of reverse KL against the prefix alone on held-out
# prefixes (a single short generic item gave ~0.0003, too little to measure a reduction against).
KNOWLEDGE = (
    "-- EXPERIENCE ITEM: Walls block moves; pushing a box into a corner loses the game.\n"
    "-- EXPERIENCE ITEM: Move [up] when the box is above you, then keep pushing [up].\n"
    "-- EXPERIENCE ITEM: Think about the goal O before every move and answer with one action.\n"
) * 4


def distill_config(tiny_model: str, out: str, *, steps: int, batch: int, lr: float, support_k: int = 256,
                   **sections):
    """The tiny model, temperature 0.7, 48-token replies, ZeRO-2, object-store weight sync; `sections`
    ({"env": {...}, "consolidation": {...}}) are merged on top."""
    from omegaconf import OmegaConf

    from oel_ray.config import OELConfig, validate

    raw = OmegaConf.merge(OmegaConf.structured(OELConfig), OmegaConf.create({
        "output_dir": out, "seed": 0,
        "model": {"path": tiny_model, "build": None},
        "rollout": {"temperature": 0.7, "max_response_tokens": 48},
        "teacher": {"knowledge_position": "user"},
        "learner": {"steps": steps, "batch_size": batch, "lr": lr, "zero_stage": 2, "support_k": support_k,
                    "weight_sync": "object_store"},
    }), OmegaConf.create(sections))
    return validate(OmegaConf.to_object(raw))


@contextlib.contextmanager
def distill_roles(cfg, ray):
    """One vLLM rollout worker, the teacher server and a DeepSpeed learner for `cfg` on half a CPU
    each, plus the tokenizer and two local float32 copies of the initial model (a frozen teacher, and
    a student to load the learner's weights into). Yields (roles, tokenizer, frozen, student); the
    actors are stopped on exit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oel_ray.consolidate import Roles
    from oel_ray.learner import LearnerGroup
    from oel_ray.rollout import RolloutGroup
    from oel_ray.teacher import start_teacher

    path = cfg.model.path
    workers = RolloutGroup(cfg.model, num_workers=1, seed=0, max_logprobs=cfg.learner.support_k, kv_cache_gib=1,
                           gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    teacher = start_teacher(path, num_cpus=0.5, num_gpus=0, dtype="float32", temperature=cfg.learner.temperature,
                            chunk_tokens=1024, batch_tokens=8192)
    learner = LearnerGroup(cfg.learner, path, num_cpus=0.5)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        frozen = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield Roles(workers=workers, teacher=teacher, learner=learner), tokenizer, frozen, student
    finally:
        learner.shutdown()
        for actor in [teacher, *workers.workers]:
            ray.kill(actor)
