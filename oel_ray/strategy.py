"""Consolidation modes as one strategy each: everything that differs between on-policy OEL and the
off-policy context-distillation baseline, decided here and read by the stages that act on it.

on_policy (OEL, `consolidation.mode=on_policy`): the student, the rollout workers holding the
current weights, replies to each prefix without knowledge; the learner minimises learner.loss (a
reverse KL) on those replies; its weights reach the workers after every step.
off_policy (the baseline): the workers keep the round-start weights all round, so they are the
teacher, and reply with the knowledge in context; the learner minimises the forward form of
learner.loss (top-k: KL(teacher || student) on the teacher's top-k; an estimator: on the teacher's
sampled tokens; seqkd: the teacher's replies as targets); the weights reach the workers once,
after the round.
"""

from __future__ import annotations

from dataclasses import dataclass

# The losses learner.loss chooses (oel_ray/losses.py), and the off-policy one, which it does not.
TOPK_REVERSE_KL, FULL_REVERSE_KL, SAMPLED_REVERSE_KL = "topk_reverse_kl", "full_reverse_kl", "sampled_reverse_kl"
# The public code's kl_loss_type estimators on the sampled token, differentiated as written (not as
# REINFORCE): k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1, abs = |d|, with d = log p_sampler - log p_other
# of the sampled token; and seqkd, the negative log-likelihood of the teacher's own replies.
K1, K2, K3, ABS, SEQKD = "k1", "k2", "k3", "abs", "seqkd"
ESTIMATORS = (K1, K2, K3, ABS)
LOSSES = (TOPK_REVERSE_KL, FULL_REVERSE_KL, SAMPLED_REVERSE_KL) + ESTIMATORS + (SEQKD,)
FORWARD_KL = "topk_forward_kl"
FORWARD_SUFFIX = "_forward"  # an estimator on the teacher's samples: KL(teacher || student)
REVERSE, FORWARD = "reverse", "forward"  # KL(student || teacher), KL(teacher || student)
# learner.loss values off-policy consolidation takes (the teacher samples, so the forward forms)
OFF_POLICY_LOSSES = (TOPK_REVERSE_KL,) + ESTIMATORS + (SEQKD,)
# those the teacher scores on the sampled token alone, not on a top-k support (with their forward forms)
SAMPLED_TOKEN_LOSSES = (SAMPLED_REVERSE_KL,) + ESTIMATORS + (SEQKD,)


def kl_direction(loss: str) -> str:
    """Which KL `loss` minimises (and StepMetrics.kl reports)."""
    return FORWARD if loss == FORWARD_KL or loss.endswith(FORWARD_SUFFIX) else REVERSE


def forward_form(loss: str) -> str:
    """The off-policy form of learner.loss `loss` (one of OFF_POLICY_LOSSES): the same measure with
    the teacher as the sampler."""
    return FORWARD_KL if loss == TOPK_REVERSE_KL else loss + FORWARD_SUFFIX


# Every loss the learner can be asked to minimise: learner.loss's values and their forward forms.
LEARNER_LOSSES = LOSSES + tuple(forward_form(loss) for loss in OFF_POLICY_LOSSES)


def scores_sampled_tokens(loss: str) -> bool:
    """Whether `loss` (as the learner gets it) reads the teacher's log-prob of the sampled token only,
    not of a top-k support."""
    return loss.removesuffix(FORWARD_SUFFIX) in SAMPLED_TOKEN_LOSSES


@dataclass(frozen=True)
class Strategy:
    name: str  # consolidation.mode
    workers_read_knowledge: bool  # the workers sample the teacher's prompt, not the student's
    sync_each_step: bool  # the learner's weights reach the workers after every step (else after the round)
    losses: tuple[str, ...]  # the learner.loss values this mode takes

    def loss(self, learner_loss: str) -> str:
        """What the learner minimises, given learner.loss: the teacher's samples (off-policy) turn it
        into its forward form."""
        return forward_form(learner_loss) if self.workers_read_knowledge else learner_loss

    @property
    def kl_direction(self) -> str:
        """REVERSE or FORWARD: the KL the loss minimises and the step metrics report."""
        return kl_direction(self.loss(TOPK_REVERSE_KL))

    def worker_prompt(self, student: list[int], teacher: list[int]) -> list[int]:
        """The prompt the workers reply to, of a sample's student and teacher prompts."""
        return teacher if self.workers_read_knowledge else student


# seqkd learns the teacher's replies, which only off-policy sampling produces
ON_POLICY = Strategy("on_policy", workers_read_knowledge=False, sync_each_step=True,
                     losses=tuple(loss for loss in LOSSES if loss != SEQKD))
OFF_POLICY = Strategy("off_policy", workers_read_knowledge=True, sync_each_step=False, losses=OFF_POLICY_LOSSES)
STRATEGIES = {s.name: s for s in (ON_POLICY, OFF_POLICY)}
