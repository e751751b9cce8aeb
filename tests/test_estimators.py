"""The public code's sampled-token estimators (learner.loss=k1, k2, k3, abs) through a whole on-policy
consolidation on the real roles: the vLLM worker samples, the teacher server scores the sampled
tokens with the knowledge in context, the DeepSpeed learner steps and the weights go back to the
worker. Each estimator's value and gradient are checked against a direct computation in
test_losses.py; here each must run the loop and report what it minimised."""

from dataclasses import replace

import pytest
from distill_setup import KNOWLEDGE, distill_config, distill_roles

STEPS, BATCH = 2, 4


@pytest.fixture(scope="module")
def on_policy_roles(ray_cluster, tiny_model, tmp_path_factory):
    cfg = distill_config(tiny_model, str(tmp_path_factory.mktemp("estimators")), steps=STEPS, batch=BATCH, lr=1e-4,
                         learner={"loss": "k1"})
    with distill_roles(cfg, ray_cluster) as (roles, tokenizer, _, _):
        yield cfg, roles, tokenizer


@pytest.mark.parametrize("loss", ["k1", "k2", "k3", "abs"])
def test_each_estimator_runs_the_on_policy_loop(on_policy_roles, loss):
    from oel_ray.consolidate import consolidate
    from oel_ray.games import Game, train_specs

    shared, roles, tokenizer = on_policy_roles
    cfg = replace(shared, learner=replace(shared.learner, loss=loss))
    prefixes = [Game(spec, cfg.env.max_turns).prompt() for spec in train_specs(cfg.env, 1, BATCH, 1)]
    metrics = []
    consolidate(roles, cfg, [prefixes] * STEPS, [KNOWLEDGE], tokenizer, first_step=0, on_step=metrics.append)
    assert len(metrics) == STEPS and {m.kl_direction for m in metrics} == {"reverse"}
    for m in metrics:  # kl: the mean of d = log p_student - log p_teacher on the sampled tokens
        assert m.response_tokens > 0 and m.grad_norm == m.grad_norm and "sync" in m.seconds
        if loss == "k1":
            assert m.loss == pytest.approx(m.kl, rel=1e-6, abs=1e-9)
        elif loss == "abs":
            assert m.loss >= abs(m.kl) - 1e-9
        else:  # d^2 / 2 and exp(-d) + d - 1 are never negative
            assert m.loss >= 0
