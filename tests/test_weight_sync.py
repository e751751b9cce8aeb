"""After a learner step, the rollout worker generates with the learner's new weights: for a fixed
sequence the vLLM engine's log-probs match the learner's (tied embeddings included), through both
transports of oel_ray.weight_sync. The collective transport runs here over gloo with the exact
packing and streaming code the GPU path (nccl) uses."""

import inspect

import numpy as np
import pytest
import ray as _ray  # noqa: F401  (the fixture hands out the module)

from oel_ray.types import Sampling
from oel_ray.weight_sync import TensorMeta, buckets

BF16_TOL = 2e-2  # bf16 keeps ~3 significant digits; this model runs fp32 and agrees far closer


@pytest.fixture(scope="module")
def roles(ray_cluster, tiny_model, tmp_path_factory):
    from distill_setup import distill_config

    from oel_ray.roles import build_roles

    cfg = distill_config(tiny_model, str(tmp_path_factory.mktemp("sync")), steps=1, batch=4, lr=5e-2, support_k=64,
                         rollout={"temperature": 1.0}, teacher={"chunk_tokens": 64, "batch_tokens": 4096})
    roles = build_roles(cfg)
    yield roles.workers, roles.teacher, roles.learner
    roles.shutdown()  # free the engines' memory for the next test modules


def take_a_step(workers, teacher, learner, step):
    from oel_ray.types import DistillSample

    prompts = [[5, 6, 7, 8 + i] for i in range(4)]
    replies = workers.generate(prompts, Sampling(max_tokens=16, temperature=1.0, support_k=64, seed=step))
    # A teacher whose context differs from the student's, so the KL is far from zero.
    samples = [DistillSample(p, p[::-1] + [9, 9], g.token_ids, g.topk_ids) for p, g in zip(prompts, replies)]
    learner.train_step(teacher.score(samples), step)


# "gloo": the nccl transport's code on CPU tensors; 64 KiB buckets split the tiny model into several
# broadcasts, with the 256 KiB embedding larger than a bucket (sent alone).
@pytest.mark.parametrize("transport,bucket_mb", [("object_store", 256.0), ("gloo", 1 / 16)])
def test_worker_matches_learner_after_a_step(roles, transport, bucket_mb):
    from oel_ray.weight_sync import make_weight_sync

    workers, teacher, learner = roles
    fixed = list(range(3, 60))
    before = _ray.get(workers.workers[0].prompt_logprobs.remote(fixed))
    np.testing.assert_allclose(before, learner.sequence_logprobs(fixed), atol=1e-4)

    sync = make_weight_sync(transport, learner, workers, use_gpu=False, bucket_mb=bucket_mb, timeout_s=120)
    step = 1 if transport == "object_store" else 2
    take_a_step(workers, teacher, learner, step)
    seconds = sync.sync(version=step)
    sync.close()

    after_engine = _ray.get(workers.workers[0].prompt_logprobs.remote(fixed))
    after_learner = learner.sequence_logprobs(fixed)
    assert np.abs(after_learner - before).max() > 10 * BF16_TOL, "the step should move the log-probs"
    np.testing.assert_allclose(after_engine, after_learner, atol=BF16_TOL)
    assert np.abs(after_engine - after_learner).max() < 1e-4  # fp32 end to end: far inside bf16
    assert 0 < seconds < 30 and sync.transport == transport
    print(f"weight sync {transport}: {seconds * 1e3:.1f} ms")


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


def test_bucket_plan():
    metas = [TensorMeta("a", "float32", (4, 4)), TensorMeta("b", "float32", (8,)), TensorMeta("c", "bfloat16", (8,)),
             TensorMeta("d", "bfloat16", (100,)), TensorMeta("e", "bfloat16", (2,))]
    plan = [[m.name for m in b] for b in buckets(metas, bucket_bytes=96)]
    # one dtype per bucket, at most 96 bytes unless one tensor alone is larger, order kept
    assert plan == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [[m.name for m in b] for b in buckets(metas, bucket_bytes=1 << 20)] == [["a", "b"], ["c", "d", "e"]]
    assert metas[0].nbytes == 64 and metas[2].nbytes == 16


def test_nccl_transport_targets_the_installed_vllm_api():
    """The GPU transport cannot run here; at least the vLLM calls it makes must exist as used."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    assert {"host", "port", "rank", "world_size", "store_timeout"} <= set(
        inspect.signature(StatelessProcessGroup.create).parameters)
    assert {"group", "device"} <= set(inspect.signature(PyNcclCommunicator.__init__).parameters)
    assert {"tensor", "src", "stream"} <= set(inspect.signature(PyNcclCommunicator.broadcast).parameters)
    assert callable(PyNcclCommunicator.destroy)


def test_transport_choice():
    from omegaconf import OmegaConf

    from oel_ray.config import OELConfig
    from oel_ray.errors import ConfigError
    from oel_ray.validate import validate
    from oel_ray.weight_sync import resolve

    def config(weight_sync: str):  # the schema's defaults, interpolations resolved as Hydra would
        raw = OmegaConf.merge(OmegaConf.structured(OELConfig),
                              {"output_dir": "unused", "learner": {"weight_sync": weight_sync}})
        return OmegaConf.to_object(raw)

    assert resolve("auto", use_gpu=False) == "object_store" and resolve("auto", use_gpu=True) == "nccl"
    assert validate(config("auto")).learner.weight_sync == "auto"
    with pytest.raises(ConfigError, match=r"^learner.weight_sync: nccl needs GPUs"):
        validate(config("nccl"))
    with pytest.raises(ConfigError, match=r"^learner.weight_sync: 'shm' is not one of auto, object_store, nccl"):
        validate(config("shm"))
