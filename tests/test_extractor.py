"""Knowledge extraction: accumulation order, truncation in tokens, the structured filter, the
reasoning strip, determinism, and extraction through real engines (Ray + vLLM, and vLLM's
OpenAI-compatible server as an endpoint extractor)."""

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import pytest

from oel_ray.config import ExtractorConfig, ModelConfig
from oel_ray.errors import ConfigError
from oel_ray.netif import free_port
from oel_ray.endpoint import ChatEndpoint
from oel_ray.seeds import chain_sampling_seed
from oel_ray.extractor import (Extractor, chain_orders, keep_items, knowledge_set, strip_reasoning,
                               token_ids, truncate_items, truncate_tokens)
from oel_ray.prompts import chat_ids, extraction_prompt
from oel_ray.types import Sampling, Trajectory, Turn

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
    kept = truncate_items(items, 40, extractor.tokenizer)
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
    a, b = chain_orders(trajs, 4, 3, seed=1, round=1), chain_orders(trajs, 4, 3, seed=1, round=1)
    assert [[t.seed for t in c] for c in a] == [[t.seed for t in c] for c in b]
    assert len({tuple(t.seed for t in c) for c in a}) == 3


def test_per_step_chains_each_play_every_map_in_order_on_their_own_seeds():
    """extractor.trajectories=per_step (the public code's protocol): the collect stage plays maps
    0..K-1 once per chain; chain c reads its own game of map i at step i, every chain the same maps,
    each game on its own sampling seed."""
    from oel_ray.config import OELConfig
    from oel_ray.driver import collect_specs
    from oel_ray.seeds import game_sampling_seeds

    cfg = OELConfig()
    cfg.extractor.k, cfg.extractor.num_chains, cfg.extractor.trajectories = 3, 4, "per_step"
    specs = collect_specs(cfg, 1)
    assert len(specs) == 12
    seeds = game_sampling_seeds(7, specs)
    played = [fake_trajectory(spec.seed) for spec in specs]
    for t, seed in zip(played, seeds):
        t.turns[0] = replace(t.turns[0], response=str(seed))  # which sampling stream played it
    orders = chain_orders(played, 3, 4, seed=1, round=1, per_step=True)
    maps = [[t.seed for t in chain] for chain in orders]
    assert all(m == maps[0] for m in maps) and len(set(maps[0])) == 3  # same maps, in order, all distinct
    streams = [t.turns[0].response for chain in orders for t in chain]
    assert len(set(streams)) == 12  # every game its own sampling seed
    cfg.extractor.trajectories = "pool"
    assert len(collect_specs(cfg, 1)) == cfg.rollout.games_per_round


def test_chain_orders_and_sampling_seeds_are_new_every_round():
    trajs = [fake_trajectory(s) for s in range(20)]
    orders = {r: [[t.seed for t in c] for c in chain_orders(trajs, 6, 3, seed=1, round=r)] for r in (1, 2, 3)}
    for chain in range(3):
        assert len({tuple(orders[r][chain]) for r in orders}) == 3  # each chain: a new order per round
    seeds = {(r, c, step): chain_sampling_seed(1, r, c, step) for r in (1, 2, 3) for c in range(3) for step in range(6)}
    assert len(set(seeds.values())) == len(seeds)  # no seed reused across rounds, chains or steps
    assert chain_sampling_seed(1, 2, 0, 0) == seeds[(2, 0, 0)] and chain_sampling_seed(2, 2, 0, 0) != seeds[(2, 0, 0)]


def test_knowledge_set_is_the_chains_texts_at_use_step_without_empties():
    from oel_ray.types import KnowledgeSnapshot

    texts = [["", "a1", "a2"], ["", "", " \n"], ["", "c1", "c2"], ["", "d1", ""]]
    chains = [[KnowledgeSnapshot(c, step, text, 0, []) for step, text in enumerate(chain)]
              for c, chain in enumerate(texts)]
    assert knowledge_set(chains, 2) == (["a2", "c2"], 2)
    assert knowledge_set(chains, 1) == (["a1", "c1", "d1"], 1)
    assert knowledge_set(chains, 0) == ([], 4)


