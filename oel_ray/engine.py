"""The vLLM engine: generation, top-k support, prompt log-probs and in-place weight reload. Beside
it, only the rollout worker quiets vLLM's loggers and weight_sync.py builds vLLM's NCCL communicator
(the one vLLM module that works outside an engine); every engine call lives here.

The engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, we are already inside
a Ray actor): that is what lets weight sync hand tensors to `reload_weights` directly — with the
engine in a child process they would have to be pickled, which fails for tensors.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import numpy as np

from oel_ray.config import FLOAT32
from oel_ray.types import Generation, Sampling

if TYPE_CHECKING:  # named in annotations only
    import torch


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = FLOAT32,
        max_model_len: int = 4096,
        seed: int = 0,
        max_logprobs: int = 0,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.85,
        trust_remote_code: bool = False,
        enforce_eager: bool = True,
    ):
        # Both must be set before vLLM is imported: it reads its environment once at import.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
        from transformers import AutoTokenizer
        from vllm import LLM

        # The engine's load runs a full garbage collection five times, each over every object the
        # imports left (about 0.9 s in all on a 2-core CPU); those live as long as the process, so
        # they are moved out of the collector's reach first (vLLM freezes its own heap the same way
        # once loaded).
        gc.freeze()
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.stop_token_ids = _stop_token_ids(model_path, self.tokenizer)
        self.tied_embeddings = _tied_embeddings(model_path)
        # vLLM's CPU runner cannot rewind a seeded per-request generator when a prefill is split
        # into chunks ("CPU Generator does not use offset"): on CPU, prefill whole prompts instead,
        # so per-request seeds work and replies do not depend on what else is in the batch.
        self.on_cpu = not _on_cuda()
        cpu_prefill = dict(
            enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192)) if self.on_cpu else {}
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            max_logprobs=max(max_logprobs, 1),
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,
            # vLLM would detokenize every top-k logprob entry (40x slower generation at k=256);
            # we decode replies ourselves with the same tokenizer.
            skip_tokenizer_init=True,
            use_tqdm_on_load=False,  # a loading bar in the driver's log says nothing a user can act on
            **cpu_prefill,
        )
        self.init_seconds = time.perf_counter() - started

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: Optional[list[int]] = None,
                 max_tokens: Optional[list[int]] = None) -> list[Generation]:
        """One batched call for all prompts (continuous batching inside vLLM). `seeds` gives each
        prompt its own sampling seed (reproducible whatever else is in the batch), `max_tokens` its
        own reply budget (default: `sampling.max_tokens` for all)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            logprobs=sampling.support_k or None,
            stop_token_ids=self.stop_token_ids,
            flat_logprobs=True,  # flat arrays instead of a dict per position: no GC storm at k=256
        )
        if seeds is not None or max_tokens is not None:
            params = [params.clone() for _ in prompts]
            for i, p in enumerate(params):
                if seeds is not None:
                    p.seed = seeds[i]
                if max_tokens is not None:
                    p.max_tokens = max_tokens[i]
        outputs = self._engine_call([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        return [self._to_generation(out.outputs[0], sampling.support_k) for out in outputs]

    def _engine_call(self, prompts: list, params) -> list:
        """`LLM.generate`; on CPU with torch.compile off. vLLM compiles the count that ranks each
        sampled token among the log-probs with inductor: a C++ build on the first call that asks for
        log-probs, 14 s on a fresh 2-core machine and 4.5 s in every later process (its cache only
        spares the compiler), against 0.05 s eager, which counts the same integers."""
        import torch

        with torch._dynamo.config.patch(disable=True) if self.on_cpu else nullcontext():
            return self.llm.generate(prompts, params, use_tqdm=False)

    def _to_generation(self, completion, support_k: int) -> Generation:
        topk = None
        if support_k:
            flat = completion.logprobs
            ids = np.asarray(flat.token_ids, dtype=np.int32)
            starts = np.asarray(flat.start_indices, dtype=np.int64)
            # Each position holds [sampled token, top-1 .. top-k]: skip the sampled entry.
            topk = ids[(starts + 1)[:, None] + np.arange(support_k)[None, :]]
        ids = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        # The stop token is kept in token_ids (the student learns to stop) but not in the text.
        return Generation(
            token_ids=ids,
            text=self.tokenizer.decode(ids[:self._written(ids, finished)]),
            finished=finished,
            topk_ids=topk,
        )

    def reply_tokens(self, gen: Generation) -> int:
        """The reply's length as written: generated tokens without the closing stop token (the
        same tokens as `gen.text`)."""
        return self._written(gen.token_ids, gen.finished)

    def _written(self, ids: list[int], finished: bool) -> int:
        return len(ids) - int(finished and bool(ids) and ids[-1] in self.stop_token_ids)

    def prompt_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """Log-prob of each token given its prefix (length len-1), as the engine computes it."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True)
        out = self._engine_call([TokensPrompt(prompt_token_ids=token_ids)], params)[0]
        flat = out.prompt_logprobs
        # Position 0 has no logprob; each later position's first entry is the actual prompt token.
        starts = np.asarray(flat.start_indices[1:], dtype=np.int64)
        return np.asarray(flat.logprobs, dtype=np.float32)[starts]

    def load_weights(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]] | dict) -> float:
        """Replace the weights in place; returns seconds taken.

        `reload_weights` re-runs vLLM's post-load processing (the CPU backend repacks linear
        weights), and handles tied embeddings when given tensors (the `weights_path` route leaves a
        tied output head stale). The prefix cache holds KV computed with the old weights: drop it.
        """
        started = time.perf_counter()
        weights = dict(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        if self.tied_embeddings and "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
            # Without an explicit head entry the reload skips the tied head and puts the *old*
            # tensor back: log-probs then silently come from stale output embeddings.
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def load_weights_stream(self, named_tensors: Iterator[tuple[str, "torch.Tensor"]]) -> float:
        """`load_weights` for weights that arrive while they load (a collective weight sync): the
        engine pulls them one by one from `named_tensors`, so no second full copy of the model is
        held, and vLLM's post-load processing runs once at the end. The stream must not carry a
        tied output head (the learner leaves it out); it is loaded from the embedding here.
        """
        started = time.perf_counter()
        tie = self.tied_embeddings

        def with_tied_head():
            for name, tensor in named_tensors:
                yield name, tensor
                if tie and name == "model.embed_tokens.weight":
                    yield "lm_head.weight", tensor  # else the reload would put the old head back

        # In-process engine: the generator itself reaches the model's load_weights.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": with_tied_head()})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started


def _stop_token_ids(model_path: str, tokenizer) -> list[int]:
    """EOS ids from the generation config (Qwen3 stops on <|im_end|> and <|endoftext|>)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]))


def _tied_embeddings(model_path: str) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
