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

    from oel_ray.config import OELConfig
    from oel_ray.validate import validate

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
    """The roles of `cfg` (one vLLM rollout worker, the teacher server and a DeepSpeed learner on half
    a CPU each), plus the tokenizer and two local float32 copies of the initial model (a frozen
    teacher, and a student to load the learner's weights into). Yields (roles, tokenizer, frozen,
    student). The roles are those a run or test before left running where they would be built
    alike, brought to the initial model, as a sweep's next job takes them over (session.py), else
    new (session.start_roles); they are left running for the next on exit, or stopped if the test
    failed inside."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oel_ray import session

    roles = session.start_roles(cfg)
    try:
        path = cfg.model.path
        tokenizer = AutoTokenizer.from_pretrained(path)
        frozen = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield roles, tokenizer, frozen, student
    except BaseException:
        roles.shutdown()
        raise
    session.keep_roles(cfg, roles)