def test_newest_item_longer_than_the_limit_is_cut_not_dropped(extractor):
    long_item = "- EXPERIENCE ITEM: " + " ".join(f"push the box {i} steps" for i in range(30))
    kept = truncate_items(["- EXPERIENCE ITEM: short", long_item], 40, extractor.tokenizer)
    assert len(kept) == 1 and kept[0].startswith("- EXPERIENCE ITEM: push the box 0")
    assert extractor.count_tokens(kept[0]) <= 40 and len(kept[0]) < len(long_item)
    knowledge = extractor.accumulate("- EXPERIENCE ITEM: old", long_item)
    assert knowledge == kept[0] and keep_items(knowledge) == [knowledge]  # still an item


def test_truncated_text_stays_within_the_limit_after_decoding_and_encoding_again(extractor):
    import random

    tok = extractor.tokenizer
    rng = random.Random(0)
    alphabet = list("abcdefgh #[]()-_.,:\n\t") + ["é", "ü", "→", "日本", "  ", "\u00a0", "😀"]
    naive_over = 0
    for trial in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 120)))
        limit = rng.randint(1, 30)
        ids = token_ids(tok, text)
        naive = tok.decode(ids[-limit:]).lstrip()
        naive_over += len(token_ids(tok, naive)) > limit
        for keep in ("newest", "oldest"):
            cut = truncate_tokens(text, limit, tok, keep=keep)
            assert len(token_ids(tok, cut)) <= limit, (text, limit, keep)
            if len(ids) <= limit:
                assert cut == text
    assert naive_over > 0  # the round trip does lengthen some cuts: the re-count is needed
    assert truncate_tokens("anything at all", 0, tok) == ""


def test_prompt_shows_previous_knowledge_and_the_trajectory():
    text = extraction_prompt(STRUCTURED, "- EXPERIENCE ITEM: old", fake_trajectory(7, passed=True))
    assert "- EXPERIENCE ITEM: old" in text and "board 7" in text and "SUCCESS" in text


def test_without_previous_the_extractor_sees_no_knowledge_and_the_chain_still_accumulates(tiny_model):
    """extractor.with_previous=false (the public code's exp_sel_with_prev=false): the prompt's
    {knowledge} reads as before any extraction, whatever the chain holds; accumulation is unchanged."""
    known = "- EXPERIENCE ITEM: old"
    game = fake_trajectory(7, passed=True)
    for with_previous in (True, False):
        cfg = ExtractorConfig(format="structured", prompt=STRUCTURED, with_previous=with_previous)
        ex = Extractor(cfg, tiny_model, [], thinking=False, seed=0)
        assert (known in ex.prompt(known, game)) == with_previous
        assert ex.prompt(known, game) == ex.prompt("", game) or with_previous
        assert keep_items(ex.accumulate(known, "- EXPERIENCE ITEM: new")) == [known, "- EXPERIENCE ITEM: new"]
    with pytest.raises(ConfigError, match="extractor.with_previous: true shows the knowledge so far"):
        ExtractorConfig(prompt="{trajectory}").check()
    ExtractorConfig(prompt="{trajectory}", with_previous=False).check()


def test_the_policys_reasoning_reaches_the_extractor_unless_keep_reasoning_is_false(tiny_model):
    """extractor.keep_reasoning (the public code's textgame_keep_reasoning, on in all its scripts): the
    replies of a thinking policy go to the extractor whole; false leaves only the answer after
    </think> (nothing of a reply whose thinking never closed)."""
    game = fake_trajectory(3)
    game.turns[0] = replace(game.turns[0], response="<think>the box is left of me</think> I go [up]")
    game.turns.append(replace(game.turns[0], response="<think>still thinking when the tokens ran out"))
    for keep in (True, False):
        cfg = ExtractorConfig(format="structured", prompt=STRUCTURED, keep_reasoning=keep)
        text = Extractor(cfg, tiny_model, [], thinking=False, seed=0).prompt("", game)
        assert ("the box is left of me" in text) == keep and "I go [up]" in text
        assert ("still thinking" in text) == keep


def long_game(seed: int, turns: int) -> Trajectory:
    """A lost game whose turns run ~1.2k tokens each (a 300-token board history, a 900-token reply)."""
    filler = "the box is near the wall "  # 8 tokens
    steps = [Turn(prompt=f"OBSERVATION-{n} {filler * 37}", response=f"<think>{filler * 112}</think> REPLY-{n} [up]",
                  response_tokens=900, action="up", feedback="moved") for n in range(1, turns + 1)]
    return Trajectory("FrozenLake-v0-raw", seed, "train", 1, 0, steps, "loss", 0.0, "fell into a hole")


