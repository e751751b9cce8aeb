"""Knowledge extraction: accumulation order, truncation in tokens, the structured filter, the
reasoning strip, determinism, and extraction through real engines (Ray + vLLM, and vLLM's
OpenAI-compatible server as an endpoint extractor)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from oel_ray.config import ExtractorConfig, ModelConfig
from oel_ray.endpoint import ChatEndpoint
from oel_ray.engine import Sampling
from oel_ray.extractor import Extractor, chain_orders, keep_items, strip_reasoning, truncate_items
from oel_ray.prompts import extraction_prompt
from oel_ray.types import GameSpec, Trajectory, Turn

STRUCTURED = "Known:\n{knowledge}\n\nGame:\n{trajectory}"


def fake_trajectory(seed: int, passed: bool = False) -> Trajectory:
    turn = Turn(prompt=f"board {seed}", response="I go [up]", response_tokens=4, action="up", feedback="moved")
    return Trajectory("Sokoban-v0", seed, "train", 1, 0, [turn], "win" if passed else "loss",
                      1.0 if passed else 0.0, "done")


@pytest.fixture(scope="module")
def extractor(tiny_model):
    cfg = ExtractorConfig(format="structured", max_knowledge_tokens=40, prompt=STRUCTURED)
    return Extractor(cfg, tiny_model, [], thinking=False, seed=0)


def test_strip_reasoning_keeps_only_the_answer():
    assert strip_reasoning("<think>\nlong thoughts\n</think>\n\n- EXPERIENCE ITEM: x") == "- EXPERIENCE ITEM: x"
    assert strip_reasoning("<think>never closed") == ""
    assert strip_reasoning("plain answer") == "plain answer"


def test_structured_filter_keeps_only_item_lines():
    text = "Analysis first.\n- EXPERIENCE ITEM: push boxes from behind\n-- EXPERIENCE ITEM: avoid walls\nnoise"
    assert keep_items(text) == ["- EXPERIENCE ITEM: push boxes from behind", "-- EXPERIENCE ITEM: avoid walls"]


def test_truncation_counts_tokens_and_keeps_newest_whole_items(extractor):
    items = [f"- EXPERIENCE ITEM: lesson number {i} about walls" for i in range(8)]
    kept = truncate_items(items, 40, extractor.count_tokens)
    assert kept == items[-len(kept):] and 0 < len(kept) < len(items)
    assert sum(extractor.count_tokens(i + "\n") for i in kept) <= 40
    # Characters are not the unit: the kept text is far longer than 40 characters.
    assert len("\n".join(kept)) > 40


def test_accumulation_appends_in_order_and_bounds_by_tokens(extractor):
    knowledge = ""
    for i in range(6):
        knowledge = extractor.accumulate(knowledge, f"<think>hmm</think>\n- EXPERIENCE ITEM: rule {i}\njunk")
    lines = knowledge.splitlines()
    assert lines == sorted(lines, key=lambda l: int(l.split()[-1]))  # oldest first, newest last
    assert lines[-1].endswith("rule 5") and extractor.count_tokens(knowledge) <= 40
    assert "junk" not in knowledge and "hmm" not in knowledge


def test_unstructured_truncation_keeps_the_newest_tokens(tiny_model):
    cfg = ExtractorConfig(format="unstructured", max_knowledge_tokens=30, max_response_tokens=30, prompt="{trajectory}")
    ex = Extractor(cfg, tiny_model, [], thinking=False, seed=0)
    knowledge = ""
    for i in range(10):
        knowledge = ex.accumulate(knowledge, f"lesson {i}: step around the wall first")
    assert ex.count_tokens(knowledge) <= 31 and "lesson 9" in knowledge and "lesson 0" not in knowledge


def test_chain_orders_differ_across_chains_and_repeat_with_the_seed():
    trajs = [fake_trajectory(s) for s in range(10)]
    a, b = chain_orders(trajs, 4, 3, seed=1), chain_orders(trajs, 4, 3, seed=1)
    assert [[t.seed for t in c] for c in a] == [[t.seed for t in c] for c in b]
    assert len({tuple(t.seed for t in c) for c in a}) == 3


def test_prompt_shows_previous_knowledge_and_the_trajectory():
    text = extraction_prompt(STRUCTURED, "- EXPERIENCE ITEM: old", fake_trajectory(7, passed=True))
    assert "- EXPERIENCE ITEM: old" in text and "board 7" in text and "SUCCESS" in text


@pytest.fixture(scope="module")
def trajectories_and_workers(ray_cluster, tiny_model):
    from oel_ray.games import train_specs
    from oel_ray.config import EnvConfig
    from oel_ray.rollout import RolloutGroup

    workers = RolloutGroup(ModelConfig(path=tiny_model, build=None), num_workers=1, seed=0, max_logprobs=1,
                           kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    specs = train_specs(EnvConfig(), 1, 6)
    trajs = workers.play(specs, Sampling(max_tokens=24, temperature=0.7, seed=3), 3, 1)
    return trajs, workers


def test_extraction_through_vllm_is_reproducible(trajectories_and_workers, tiny_model):
    trajs, workers = trajectories_and_workers
    cfg = ExtractorConfig(format="unstructured", k=3, num_chains=2, max_knowledge_tokens=64,
                          max_response_tokens=24, prompt="{trajectory}\nLessons:")
    first = Extractor(cfg, tiny_model, workers.workers, thinking=False, seed=5).run(trajs)
    again = Extractor(cfg, tiny_model, workers.workers, thinking=False, seed=5).run(trajs)
    assert [[s.text for s in c] for c in first] == [[s.text for s in c] for c in again]
    assert all(len(chain) == cfg.k + 1 and chain[0].text == "" for chain in first)
    assert all(chain[-1].text and chain[-1].num_tokens <= 64 for chain in first)
    assert [s.trajectory_seeds for s in first[0]][1:] == [[t.seed for t in chain_orders(trajs, 3, 2, 5)[0][:i]]
                                                        for i in (1, 2, 3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def openai_server(tiny_model):
    """vLLM's own OpenAI-compatible server on loopback, serving the tiny model."""
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OEL_TEST_KEY="sk-test-secret")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "4096", "--served-model-name", "tiny",
         "--api-key", "sk-test-secret", "--enforce-eager", "--no-enable-chunked-prefill"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, "vLLM server exited"
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_endpoint_extractor_uses_the_key_from_the_environment(openai_server, tiny_model, monkeypatch):
    trajs = [fake_trajectory(s) for s in range(4)]
    cfg = ExtractorConfig(format="unstructured", k=2, num_chains=2, max_knowledge_tokens=64, max_response_tokens=16,
                          model=openai_server, endpoint_model="tiny", api_key_env="OEL_TEST_KEY",
                          prompt="{trajectory}\nLessons:")
    endpoint = ChatEndpoint(openai_server, "tiny", api_key_env="OEL_TEST_KEY")
    assert "sk-test-secret" not in repr(endpoint)
    monkeypatch.setenv("OEL_TEST_KEY", "sk-test-secret")
    chains = Extractor(cfg, tiny_model, [endpoint], thinking=False, seed=0).run(trajs)
    assert all(chain[-1].text for chain in chains)
    monkeypatch.setenv("OEL_TEST_KEY", "wrong")
    with pytest.raises(RuntimeError, match="answered 401") as err:
        endpoint.complete(["hi"], Sampling(max_tokens=4))
    assert "wrong" not in str(err.value)
