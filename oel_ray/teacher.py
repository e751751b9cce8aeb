"""The frozen teacher: the round-start model with the knowledge in its context.

TeacherServer scores replies on a support: it returns k log-probs per response token (4k bytes),
never full-vocabulary logits. Log-softmax is computed from the logits divided by the rollout
temperature, chunk by chunk over positions, with the learner's own routine
(`losses.support_logprobs`), so fp32 memory is one chunk_tokens x V block whatever the sequence
length. (vLLM's prompt_logprobs would ignore the temperature, which is why the teacher is a plain
forward pass.) The support is the student's top-k (on-policy), that joined with the teacher's own
top-k (learner.support=merged, `merged_support_logprobs`), or the teacher's own (off-policy).
Prompts that start alike (the same knowledge text) share one encoded start (`prefix_cache.py`).
A batch's teacher prompts are known before its replies: `prefill` encodes them while the workers
generate (teacher.prefill_prompts), so that scoring, once the replies are in, runs only the reply
tokens (`prefill.py`).

ColocatedTeacher is the copy a learner rank holds for the exact full-vocabulary KL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional

import numpy as np
import ray
import torch

from oel_ray import batching, losses
from oel_ray.placement import RolePlacement
from oel_ray.prefill import Prefilled, encode_prompts, kv_bytes_per_token, reply_hidden
from oel_ray.prefix_cache import MIN_SHARED_TOKENS, PrefixCache, shared_prefix_groups
from oel_ray.types import DistillSample

log = logging.getLogger(__name__)


@torch.no_grad()
def merged_support_logprobs(hidden: torch.Tensor, weight: torch.Tensor, support: torch.Tensor,
                            temperature: float, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """learner.support=merged: per position the union of `support` [N, k] (the student's top-k) and this
    model's own top-k, as (ids [N, 2k], log-probs [N, 2k]). An id of its top-k that `support` already
    holds becomes padding: the first support id again, with log-prob -inf, which the losses skip."""
    ids_parts, lp_parts = [], []
    k = support.shape[-1]
    for i in range(0, hidden.shape[0], chunk_tokens):
        s = support[i:i + chunk_tokens]
        lp = torch.log_softmax(losses.upcast(hidden[i:i + chunk_tokens] @ weight.t()).div_(temperature), -1)
        own = lp.topk(k, -1).indices
        repeated = (own[:, :, None] == s[:, None, :]).any(-1)
        ids = torch.cat([s, torch.where(repeated, s[:, :1], own)], -1)
        lps = lp.gather(-1, ids)
        lps[:, k:].masked_fill_(repeated, float("-inf"))
        ids_parts.append(ids)
        lp_parts.append(lps)
    if not ids_parts:
        return support.new_zeros((0, 2 * k)), hidden.new_zeros((0, 2 * k), dtype=torch.float32)
    return torch.cat(ids_parts), torch.cat(lp_parts)


class TeacherServer:
    def __init__(self, model_path: str, *, dtype: str, temperature: float, chunk_tokens: int,
                 batch_tokens: int, reuse_prefix: bool = True, trust_remote_code: bool = False,
                 merge_support: bool = False):
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.batch_tokens = batch_tokens
        self.prefixes = PrefixCache(self.model) if reuse_prefix else None
        self.merge_support = merge_support  # learner.support=merged: its own top-k joins the student's
        self.said_unshared = False
        self.prefilled = Prefilled()  # the last `prefill`'s batches, until they are scored

    def ready(self) -> bool:
        return True

    def set_threads(self, threads: Optional[int]) -> int:
        """Torch threads from now on; None: every core this process may run on."""
        threads = threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        return threads

    def load_weights(self, weights: dict) -> None:
        """Become a new frozen teacher (the previous round's final checkpoint). Every weight must
        come: a tied output head may be left out (it is re-tied), nothing else."""
        own = set(self.model.state_dict())
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing, unexpected = own - set(weights) - tied, set(weights) - own
        if missing or unexpected:  # checked first: a refused load leaves the teacher as it was
            raise ValueError(f"teacher weights do not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.model.load_state_dict(weights, strict=False)
        self.model.tie_weights()
        self.new_round()  # the cached prefixes were computed by the old weights

    def new_round(self) -> None:
        """Forget the knowledge prefixes encoded so far (a new round reads a new knowledge set)."""
        if self.prefixes is not None:
            self.prefixes.clear()
        self.prefilled = Prefilled()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> int:
        """Encode these teacher prompts before their replies exist (the workers are generating them):
        a later `score` of replies to them runs only the reply tokens on the keys and values kept
        here. Holds one batch: the next prefill, or a new round, drops what was not scored. Returns
        the prompt tokens encoded (after the shared starts)."""
        self.prefilled = Prefilled()
        for skip, kv, members in self._groups(prompts):
            for batch in self._batches([len(prompts[i]) for i in members], skip):
                rows = [prompts[members[i]] for i in batch]
                if not self._room_for(sum(len(p) - skip for p in rows)):
                    log.info("teacher: device memory is short: the prompts not yet encoded are scored in full")
                    return self.prefilled.encoded_tokens
                self.prefilled.add(encode_prompts(self.model, rows, skip, kv))
        return self.prefilled.encoded_tokens

    def _room_for(self, tokens: int) -> bool:
        """Whether the keys and values of `tokens` more prompt tokens leave a GPU a quarter of its
        memory for scoring (always on CPU)."""
        if self.device != "cuda":
            return True
        free, total = torch.cuda.mem_get_info()
        return free - tokens * kv_bytes_per_token(self.model) >= total / 4

    @torch.no_grad()
    def score(self, samples: list[DistillSample], sampled_only: bool = False) -> list[np.ndarray]:
        """Teacher log-probs on each sample's support ([T, k]), in the samples' order; with
        sampled_only, of the reply's own tokens ([T, 1]) for the sampled-token estimator; with
        merge_support, (merged ids, log-probs) pairs ([T, 2k] each, `merged_support_logprobs`). Only
        the arrays travel back: TeacherGroup puts them on the samples the driver already holds."""
        out: list[np.ndarray] = [None] * len(samples)  # type: ignore[list-item]
        prefilled, rest = self.prefilled.take([s.teacher_prompt_ids for s in samples])
        for encoded, rows in prefilled:
            batch = [samples[i] for i in rows]
            hidden = reply_hidden(self.model, encoded, [s.response_ids for s in batch])
            for i, scores in zip(rows, self._scores(hidden, batch, sampled_only)):
                out[i] = scores
        for skip, kv, members in self._groups([samples[i].teacher_prompt_ids for i in rest]):
            members = [rest[i] for i in members]
            for batch in self._batches([self._length(samples[i]) for i in members], skip):
                rows = [members[i] for i in batch]
                for i, scores in zip(rows, self._score_batch([samples[i] for i in rows], sampled_only, skip, kv)):
                    out[i] = scores
        return out

    def _groups(self, prompts: list[list[int]]) -> list[tuple[int, object, list[int]]]:
        """(tokens skipped, their cached keys/values or None, prompt indices): one group per shared
        start, and one of the prompts scored in full."""
        if self.prefixes is None:
            return [(0, None, list(range(len(prompts))))]
        groups = shared_prefix_groups(prompts)
        alone = [i for shared, run in groups if not shared for i in run]
        if len(alone) == len(prompts) > 1 and not self.said_unshared:
            log.info("teacher: the prompts share no start of %d tokens or more (nothing to reuse): each is "
                     "scored in full", MIN_SHARED_TOKENS)
            self.said_unshared = True
        out = [(*self.prefixes.lookup(prompts[run[0]][:shared], self.device), run) for shared, run in groups if shared]
        return out + ([(0, None, alone)] if alone else [])

    def _batches(self, lengths: list[int], skip: int = 0) -> list[list[int]]:
        """Indices of `lengths` in batches of at most `batch_tokens` (padded, after the `skip` cached
        tokens), longest first."""
        length = [n - skip for n in lengths]
        order = sorted(range(len(lengths)), key=lambda i: -length[i])
        batches, current, longest = [], [], 0
        for i in order:
            longest = max(longest, length[i])
            if current and longest * (len(current) + 1) > self.batch_tokens:
                batches.append(current)
                current, longest = [], length[i]
            current.append(i)
        return batches + ([current] if current else [])

    @staticmethod
    def _length(s: DistillSample) -> int:
        return len(s.teacher_prompt_ids) + len(s.response_ids)

    def _score_batch(self, batch: list[DistillSample], sampled_only: bool, skip: int = 0, kv=None) -> list[np.ndarray]:
        ids, gather_idx = batching.pack([s.teacher_prompt_ids[skip:] for s in batch], [s.response_ids for s in batch],
                                        pad_id=0)
        past = self.prefixes.expanded(kv, len(batch)) if kv is not None else None
        hidden = batching.response_hidden(self.model, ids.to(self.device), gather_idx.to(self.device), past)
        return self._scores([hidden[row, : len(s.response_ids)] for row, s in enumerate(batch)], batch, sampled_only)

    def _scores(self, rows: list[torch.Tensor], batch: list[DistillSample], sampled_only: bool) -> list[np.ndarray]:
        """Each sample's scores (see `score`) from its hidden states at the reply positions (`rows`)."""
        supports = []
        for s in batch:
            support = np.asarray(s.response_ids).reshape(-1, 1) if sampled_only else np.asarray(s.support_ids)
            supports.append(torch.tensor(support, dtype=torch.long, device=self.device))  # copies: Ray hands read-only arrays
        # One pass over every response position of the batch: a few large matmuls, not one per sample.
        head = self.model.get_output_embeddings().weight
        cuts = np.cumsum([len(s.response_ids) for s in batch])[:-1]
        if self.merge_support and not sampled_only:
            ids, scores = merged_support_logprobs(torch.cat(rows), head, torch.cat(supports), self.temperature,
                                                  self.chunk_tokens)
            return list(zip(np.split(ids.to(torch.int32).cpu().numpy(), cuts),
                            np.split(scores.to(torch.float32).cpu().numpy(), cuts)))
        scores = losses.support_logprobs(torch.cat(rows), head, torch.cat(supports), self.temperature,
                                         self.chunk_tokens).to(torch.float32).cpu().numpy()
        return np.split(scores, cuts)


class ColocatedTeacher:
    """A frozen teacher copy inside a learner rank, for learner.loss=full_reverse_kl.

    The exact KL needs the teacher's whole distribution at every response position: V floats per
    token, which must not travel between actors. So each learner rank holds its own copy (one more
    model's memory per rank, not sharded by ZeRO) and hands the loss hidden states and the output
    head; the loss projects them chunk by chunk beside the student's.
    """

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        if getattr(self.model.get_output_embeddings(), "bias", None) is not None:
            raise ValueError("output heads with a bias are not supported")

    @property
    def head(self) -> torch.Tensor:
        """The output head's weight [V, H] (a detached view: the loss must not train it)."""
        return self.model.get_output_embeddings().weight.detach()

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, R, H] at the response positions (`batching.response_hidden`)."""
        return batching.response_hidden(self.model, input_ids, gather_idx)


class TeacherGroup:
    """`num_actors` TeacherServers in one placement group. Each step's scoring is split across them
    balanced by tokens (longest first, each to the least loaded), and the scores come back in the
    samples' order."""

    def __init__(self, model_path: str, *, num_actors: int = 1, num_cpus: float, num_gpus: float,
                 wait: bool = True, **kwargs):
        """`wait=False`: return once the actors are created (they load in the background); `wait()`."""
        self.placement = RolePlacement("teacher", num_actors, num_cpus, num_gpus).reserve()
        self.actors = [ray.remote(TeacherServer).options(**self.placement.options(i)).remote(model_path, **kwargs)
                       for i in range(num_actors)]
        self.prefilling: Optional[tuple[list[list[int]], list[list[int]], list[ray.ObjectRef]]] = None
        if wait:
            self.wait()

    def wait(self) -> "TeacherGroup":
        """Block until every actor has loaded (stopping them all if one failed)."""
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except BaseException:
            self.shutdown()
            raise
        return self

    def prefill(self, prompts: list[list[int]]) -> None:
        """Start encoding a batch's teacher prompts (TeacherServer.prefill) and return at once: the
        actors encode them while the workers generate the replies. `score` of replies to exactly
        these prompts then sends each sample to the actor that encoded its prompt."""
        shares = balance([len(p) for p in prompts], len(self.actors))
        refs = [a.prefill.remote([prompts[i] for i in share]) for a, share in zip(self.actors, shares) if share]
        self.prefilling = (prompts, shares, refs)

    def score(self, samples: list[DistillSample], sampled_only: bool = False) -> list[DistillSample]:
        """The samples with their teacher_logprobs (see TeacherServer.score), in their order; a merged
        support replaces their support_ids."""
        prefilled, self.prefilling = self.prefilling, None
        if prefilled is not None and prefilled[0] == [s.teacher_prompt_ids for s in samples]:
            shares = prefilled[1]
        else:
            shares = balance([TeacherServer._length(s) for s in samples], len(self.actors))
        refs = [(share, a.score.remote([samples[i] for i in share], sampled_only))
                for a, share in zip(self.actors, shares) if share]
        if prefilled is not None:
            ray.get(prefilled[2])  # done before the scores (each actor runs its calls in order): its errors surface here
        out = list(samples)
        for share, ref in refs:
            for i, scores in zip(share, ray.get(ref)):
                ids, logprobs = scores if isinstance(scores, tuple) else (samples[i].support_ids, scores)
                out[i] = replace(samples[i], support_ids=ids, teacher_logprobs=logprobs)
        return out

    def load_weights(self, weights) -> None:
        """Every actor becomes the new frozen teacher (`weights`: a dict or its object-store ref)."""
        ray.get([a.load_weights.remote(weights) for a in self.actors])

    def new_round(self) -> None:
        """A teacher that keeps its weights (teacher.model) starts a round: see TeacherServer.new_round."""
        ray.get([a.new_round.remote() for a in self.actors])

    def set_threads(self, threads: Optional[int]) -> int:
        return ray.get([a.set_threads.remote(threads) for a in self.actors])[0]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.placement.release()


def balance(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices of `lengths` in `parts` shares of near-equal total length (longest first, each to
    the least loaded share); each share keeps its indices in ascending order."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = load.index(min(load))
        shares[j].append(i)
        load[j] += lengths[i]
    return [sorted(share) for share in shares]