def test_extraction_prompt_fits_the_context_with_room_for_a_full_reply(tiny_model):
    # A paper config in miniature: L = 8192 and five turns of ~1.2k tokens against 12800 tokens of
    # context with a 1024-token reply (frozenlake_4b/8b) - the uncut prompt would not fit.
    cfg = ExtractorConfig(format="structured", max_knowledge_tokens=8192, max_response_tokens=1024,
                          prompt=STRUCTURED)
    ex = Extractor(cfg, tiny_model, [], thinking=True, seed=0, context_length=12800)
    knowledge = truncate_items([f"- EXPERIENCE ITEM: lesson {i} about holes and walls" for i in range(2000)],
                               8192, ex.tokenizer)
    knowledge = "\n".join(knowledge)
    game = long_game(3, turns=5)

    def length(text):
        return len(chat_ids(ex.chat_tokenizer, text, thinking=True))

    uncut = extraction_prompt(STRUCTURED, knowledge, game)
    assert length(uncut) > 12800 - 1024 and ex.count_tokens(knowledge) > 8000
    text = ex.prompt(knowledge, game)
    assert length(text) <= 12800 - 1024
    assert knowledge in text and "fell into a hole" in text  # knowledge and outcome kept whole
    assert "REPLY-5" in text and "OBSERVATION-1 " not in text  # the newest turn stays, the oldest goes
    assert "left out for length" in text

    # Fits already: untouched. Far too small: the trajectory shrinks to its summary, then the
    # oldest knowledge goes; it still fits and does not raise.
    assert Extractor(cfg, tiny_model, [], thinking=True, seed=0, context_length=40000).prompt(knowledge, game) == uncut
    tight = Extractor(cfg, tiny_model, [], thinking=True, seed=0, context_length=1024 + 300)
    text = tight.prompt(knowledge, game)
    assert length(text) <= 300 and "fell into a hole" in text and "lesson 1999 about" in text
    assert "OBSERVATION" not in text

    # Only the newest turn would fit in part: its beginning is kept.
    mid = Extractor(cfg, tiny_model, [], thinking=True, seed=0, context_length=1024 + 900)
    text = mid.prompt("", game)
    assert length(text) <= 900 and "OBSERVATION-5" in text and "OBSERVATION-4" not in text


@pytest.fixture(scope="module")
def trajectories_and_workers(ray_cluster, tiny_model):
    from oel_ray.games import train_specs
    from oel_ray.config import EnvConfig
    from oel_ray.rollout import RolloutGroup

    workers = RolloutGroup(ModelConfig(path=tiny_model, build=None), num_workers=1, seed=0, max_logprobs=1,
                           kv_cache_gib=1, gpu_memory_utilization=0.5, num_cpus=0.5, num_gpus=0)
    specs = train_specs(EnvConfig(kwargs={"dim_room": [6, 6], "num_boxes": 1}), 1, 6)
    trajs = workers.play(specs, Sampling(max_tokens=24, temperature=0.7, seed=3), 3, 1)
    yield trajs, workers
    workers.shutdown()


def test_extraction_through_vllm_is_reproducible(trajectories_and_workers, tiny_model):
    trajs, workers = trajectories_and_workers
    cfg = ExtractorConfig(format="unstructured", k=3, num_chains=2, max_knowledge_tokens=64,
                          max_response_tokens=24, prompt="{trajectory}\nLessons:")
    first = Extractor(cfg, tiny_model, workers.workers, thinking=False, seed=5).run(trajs)
    again = Extractor(cfg, tiny_model, workers.workers, thinking=False, seed=5).run(trajs)
    assert [[s.text for s in c] for c in first] == [[s.text for s in c] for c in again]
    assert all(len(chain) == cfg.k + 1 and chain[0].text == "" for chain in first)
    assert all(chain[-1].text and chain[-1].num_tokens <= 64 for chain in first)
    order = chain_orders(trajs, 3, 2, 5, round=1)[0]  # the trajectories' round
    assert [s.trajectory_seeds for s in first[0]][1:] == [[t.seed for t in order[:i]] for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def openai_server(tiny_model):
    """vLLM's own OpenAI-compatible server on loopback, serving the tiny model."""
    port = free_port("127.0.0.1")
    # The engine in the server's own process: a second process's start and imports (22 s -> 16 s to
    # ready on 2 cores) buy nothing for a test's few requests.
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OEL_TEST_KEY="sk-test-secret",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
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
