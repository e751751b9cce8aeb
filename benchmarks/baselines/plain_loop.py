"""Baseline (b): one process, plain PyTorch + Hugging Face: `generate`, a teacher forward pass with the
knowledge in context, the full-vocabulary reverse KL, an AdamW step. What a user writes in an afternoon."""

from __future__ import annotations

import time

import torch

from benchmarks.baselines.work import Run, Work, completion_mask, left_pad, load_model, positions


def response_logprobs(model, prompts, prompt_mask, completion, comp_mask, temperature: float) -> torch.Tensor:
    """log-softmax over the whole vocabulary at each completion position, [B, R, V], after `prompts`."""
    ids = torch.cat([prompts, completion], 1)
    mask = torch.cat([prompt_mask, comp_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    width = prompts.shape[1]  # logits at position p predict token p + 1
    return torch.log_softmax(logits[:, width - 1:-1].float() / temperature, dim=-1)


def run_plain_loop(work: Work) -> Run:
    torch.manual_seed(work.seed)
    student, teacher = load_model(work.model_path), load_model(work.model_path).eval()
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=work.lr, betas=work.betas, weight_decay=work.weight_decay)
    run = Run("plain PyTorch loop", len(work.batches[0]))
    for step, pairs in enumerate(work.batches):
        start = time.perf_counter()
        prompts, prompt_mask = left_pad([s for s, _ in pairs], work.pad_id)
        with torch.no_grad():
            seqs = student.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True,
                                    temperature=work.temperature, top_k=0, top_p=1.0,
                                    max_new_tokens=work.max_new_tokens, eos_token_id=work.stop_ids,
                                    pad_token_id=work.pad_id)
        completion = seqs[:, prompts.shape[1]:]
        comp_mask = completion_mask(completion, work.stop_ids)
        teacher_prompts, teacher_mask = left_pad([t for _, t in pairs], work.pad_id)
        with torch.no_grad():
            lt = response_logprobs(teacher, teacher_prompts, teacher_mask, completion, comp_mask, work.temperature)
        ls = response_logprobs(student, prompts, prompt_mask, completion, comp_mask, work.temperature)
        kl = (ls.exp() * (ls - lt)).sum(-1)  # reverse KL(student || teacher) per position
        loss = (kl * comp_mask).sum() / comp_mask.sum().clamp(min=1)  # token mean, as oel_ray
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), work.grad_clip)
        optimizer.step()
        if step >= work.warmup_steps:
            run.step_seconds.append(time.perf_counter() - start)
            run.response_tokens.append(int(comp_mask.sum()))
    return run
