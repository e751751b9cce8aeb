"""Consolidation learner: one DeepSpeed rank per Ray actor, and a thin group in front of them.

Each rank trains on its shard `samples[rank::world_size]`; the loss of every micro-batch is a sum
divided by the *global* token (or sequence) count, so the ranks and micro-batches add up to the
paper's token mean over the whole batch. Inside a micro-batch the samples go through the model in
length buckets, one forward pass each, so little compute goes to padding; the loss is the same sum
over the same response tokens. The buckets of every rank are planned for the whole step in one
place (`batching.plan_step`), so every rank runs the same number of forward passes whatever its
data: under ZeRO-3 each pass all-gathers the layers, and unequal counts would abort (gloo) or hang
(NCCL). Collectives (step, state_dict, save, sequence_logprobs) must be called on all ranks:
`LearnerGroup` does that.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import torch

from oel_ray import batching, checkpoint
from oel_ray.artifacts import replace_dir
from oel_ray.checks import frozen
from oel_ray.deepspeed_setup import DistillModule, ds_config, import_deepspeed, load_model
from oel_ray.config import FLOAT32, GLOO, NCCL, TOKEN_MEAN, LearnerConfig
from oel_ray.strategy import FULL_REVERSE_KL, LEARNER_LOSSES, kl_direction, scores_sampled_tokens
from oel_ray.netif import free_port, use_node_ip
from oel_ray.placement import RolePlacement
from oel_ray.teacher import ColocatedTeacher
from oel_ray.types import DistillSample, StepMetrics
from oel_ray.weight_sync import Channel, TensorMeta, buckets, send



class Learner:
    def __init__(self, cfg: LearnerConfig, model_path: str, rank: int, world_size: int,
                 master_addr: str, master_port: int, ds_overrides: Optional[dict] = None):
        cuda = torch.cuda.is_available()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port), LOCAL_RANK="0" if cuda else str(rank))
        deepspeed = import_deepspeed()
        self.cfg, self.rank, self.world, self.ds_overrides = cfg, rank, world_size, ds_overrides
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        use_node_ip()  # gloo/NCCL on the interface other nodes reach, not the hostname's
        deepspeed.init_distributed(dist_backend=NCCL if cuda else GLOO, verbose=False)
        self._build(model_path)

    def _build(self, model_path: str) -> None:
        """The model at `model_path` under a DeepSpeed engine with a fresh optimizer and LR schedule."""
        deepspeed, cfg = import_deepspeed(), self.cfg
        torch.manual_seed(cfg.seed)
        self.model_path = model_path
        config = ds_config(cfg, self.world, self.ds_overrides)
        # full_reverse_kl: a frozen teacher copy in this rank. `model_path` is the round-start model,
        # the weights the TeacherServer holds this round (deployment.Deployment builds both from it).
        # Built before the student, so it is never built under ZeRO-3's partitioning init.
        self.teacher = (ColocatedTeacher(model_path, getattr(torch, cfg.dtype), self.device)
                        if cfg.loss == FULL_REVERSE_KL else None)
        self.model = load_model(model_path, getattr(torch, cfg.dtype), config)
        if cfg.gradient_checkpointing:
            batching.enable_checkpointing(self.model)
        module = DistillModule(self.model, cfg)
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("output heads with a bias are not supported")
        # What a collective weight sync announces to the workers (full shapes, also when partitioned).
        self.metas = [TensorMeta(name, str(t.dtype).removeprefix("torch."), _full_shape(t))
                      for name, t in _unique_tensors(self.model).items()]
        if cfg.zero_stage == 3:
            deepspeed.zero.register_external_parameter(module, head.weight)
        params = dict(self.model.named_parameters())
        fixed = frozen(params, cfg.freeze)
        for name, param in params.items():
            param.requires_grad_(name not in fixed)
        trainable = [param for name, param in params.items() if name not in fixed]
        # Client AdamW: a config optimizer would JIT-compile FusedAdam / DeepSpeedCPUAdam.
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps

        def schedule(opt):  # constant LR after an optional linear warm-up over `warm` steps
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)

        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                               config=config)
        self.pad_id = self.model.config.pad_token_id or 0

    def reload(self, model_path: str, cfg: Optional[LearnerConfig] = None) -> None:
        """Start over from the checkpoint at `model_path` with a fresh optimizer and LR schedule, as a
        new rank would, in this process: a round's start (deployment.Deployment) spares the ranks' process
        start, imports and rendezvous (seconds on CPU, more with NCCL and large models); the process
        group and any open weight channel stay. `cfg`: other learner settings from now on (a sweep's
        next job), on the same number of ranks."""
        if cfg is not None:
            if cfg.num_ranks != self.world:
                raise ValueError(f"learner.num_ranks={cfg.num_ranks}: these ranks are {self.world}")
            self.cfg = cfg
        self.engine.destroy()
        del self.engine, self.model, self.teacher
        gc.collect()  # the old engine's weights and optimizer moments, before the new ones load
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._build(model_path)

    def ready(self) -> bool:
        return True

    def set_threads(self, threads: Optional[int]) -> int:
        """Torch threads for this rank from now on; None: the cores this process may run on, split
        over the ranks. Returns the count."""
        threads = threads or max(1, len(os.sched_getaffinity(0)) // self.world)
        torch.set_num_threads(threads)
        return threads

    def _teacher_inputs(self, samples: list[DistillSample]) -> dict:
        """full_reverse_kl: the frozen teacher copy's hidden states at the response positions of
        (teacher prompt + response), and its output head."""
        input_ids, gather_idx = batching.pack([s.teacher_prompt_ids for s in samples], [s.response_ids for s in samples],
                                      self.pad_id)
        return dict(teacher_hidden=self.teacher.hidden(input_ids.to(self.device), gather_idx.to(self.device)),
                    teacher_head=self.teacher.head)

    def train_step(self, samples: list[DistillSample], step: int, loss: Optional[str] = None) -> StepMetrics:
        """One optimizer step on `samples`. `loss` (default learner.loss) is one of strategy.LEARNER_LOSSES:
        off-policy consolidation passes the forward forms (topk_forward_kl, k3_forward, ...). Every
        loss but full_reverse_kl (whose teacher copy lives here) reads each sample's teacher_logprobs.

        StepMetrics.kl reports the KL the loss minimises, token mean, un-renormalised:
        KL(student || teacher) on the support (topk_reverse_kl), its single-sample estimate
        (sampled_reverse_kl and the estimators k1..abs), over the whole vocabulary (full_reverse_kl),
        or the forward KL(teacher || student) on the teacher's support (topk_forward_kl) or its
        single-sample estimate on the teacher's samples (the `_forward` estimators, seqkd_forward)."""
        cfg, t0 = self.cfg, time.perf_counter()
        kind = loss or cfg.loss
        if kind not in LEARNER_LOSSES:
            raise ValueError(f"loss {kind!r} is not one of {', '.join(LEARNER_LOSSES)}")
        if kind == FULL_REVERSE_KL and self.teacher is None:
            raise ValueError("full_reverse_kl needs the teacher copy each rank loads when the learner is built "
                             "with learner.loss=full_reverse_kl")
        if len(samples) < self.world * cfg.grad_accum:
            raise ValueError(f"{len(samples)} samples: need at least num_ranks x grad_accum = "
                             f"{self.world * cfg.grad_accum}")
        targets = None
        if kind != FULL_REVERSE_KL:
            unscored = sum(s.teacher_logprobs is None for s in samples)
            if unscored:
                raise ValueError(f"{unscored} of {len(samples)} samples have no teacher_logprobs: {kind} needs "
                                 "the teacher's scores of every sample (TeacherGroup.score)")
            targets = [batching.targets(s, s.teacher_logprobs, scores_sampled_tokens(kind)) for s in samples]
        tokens = sum(len(s.response_ids) for s in samples)
        units = tokens if cfg.aggregation == TOKEN_MEAN else sum(len(s.response_ids) > 0 for s in samples)
        lr = self.engine.get_lr()[0]
        sums = torch.zeros(4, dtype=torch.float64)  # loss, kl x n, student mass x n, teacher mass x n
        norm = None
        lengths = [len(s.student_prompt_ids) + len(s.response_ids) for s in samples]
        # The same plan on every rank, so every rank runs the same forward passes (ZeRO-3 gathers in each).
        plan = batching.plan_step(lengths, self.world, cfg.grad_accum)
        starts = (batching.shared_starts(plan, [s.student_prompt_ids for s in samples])[self.rank] if cfg.reuse_prefix
                  else [[0] * len(micro) for micro in plan[self.rank]])
        for micro_buckets, micro_starts in zip(plan[self.rank], starts):
            micro, micro_targets = self._micro_batch(micro_buckets, samples, targets)
            batch = batching.collate(micro, micro_targets, [max(1, len(b)) for b in micro_buckets], self.pad_id,
                                     micro_starts)
            batch = {k: batching.to_device(v, self.device) for k, v in batch.items()}
            if kind == FULL_REVERSE_KL:
                batch.update(self._teacher_inputs(micro))
            value, kl, smass, tmass = self.engine(**batch, num_units=units, loss=kind)
            # DeepSpeed averages gradients over ranks: scale back up so the ranks' sums add up.
            self.engine.backward(value * self.world, scale_wrt_gas=False)
            if self.engine.is_gradient_accumulation_boundary() and cfg.zero_stage == 0 and cfg.dtype == FLOAT32:
                # DeepSpeed records no norm for plain fp32 without ZeRO: take it before the step.
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)
            self.engine.step()
            n = int(batch["mask"].sum())
            sums += torch.stack([value.detach(), kl * n, smass * n, tmass * n]).double().cpu()
        buf = sums.to(self.device)
        torch.distributed.all_reduce(buf)
        total, kl, smass, tmass = buf.tolist()
        norm = self.engine.get_global_grad_norm() if norm is None else norm
        denom = max(tokens, 1)
        return StepMetrics(step=step, loss=total, kl=kl / denom, student_mass=smass / denom, teacher_mass=tmass / denom,
                           grad_norm=float(norm) if norm is not None else float("nan"), lr=float(lr),
                           response_tokens=tokens, seconds={"learner_compute": time.perf_counter() - t0},
                           kl_direction=kl_direction(kind))

    def _micro_batch(self, buckets: list[list[int]], samples: list[DistillSample], targets: Optional[list]):
        """The samples (and targets) of one micro-batch, bucket after bucket; an empty bucket is a
        placeholder pass (see batching.plan_step): one pad-token prompt with no reply, so its row
        is masked out and adds nothing to the loss or the gradients."""
        micro, micro_targets = [], []
        for bucket in buckets:
            if bucket:
                micro += [samples[i] for i in bucket]
                micro_targets += [targets[i] for i in bucket] if targets is not None else []
            else:
                micro.append(DistillSample([self.pad_id], [self.pad_id], []))
                if targets is not None:
                    k = targets[0][0].shape[1]
                    micro_targets.append((np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)))
        return micro, micro_targets if targets is not None else None

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        """log p(token_i | tokens before i) for i >= 1 at temperature 1, fp32, length len - 1."""
        ids = torch.tensor([list(token_ids)], device=self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].cpu().numpy()

    def _weight_buckets(self, bucket_bytes: int):
        """Per bucket of `weight_sync.buckets(self.metas, bucket_bytes)`: (its metas, rank 0's full
        tensors of it on the device with Hugging Face names, None elsewhere), valid until the next
        bucket. Like `save_pretrained`, a tied output head is left out (only the embedding is there).
        Under ZeRO-3 each bucket is gathered on its own, so no rank ever holds more than one bucket
        of gathered weights: collective, every rank must run through all of them."""
        params = _unique_tensors(self.model)
        deepspeed = import_deepspeed() if self.cfg.zero_stage == 3 else None
        for bucket in buckets(self.metas, bucket_bytes):
            tensors = [params[m.name] for m in bucket]
            gather = (deepspeed.zero.GatheredParameters([t for t in tensors if hasattr(t, "ds_id")], modifier_rank=None)
                      if deepspeed else nullcontext())
            with gather:
                yield bucket, ({m.name: t for m, t in zip(bucket, tensors)} if self.rank == 0 else None)

    def state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Full weights on rank 0 (None elsewhere), on the CPU in the model dtype, gathered bucket by
        bucket (`learner.sync_bucket_mb`); see `_weight_buckets`."""
        out = {}
        for _, weights in self._weight_buckets(max(1, int(self.cfg.sync_bucket_mb * 2**20))):
            if weights is not None:
                out.update({name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights.items()})
        return out if self.rank == 0 else None

    # -------------------------------------------------------------- collective weight sync (weight_sync.py)

    def weight_metas(self) -> list[TensorMeta]:
        return self.metas

    def weight_channel_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the weight-sync group's rendezvous."""
        return ray.util.get_node_ip_address(), free_port()

    def open_weight_channel(self, backend: str, address: str, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins the weight-sync group as its sender (rank 0 of that group)."""
        self.channel = Channel(backend, address, port, 0, world_size, timeout_s)

    def send_weights(self, bucket_bytes: int) -> float:
        """Broadcast the full weights to the rollout workers, one bucket of `bucket_bytes` at a time
        (every rank calls it: under ZeRO-3 each bucket is gathered just before it is sent)."""
        start, error = time.perf_counter(), None
        for bucket, weights in self._weight_buckets(bucket_bytes):
            if weights is not None and error is None:
                try:
                    send(self.channel, weights, bucket, bucket_bytes)  # exactly this bucket
                except Exception as e:  # finish the gathers with the other ranks first: they would wait
                    error = e
        if error is not None:
            raise error
        return time.perf_counter() - start

    def close_weight_channel(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
            self.channel = None

    def save(self, path: str) -> None:
        """Write a Hugging Face checkpoint at `path` (rank 0), replacing it atomically by rename."""
        weights = self.state_dict()
        if self.rank == 0:
            checkpoint.write_hf(weights, self.model, self.model_path, Path(path))
        torch.distributed.barrier()

    # -------------------------------------------------------------- resumable training state

    def save_state(self, path: str, tmp: str) -> None:
        """The full training state (weights, optimizer moments and ZeRO shards, LR schedule, step
        counter) as a DeepSpeed checkpoint: every rank writes its part into `tmp`, then rank 0
        renames `tmp` to `path` (replacing an older one), so `path` is always complete or absent.
        `tmp` and `path` must be on storage all ranks share."""
        self.engine.save_checkpoint(tmp, tag=checkpoint.STATE_TAG, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            replace_dir(Path(tmp), Path(path))
        torch.distributed.barrier()

    def load_state(self, path: str) -> int:
        """Restore what `save_state` wrote (same ZeRO stage and number of ranks); returns the
        number of optimizer steps taken before it was saved."""
        loaded, _ = self.engine.load_checkpoint(path, tag=checkpoint.STATE_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"{path}: no learner state saved there (expected {path}/{checkpoint.STATE_TAG})")
        return int(self.engine.global_steps)


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A weight's whole shape, also when ZeRO-3 holds only a partition of it here."""
    return tuple(getattr(t, "ds_shape", t.shape))


def _unique_tensors(model) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers by state_dict name, without one tied to a
    tensor already taken (the tied output head). By identity: under ZeRO-3 partitioned weights
    share no storage to compare."""
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


class LearnerGroup:
    """`cfg.num_ranks` Learner actors in one placement group (packed on as few nodes as they fit);
    rank 0 hosts the rendezvous on its own node. Each call runs on all ranks, returns rank 0's."""

    def __init__(self, cfg: LearnerConfig, model_path: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 ds_overrides: Optional[dict] = None, wait: bool = True):
        """`wait=False`: return once the ranks are created (they load in the background); `wait()`."""
        self.placement = RolePlacement("learner", cfg.num_ranks, num_cpus, num_gpus).reserve()
        addr, port = self.placement.address(0)
        # torch would start one thread per core in every rank; ranks sharing cores then thrash.
        env = {"OMP_NUM_THREADS": str(max(1, int(num_cpus)))}
        self.ranks = [ray.remote(Learner).options(**self.placement.options(r), runtime_env={"env_vars": env})
                      .remote(cfg, model_path, r, cfg.num_ranks, addr, port, ds_overrides)
                      for r in range(cfg.num_ranks)]
        if wait:
            self.wait()

    def wait(self) -> "LearnerGroup":
        """Block until every rank has loaded (stopping them all if one failed)."""
        try:
            self._all("ready")
        except BaseException:
            self.shutdown()
            raise
        return self

    def _all(self, method: str, *args):
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])[0]

    def train_step(self, samples: list[DistillSample], step: int, loss: Optional[str] = None) -> StepMetrics:
        """See Learner.train_step; `loss` overrides learner.loss for this step (off-policy: topk_forward_kl)."""
        return ray.get(self.submit_train_step(samples, step, loss))[0]

    def submit_train_step(self, samples: list[DistillSample], step: int,
                          loss: Optional[str] = None) -> list[ray.ObjectRef]:
        """`train_step` started on every rank without waiting: ray.get(refs)[0] is its StepMetrics."""
        batch = ray.put(samples)  # one object, read zero-copy by every rank (a ref argument arrives as its value)
        return [r.train_step.remote(batch, step, loss) for r in self.ranks]

    def reload(self, model_path: str, cfg: Optional[LearnerConfig] = None) -> None:
        """Every rank starts over from `model_path` with a fresh optimizer (Learner.reload)."""
        self._all("reload", model_path, cfg)

    def set_threads(self, threads: Optional[int] = None) -> int:
        """Torch threads per rank (None: the node's cores split over the ranks); see Learner.set_threads."""
        return self._all("set_threads", threads)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("state_dict")

    def state_dict_ref(self) -> ray.ObjectRef:
        """Rank 0's state_dict left in the object store (for weight sync without the driver)."""
        refs = [r.state_dict.remote() for r in self.ranks]
        ray.get(refs[1:])  # the other ranks only take part in the gather
        return refs[0]

    def sequence_logprobs(self, token_ids: list[int]) -> np.ndarray:
        return self._all("sequence_logprobs", token_ids)

    def save(self, path: str) -> None:
        self._all("save", path)

    def save_state(self, path: str) -> None:
        """Resumable training state at `path` (see Learner.save_state); atomic by rename."""
        target = Path(path)
        with checkpoint.state_tmp(target) as tmp:
            self._all("save_state", str(target), str(tmp))

    def load_state(self, path: str) -> int:
        """Restore the state saved at `path` on every rank; returns the optimizer steps it holds."""
        return self._all("load_state", path)

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        self.placement.release()
