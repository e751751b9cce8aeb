"""What the consolidation tests on real roles share: a knowledge text that moves the tiny model,
and a validated config around it."""

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
