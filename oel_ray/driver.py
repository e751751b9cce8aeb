"""The OEL loop, read top to bottom: collect -> extract -> consolidate -> evaluate -> checkpoint.

Round r starts from round r-1's final weights (round 1: the initial model): the rollout workers
play with them, the frozen teacher holds them, and the learner's ranks reload them with a fresh
optimizer (in their own processes), as the paper trains each round anew. Every stage writes its
outputs under <output_dir>/round_<r>/ atomically and is then marked finished in manifest.json, so
re-running the same command skips what finished and resumes consolidation from its last saved
training state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import ray

from oel_ray import artifacts, controls, preflight, tracking
from oel_ray.config import BEST, MIX, PER_STEP, OELConfig
from oel_ray.errors import InputError
from oel_ray.consolidate import consolidate, learner_loss, step_prefixes
from oel_ray.evaluate import curve_markdown, evaluate, evaluate_knowledge, select_best
from oel_ray.extractor import knowledge_set
from oel_ray.games import train_specs
from oel_ray.ifeval import reference_sampling, run_ifeval
from oel_ray.ifeval_lmeval import run_lm_eval_ifeval
from oel_ray.layout import RoundLayout, RunLayout
from oel_ray.manifest import Manifest, config_snapshot
from oel_ray.deployment import Deployment
from oel_ray.roles import sampling_for_play
from oel_ray.seeds import DEPLOY_STREAM, EXTRACTION_STREAM, round_prefix_seed
from oel_ray.tracking import timed
from oel_ray.types import ERROR, INVALID, NO_KNOWLEDGE, RAW_TRAJECTORIES, TRAJECTORIES, KnowledgeRecord

log = logging.getLogger("oel_ray")


def run(cfg: OELConfig, keep_roles: bool = False) -> dict:
    """The whole run (finished stages skipped); `keep_roles`: leave the rollout workers, the teacher
    and the learner's ranks running for a next job with the same settings (a sweep's,
    session.take_kept_roles)."""
    run_dir = RunLayout(Path(cfg.output_dir))
    manifest = Manifest(run_dir.root, config_snapshot(cfg))
    log_to_file(run_dir.log)
    if manifest.resumed:
        log.info("resuming the run in %s: finished stages are skipped", run_dir.root)
    cluster = Deployment(cfg, run_dir)  # roles start on first use: a finished run starts nothing
    started = time.perf_counter()

    def stage(name: str, fn, *outputs: Path) -> None:
        """Run a stage unless it finished earlier and its `outputs` are still there."""
        if manifest.done(name):
            log.info("[%s] finished earlier, skipped", name)
            return
        manifest.start(name)
        timed(name, fn)
        manifest.finish(name, outputs=[p.relative_to(run_dir.root).as_posix() for p in outputs])

    r0 = run_dir.round(0)
    stage(r0.stage("evaluate"), lambda: evaluate_into(r0, cluster.at_round_start(1), cfg, 0), r0.eval)
    if cfg.ood.ifeval == "lm_eval":  # IF-Eval through lm-eval, on the initial checkpoint
        stage(r0.stage("ifeval"), lambda: lm_eval_into(r0, local_checkpoint(cfg.model.path), cfg), r0.lm_eval)
    for r in range(1, cfg.rounds + 1):
        rl = run_dir.round(r)
        # 1. collect: the round-start model plays new training maps, no knowledge in context
        stage(rl.stage("collect"), lambda: play_into(
            rl.trajectories, cluster.at_round_start(r), cfg, r, collect_specs(cfg, r)), rl.trajectories)
        # 2. extract: N chains accumulate knowledge over K trajectories each
        stage(rl.stage("extract"), lambda: extract_into(rl, cluster, cfg, r), rl.knowledge)
        #    ... and the in-context curve: the held-out maps with each chain's knowledge in context
        if cfg.extractor.curve_steps:
            stage(rl.stage("knowledge_eval"), lambda: knowledge_eval_into(rl, cluster, cfg, r), rl.knowledge_eval)
        # 3. consolidate: the same model plays the deploy maps whose turn prefixes it is then
        #    distilled on, strictly on-policy, step by step
        stage(rl.stage("deploy"), lambda: play_into(
            rl.deploy, cluster.at_round_start(r), cfg, r,
            train_specs(cfg.env, r, cfg.learner.steps * cfg.rollout.deploy_games_per_step, DEPLOY_STREAM)),
            rl.deploy)
        stage(rl.stage("consolidate"), lambda: consolidate_round(rl, cluster, cfg, r), rl.metrics_csv)
        # 4. evaluate the consolidated model on the held-out maps
        stage(rl.stage("evaluate"), lambda: evaluate_into(rl, cluster.after_consolidation(r), cfg, r), rl.eval)
        # 5. checkpoint: Hugging Face weights, the next round's starting point and teacher
        stage(rl.stage("checkpoint"), lambda: checkpoint_round(rl, cluster.after_consolidation(r)),
              rl.model_config)
        if cfg.ood.ifeval == "lm_eval":  # ... and on the checkpoint just saved
            stage(rl.stage("ifeval"), lambda: lm_eval_into(rl, str(rl.model), cfg), rl.lm_eval)
        report_rounds(run_dir, r, cfg)
    cluster.shutdown(keep=keep_roles)
    summary = run_summary(run_dir, cfg, time.perf_counter() - started)
    artifacts.write_json(run_dir.summary, summary)
    return summary


# ----------------------------------------------------------------------------- stages

def play_into(path: Path, roles, cfg: OELConfig, r: int, specs) -> None:
    """Play `specs`, streaming the games to disk as they end; the finished file lists them in the
    order of `specs`, whichever worker played them when."""
    writer = artifacts.JsonlWriter(path)
    with tracking.progress(len(specs), path.stem, cfg.tracking) as bar:
        def on_games(part):
            writer.write(t.to_json() for t in part)
            bar.update(len(part))

        trajectories = roles.workers.play(specs, sampling_for_play(cfg), cfg.env.max_turns, r, on_games=on_games)
    writer.close(ordered=(t.to_json() for t in trajectories))
    errors = [t for t in trajectories if t.outcome == ERROR]
    log.info("  %d games, %d passed, %d invalid, %d ended by an environment error", len(trajectories),
             sum(t.passed for t in trajectories), sum(t.outcome == INVALID for t in trajectories), len(errors))
    for t in errors[:3]:
        log.warning("  map %d: %s", t.seed, t.reason)


def collect_specs(cfg: OELConfig, r: int) -> list:
    """The training maps round r's collect stage plays for the chains: extractor.trajectories=per_step,
    maps 0..K-1 each once per chain (the c-th game of a map samples on its own seed stream,
    `seeds.game_sampling_seeds`: chain c's); pool, rollout.games_per_round maps."""
    e = cfg.extractor
    if e.trajectories == PER_STEP:
        return [spec for spec in train_specs(cfg.env, r, e.k, EXTRACTION_STREAM) for _ in range(e.num_chains)]
    return train_specs(cfg.env, r, cfg.rollout.games_per_round, EXTRACTION_STREAM)


def extract_into(rl: RoundLayout, cluster: Deployment, cfg: OELConfig, r: int) -> None:
    trajectories = artifacts.read_trajectories(rl.trajectories)  # before any actor starts
    e = cfg.extractor
    need = e.k * e.num_chains if e.trajectories == PER_STEP else e.k
    if len(trajectories) < need:
        raise InputError(f"{rl.trajectories}: {len(trajectories)} games but the chains read {need} "
                         f"(extractor.k={e.k}, extractor.trajectories={e.trajectories}); delete the file and rerun "
                         "to collect the round again")
    raw = cfg.teacher.context == TRAJECTORIES  # ablation: the trajectories themselves, no extraction
    chains = ray.get(cluster.at_round_start(r).extractor.run.remote(trajectories, None, raw, r))
    use_step = cfg.extractor.knowledge_step
    texts, empty = knowledge_set(chains, use_step)
    source = controls.other_run_file(cfg.teacher, r)  # teacher.knowledge_from: another run's set instead
    if source:
        texts, empty = controls.other_run_set(cfg.teacher, r), 0
    if not texts and cfg.teacher.context != NO_KNOWLEDGE:  # the empty-knowledge control reads none anyway
        raise InputError(f"{rl.dir}: every chain's knowledge at step {use_step} is empty (the extractor wrote no "
                         f"{'items' if cfg.extractor.format == 'structured' else 'text'}); nothing to consolidate: "
                         "try extractor.format=unstructured or a stronger extractor.model, then rerun")
    artifacts.write_json(rl.knowledge, KnowledgeRecord(
        use_step, RAW_TRAJECTORIES if raw else cfg.extractor.format, cfg.teacher.context,
        controls.teacher_set(cfg.teacher, texts, cfg.seed, r), chains, str(source) if source else None).to_json())
    log.info("  %d chains, knowledge at step %d: %s tokens; the teacher reads %s", len(chains), use_step,
             [chain[use_step].num_tokens for chain in chains], controls.teacher_reads(cfg.teacher))
    if empty and cfg.teacher.context != NO_KNOWLEDGE:
        log.warning("  %d of %d chains had no knowledge at step %d; the teacher reads the other %d",
                    empty, len(chains), use_step, len(texts))


def knowledge_eval_into(rl: RoundLayout, cluster: Deployment, cfg: OELConfig, r: int) -> None:
    """The in-context curve (paper Fig. 4): the round-start model on the held-out maps with each
    chain's knowledge (of the first extractor.eval_chains) of every step in extractor.eval_steps in
    the teacher's prompt. Step 0 is the plain prompt: the round-start model's own evaluation, game
    for game, so its games are taken from round r-1's evaluation (played again where that file is
    gone or holds other games)."""
    steps, e = cfg.extractor.curve_steps, cfg.extractor
    # before any actor starts
    chains = artifacts.read_knowledge_chains(rl.knowledge, max(steps))[:e.eval_chains]
    evaluated = RoundLayout(rl.run, r - 1).eval_trajectories
    plain = artifacts.read_trajectories(evaluated) if evaluated.exists() else None
    rows = evaluate_knowledge(cluster.at_round_start(r).workers, cfg, r, chains, steps, plain=plain)
    for row in rows:  # per step, as the public code saves them; the curve below keeps the figures only
        artifacts.write_json(rl.knowledge_step(row["step"]), {"round": r, **row})
    rows = [{k: v for k, v in row.items() if k != "sample_games"} for row in rows]
    selected = select_best(rows, chains) if e.select == BEST else None  # what the teacher then reads
    artifacts.write_json(rl.knowledge_eval, {
        "round": r, "use_step": e.knowledge_step, "maps": cfg.env.eval_maps, "samples": cfg.env.eval_samples,
        "chains": len(chains), "knowledge_position": cfg.teacher.knowledge_position, "steps": rows,
        "selected": selected})
    if selected:
        log.info("  extractor.select=best: chain %d at step %d (in-context pass rate %.3f) is the teacher's knowledge",
                 selected["chain"], selected["step"], selected["pass_rate"])
    table = curve_markdown(rows, e.knowledge_step)
    artifacts.atomic_write_text(rl.knowledge_eval_md, table)
    log.info("  held-out pass rate with each chain's knowledge in context (%d of %d chains), by accumulation "
             "step:\n%s", len(chains), e.num_chains, table)


def teacher_knowledge(rl: RoundLayout, cfg: OELConfig) -> list[str]:
    """The texts the teacher draws from this round: the chains' set (extractor.select=mix), or the one
    chain and step the in-context curve selected (best)."""
    if cfg.extractor.select == MIX:
        return artifacts.read_knowledge_set(rl.knowledge)
    chain, step = artifacts.read_selection(rl.knowledge_eval)
    return [artifacts.read_knowledge_chains(rl.knowledge, step)[chain][step].text]


def consolidate_round(rl: RoundLayout, cluster: Deployment, cfg: OELConfig, r: int) -> None:
    """`learner.steps` on-policy distillation steps; the full training state is saved every
    `learner.checkpoint_every` steps, and a cut-off round resumes from the last save."""
    lcfg = cfg.learner
    base = (r - 1) * lcfg.steps  # global step numbers continue across rounds
    deploy = artifacts.read_trajectories(rl.deploy)  # inputs first: a bad file fails fast
    knowledge = teacher_knowledge(rl, cfg)
    done = cluster.resume_consolidation(r)  # steps of this round already trained (restored)
    batches = step_prefixes(deploy, lcfg.steps, lcfg.batch_size, round_prefix_seed(cfg.seed, r))
    steps = tracking.StepLog(rl, cfg.tracking, first_step=base + done)
    steps.resume_at(base + done)
    last = [done]  # steps of this round completed so far
    with tracking.progress(lcfg.steps, f"round {r} consolidate", cfg.tracking, initial=done) as bar:
        def on_step(m) -> None:
            steps.add(m)
            bar.update(1, kl=m.kl)
            last[0] = m.step - base
            if last[0] % lcfg.checkpoint_every == 0 or last[0] == lcfg.steps:
                cluster.save_training_state(r, last[0])

        try:
            consolidate(cluster.roles, cfg, batches[done:], knowledge, cluster.tokenizer,
                        first_step=base + done, on_step=on_step)
        except Exception:  # a dead role, a weight-sync timeout, a bug: keep the steps done, then stop
            cluster.try_save_training_state(r, last[0])
            raise
    if not cfg.consolidation.strategy.sync_each_step:  # the workers kept the teacher's weights until now
        cluster.sync_workers(version=r * lcfg.steps)
    rows = steps.close()
    log.info("  %s KL %.4f -> %.4f over %d steps", cfg.consolidation.strategy.kl_direction, tracking.row_kl(rows[0]),
             tracking.row_kl(rows[-1]), len(rows))


def evaluate_into(rl: RoundLayout, roles, cfg: OELConfig, r: int) -> None:
    """Held-out games (pass rate) and, out of distribution, IF-Eval; both without knowledge."""
    writer = artifacts.JsonlWriter(rl.eval_trajectories)
    report, trajectories = evaluate(roles.workers, cfg, r, on_games=lambda part: writer.write(t.to_json() for t in part))
    writer.close(ordered=(t.to_json() for t in trajectories))  # sample-major, as the report counts them
    result = report.to_json()
    markdown = report.markdown()
    log.info("  pass rate %.3f [%.3f, %.3f] over %d games", report.pass_rate, report.ci_low, report.ci_high,
             report.games)
    if rows := preflight.ifeval_rows(cfg):
        ood = run_ifeval(roles.workers, roles.tokenizer, rows, reference_sampling(cfg.ood.max_tokens, cfg.ood.seed),
                         unknown=cfg.ood.unknown_instructions)
        artifacts.write_json(rl.ifeval, ood.to_json())
        result["ifeval"] = ood.summary()
        markdown += "\n" + ood.markdown()
        log.info("  IF-Eval prompt-level strict accuracy %.3f over %d prompts", ood.strict_prompt_accuracy,
                 ood.prompts)
    artifacts.write_json(rl.eval, result)
    artifacts.atomic_write_text(rl.eval_md, markdown)


def lm_eval_into(rl: RoundLayout, checkpoint: str, cfg: OELConfig) -> None:
    """IF-Eval prompt-level strict accuracy from lm-eval's ifeval task on a saved checkpoint, with
    the paper's sampling (`oel_ray.ifeval_lmeval`, in a child process)."""
    o = cfg.ood
    metrics = run_lm_eval_ifeval(checkpoint, seed=o.seed, max_gen_toks=o.max_tokens,
                                 max_model_len=cfg.model.max_model_len, dtype=cfg.model.dtype,
                                 gpu_memory_utilization=o.lm_eval_gpu_memory_utilization)
    artifacts.write_json(rl.lm_eval, {
        "source": "lm_eval", "checkpoint": checkpoint, "strict_prompt_accuracy": metrics["prompt_level_strict_acc"],
        "strict_instruction_accuracy": metrics.get("inst_level_strict_acc"), "lm_eval": metrics})
    log.info("  IF-Eval (lm-eval) prompt-level strict accuracy %.3f", metrics["prompt_level_strict_acc"])


def local_checkpoint(path: str) -> str:
    """The directory of a model: `path` itself, or a hub id's snapshot in the local hub cache."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, local_files_only=True)


def checkpoint_round(rl: RoundLayout, roles) -> None:
    roles.learner.save(str(rl.model))
    # The Hugging Face weights are now the round's result; the resumable state has served.
    shutil.rmtree(rl.learner_state, ignore_errors=True)


# ----------------------------------------------------------------------------- reporting

def round_report(rl: RoundLayout) -> dict:
    """The round's eval.json, with lm-eval's IF-Eval beside the pass rate when it measured it."""
    report = json.loads(rl.eval.read_text())
    if rl.lm_eval.exists():
        report["ifeval"] = json.loads(rl.lm_eval.read_text())
    return report


def report_rounds(run_dir: RunLayout, upto: int, cfg: OELConfig) -> None:
    reports = [round_report(run_dir.round(r)) for r in range(upto + 1)]
    table = tracking.rounds_table(reports, {r: kl_first_last(run_dir.round(r)) for r in range(1, upto + 1)},
                                  controls.teacher_reads(cfg.teacher), f"{cfg.consolidation.mode}, {learner_loss(cfg)}")
    curves = in_context_curves(run_dir, upto)
    table += tracking.curves_table(curves)
    artifacts.atomic_write_text(run_dir.rounds_md, table)
    tracking.plot_rounds(reports, run_dir.rounds_png, curves)
    log.info("rounds so far:\n%s", table)


def in_context_curves(run_dir: RunLayout, upto: int) -> dict[int, dict]:
    """Each round's knowledge_eval.json, by round, where the run measured one."""
    paths = {r: run_dir.round(r).knowledge_eval for r in range(1, upto + 1)}
    return {r: json.loads(path.read_text()) for r, path in paths.items() if path.exists()}


def kl_first_last(rl: RoundLayout) -> tuple[float, float]:
    rows = [json.loads(line) for line in rl.metrics_jsonl.read_text().splitlines()]
    return tracking.row_kl(rows[0]), tracking.row_kl(rows[-1])


def run_summary(run_dir: RunLayout, cfg: OELConfig, seconds: float) -> dict:
    final = run_dir.round(cfg.rounds)
    last = round_report(final)
    first_kl, _ = kl_first_last(run_dir.round(1))
    _, last_kl = kl_first_last(final)
    return {
        "rounds": cfg.rounds, "steps": cfg.rounds * cfg.learner.steps, "wall_seconds": round(seconds, 1),
        "pass_rate": last["pass_rate"], "pass_rate_ci": [last["ci_low"], last["ci_high"]],
        "pass_rate_round_0": json.loads(run_dir.round(0).eval.read_text())["pass_rate"],
        "response_tokens_per_turn": last["response_tokens_per_turn"],
        "ifeval_strict_prompt_accuracy": tracking.ifeval_accuracy(last),
        # the KL the loss minimises, in kl_direction (consolidation_loss names the loss)
        "kl_first_step": first_kl, "kl_last_step": last_kl, "consolidation_loss": learner_loss(cfg),
        "kl_direction": cfg.consolidation.strategy.kl_direction,
        "teacher_reads": controls.teacher_reads(cfg.teacher),  # the control, if any (teacher.context)
        # per round: the held-out pass rate by accumulation step with the knowledge in context
        "knowledge_step": cfg.extractor.knowledge_step,
        "in_context_curve": {str(r): [{"step": row["step"], "pass_rate": row["pass_rate"],
                                       "ci": [row["ci_low"], row["ci_high"]]} for row in curve["steps"]]
                             for r, curve in in_context_curves(run_dir, cfg.rounds).items()},
        "final_model": str(final.model),
        "rounds_table": str(run_dir.rounds_md), "plot": str(run_dir.rounds_png),
    }


def log_to_file(path: Path) -> None:
    """Everything the console shows, also appended to the run's log (a resumed run adds to it)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
