"""The student's support comes from the real vLLM engine: at every reply position, the k ids it
returns are the model's own top-k (what the top-k reverse KL sums over), in order, not the sampled
token. Checked against the Hugging Face model on the same sequences."""

import numpy as np
import torch

K = 32


def test_support_ids_are_the_models_top_k(ray_cluster, tiny_model):
    from transformers import AutoModelForCausalLM

    from oel_ray.config import ModelConfig
    from oel_ray.rollout import RolloutGroup
    from oel_ray.types import Sampling

    workers = RolloutGroup(ModelConfig(path=tiny_model, build=None), num_workers=1, seed=0, max_logprobs=K,
                           kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    try:
        prompts = [[5, 6, 7, 8 + i, 40 + 3 * i] for i in range(4)]
        # Temperature 1.3 samples well outside the top-1, so a support holding the sampled token
        # instead of the top-k would show.
        replies = workers.generate(prompts, Sampling(max_tokens=24, temperature=1.3, support_k=K, seed=7))
    finally:
        workers.shutdown()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    positions = agree = 0
    for prompt, reply in zip(prompts, replies):
        assert reply.topk_ids.shape == (len(reply.token_ids), K)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reply.token_ids])).logits[0, len(prompt) - 1:-1]
        ranked = logits.argsort(-1, descending=True)[:, :K].numpy()
        for got, want, row in zip(reply.topk_ids, ranked, logits):
            positions += 1
            # Same set, same order, except where two logits are tied to within fp32 noise.
            gap = float((row[want[:-1]] - row[want[1:]]).min())
            agree += set(got.tolist()) == set(want.tolist()) and (np.array_equal(got, want) or gap < 1e-4)
    assert positions > 40
    assert agree / positions > 0.97, f"{agree}/{positions} positions with the model's top-{K}"


def test_cpu_engine_compiles_nothing(ray_cluster, tiny_model):
    """vLLM torch.compiles the rank count behind log-probs with inductor: a C++ build in the first
    call that asks for log-probs (14 s on a fresh 2-core machine, 4.5 s per process after). The
    CPU engine runs it eagerly: after a top-k generate and a prompt-log-prob call in a fresh
    process, dynamo has seen no frame at all."""
    import ray

    @ray.remote(num_cpus=0.5)
    def dynamo_counters(path: str) -> dict:
        from torch._dynamo.utils import counters

        from oel_ray.engine import VLLMEngine
        from oel_ray.types import Sampling

        engine = VLLMEngine(path, max_logprobs=K, max_model_len=256)
        reply = engine.generate([[5, 6, 7, 8]], Sampling(max_tokens=4, support_k=K, seed=1))[0]
        engine.prompt_logprobs([5, 6, 7, 8])
        return {"support": reply.topk_ids.shape, **{kind: dict(c) for kind, c in counters.items() if c}}

    seen = ray.get(dynamo_counters.remote(tiny_model))
    assert seen.pop("support")[1] == K
    assert seen == {}, f"torch.compile ran in the CPU engine: {seen}"
