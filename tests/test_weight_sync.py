"""After a learner step, the rollout worker generates with the learner's new weights: for a fixed
sequence the vLLM engine's log-probs match the learner's (tied embeddings included)."""

import numpy as np
import pytest
import ray as _ray  # noqa: F401  (the fixture hands out the module)

from oel_ray.config import LearnerConfig, ModelConfig
from oel_ray.engine import Sampling

BF16_TOL = 2e-2  # bf16 keeps ~3 significant digits; this model runs fp32 and agrees far closer


@pytest.fixture(scope="module")
def roles(ray_cluster, tiny_model):
    from oel_ray.learner import LearnerGroup
    from oel_ray.rollout import RolloutGroup
    from oel_ray.teacher import start_teacher

    workers = RolloutGroup(ModelConfig(path=tiny_model, build=None), num_workers=1, seed=0, max_logprobs=64,
                           kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    teacher = start_teacher(tiny_model, num_cpus=0.5, num_gpus=0, dtype="float32", temperature=1.0,
                            chunk_tokens=64, batch_tokens=4096)
    cfg = LearnerConfig(lr=5e-2, batch_size=4, zero_stage=2, support_k=64, temperature=1.0, dtype="float32")
    learner = LearnerGroup(cfg, tiny_model, num_cpus=0.5)
    return workers, teacher, learner


def test_worker_matches_learner_after_a_step(roles):
    from oel_ray.types import DistillSample

    workers, teacher, learner = roles
    fixed = list(range(3, 60))
    before = workers.workers[0].prompt_logprobs.remote(fixed)
    before = _ray.get(before)
    np.testing.assert_allclose(before, learner.sequence_logprobs(fixed), atol=1e-4)

    prompts = [[5, 6, 7, 8 + i] for i in range(4)]
    replies = workers.generate(prompts, Sampling(max_tokens=16, temperature=1.0, support_k=64, seed=1))
    # A teacher whose context differs from the student's, so the KL is far from zero.
    samples = [DistillSample(p, p[::-1] + [9, 9], g.token_ids, g.topk_ids) for p, g in zip(prompts, replies)]
    scores = _ray.get(teacher.score.remote(samples))
    learner.train_step(samples, scores, 1)
    workers.load_weights(learner.state_dict_ref(), version=1)

    after_engine = _ray.get(workers.workers[0].prompt_logprobs.remote(fixed))
    after_learner = learner.sequence_logprobs(fixed)
    assert np.abs(after_learner - before).max() > 10 * BF16_TOL, "the step should move the log-probs"
    np.testing.assert_allclose(after_engine, after_learner, atol=BF16_TOL)
    assert np.abs(after_engine - after_learner).max() < 1e-4  # fp32 end to end: far inside bf16


def test_embedding_update_reaches_the_tied_head(roles, tiny_model):
    """Only the embeddings change: a stale tied output head would show up at once."""
    import torch

    workers, _, _ = roles
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = load_file(f"{tiny_model}/model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 1.5
    workers.load_weights(_ray.put(weights), version=2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference.load_state_dict(weights, strict=False)
    fixed = list(range(3, 40))
    with torch.no_grad():
        lp = torch.log_softmax(reference(torch.tensor([fixed])).logits[0], -1)
    expected = lp[:-1].gather(1, torch.tensor(fixed[1:])[:, None])[:, 0].numpy()
    got = _ray.get(workers.workers[0].prompt_logprobs.remote(fixed))
    np.testing.assert_allclose(got, expected, atol=1e-4)
