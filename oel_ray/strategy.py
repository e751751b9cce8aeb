"""Consolidation modes as one strategy each: everything that differs between on-policy OEL and the
off-policy context-distillation baseline, decided here and read by the stages that act on it.

on_policy (OEL, `consolidation.mode=on_policy`): the student, the rollout workers holding the
current weights, replies to each prefix without knowledge; the learner minimises learner.loss (a
reverse KL) on those replies; its weights reach the workers after every step.
off_policy (the baseline): the workers keep the round-start weights all round, so they are the
teacher, and reply with the knowledge in context; the learner minimises the forward KL
KL(teacher || student) on the teacher's top-k; the weights reach the workers once, after the round.
"""

from __future__ import annotations

from dataclasses import dataclass

# The losses learner.loss chooses (oel_ray/losses.py), and the off-policy one, which it does not.
TOPK_REVERSE_KL, FULL_REVERSE_KL, SAMPLED_REVERSE_KL = "topk_reverse_kl", "full_reverse_kl", "sampled_reverse_kl"
LOSSES = (TOPK_REVERSE_KL, FULL_REVERSE_KL, SAMPLED_REVERSE_KL)
FORWARD_KL = "topk_forward_kl"
REVERSE, FORWARD = "reverse", "forward"  # KL(student || teacher), KL(teacher || student)


def kl_direction(loss: str) -> str:
    """Which KL `loss` minimises (and StepMetrics.kl reports)."""
    return FORWARD if loss == FORWARD_KL else REVERSE


@dataclass(frozen=True)
class Strategy:
    name: str  # consolidation.mode
    workers_read_knowledge: bool  # the workers sample the teacher's prompt, not the student's
    sync_each_step: bool  # the learner's weights reach the workers after every step (else after the round)
    takes_learner_loss: bool  # learner.loss chooses the loss (else the strategy's own)

    def loss(self, learner_loss: str) -> str:
        """What the learner minimises, given learner.loss."""
        return learner_loss if self.takes_learner_loss else FORWARD_KL

    @property
    def kl_direction(self) -> str:
        """REVERSE or FORWARD: the KL the loss minimises and the step metrics report (every
        learner.loss is a reverse KL, so the strategy's own loss decides)."""
        return kl_direction(self.loss(TOPK_REVERSE_KL))

    def worker_prompt(self, student: list[int], teacher: list[int]) -> list[int]:
        """The prompt the workers reply to, of a sample's student and teacher prompts."""
        return teacher if self.workers_read_knowledge else student


ON_POLICY = Strategy("on_policy", workers_read_knowledge=False, sync_each_step=True,
                     takes_learner_loss=True)
OFF_POLICY = Strategy("off_policy", workers_read_knowledge=True, sync_each_step=False,
                      takes_learner_loss=False)
STRATEGIES = {s.name: s for s in (ON_POLICY, OFF_POLICY)}
