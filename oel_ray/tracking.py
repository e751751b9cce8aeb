"""What a run shows while it runs: per-step metrics (JSONL + CSV, TensorBoard, optional W&B), a
round table in the console and a PNG of pass rate and response length per round."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from oel_ray import artifacts
from oel_ray.config import TrackingConfig
from oel_ray.layout import RoundLayout, RunLayout
from oel_ray.types import StepMetrics

log = logging.getLogger("oel_ray")


def timed(name: str, fn):
    log.info("[%s] ...", name)
    start = time.perf_counter()
    result = fn()
    log.info("[%s] done in %.1fs", name, time.perf_counter() - start)
    return result


def row_kl(row: dict) -> float:
    """A metrics row's KL; rows written before StepMetrics.kl (named reverse_kl then) keep that name."""
    return row["kl"] if "kl" in row else row["reverse_kl"]


def flat_metrics(m: StepMetrics) -> dict:
    row = {k: v for k, v in vars(m).items() if k != "seconds"}
    row.update({f"seconds_{k}": round(v, 4) for k, v in m.seconds.items()})
    total = sum(m.seconds.values())
    row["tokens_per_second"] = round(m.response_tokens / total, 2) if total else 0.0
    return row


class StepLog:
    """One round's step metrics. Rows stream to metrics.jsonl as steps finish; `resume_at(step)`
    drops rows past the step the training state was restored to, so a resumed round has each
    step once; `close()` writes metrics.csv."""

    def __init__(self, round_files: RoundLayout, cfg: TrackingConfig, first_step: int):
        self.jsonl, self.csv = round_files.metrics_jsonl, round_files.metrics_csv
        self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines()] if self.jsonl.exists() else []
        run = RunLayout(round_files.run)
        self.writer = _tensorboard(run, first_step) if cfg.tensorboard else None
        self.wandb = _wandb(run.root, cfg) if cfg.wandb else None

    def resume_at(self, step: int) -> None:
        self.rows = [row for row in self.rows if row["step"] <= step]
        artifacts.atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, m: StepMetrics) -> dict:
        row = flat_metrics(m)
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {"loss": m.loss, "kl": m.kl, "grad_norm": m.grad_norm, "lr": m.lr,
                   "tokens_per_second": row["tokens_per_second"], "student_mass": m.student_mass,
                   "teacher_mass": m.teacher_mass}
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(f"consolidate/{name}", value, m.step)
            self.writer.flush()
        if self.wandb:
            self.wandb.log({f"consolidate/{k}": v for k, v in scalars.items()}, step=m.step)
        return row

    def close(self) -> list[dict]:
        artifacts.write_csv(self.csv, self.rows)
        if self.writer:
            self.writer.close()
        return self.rows


def _tensorboard(run: RunLayout, first_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events a cut-off attempt logged past the restored step
    return SummaryWriter(str(run.tensorboard), purge_step=first_step + 1)


def _wandb(run_dir: Path, cfg: TrackingConfig):
    import wandb

    return wandb.init(project=cfg.wandb_project, dir=str(run_dir), name=run_dir.name, resume="allow",
                      id=run_dir.name.replace("/", "-"))


# ----------------------------------------------------------------------------- rounds

def rounds_table(reports: list[dict], kl: dict[int, tuple[float, float]], teacher_reads: str = "-",
                 consolidation: str = "-") -> str:
    """One row per round. `teacher_reads` and `consolidation` (mode and loss, which names the KL of the
    last column) say which run, or control, this is: shown on the rounds that consolidated."""
    lines = ["| round | pass rate | 95% CI | tokens/turn | invalid | IF-Eval strict | teacher reads | consolidation "
             "| KL first -> last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        first_last = kl.get(rep["round"])
        kl_text = f"{first_last[0]:.4f} -> {first_last[1]:.4f}" if first_last else "-"
        ood = ifeval_accuracy(rep)
        setup = f"{teacher_reads} | {consolidation}" if rep["round"] else "- | -"
        lines.append(f"| {rep['round']} | {rep['pass_rate']:.3f} | [{rep['ci_low']:.3f}, {rep['ci_high']:.3f}] "
                     f"| {rep['response_tokens_per_turn']:.1f} | {rep['invalid_rate']:.3f} "
                     f"| {'-' if ood is None else f'{ood:.3f}'} | {setup} | {kl_text} |")
    return "\n".join(lines) + "\n"


def curve_cells(row: dict) -> str:
    """The cells every in-context curve table shows of one step: knowledge tokens, pass rate, 95% CI."""
    return f"{row['knowledge_tokens']:.0f} | {row['pass_rate']:.3f} | [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def curves_table(curves: dict[int, dict]) -> str:
    """The in-context curves (each round's knowledge_eval.json) as one table; "" when none."""
    if not curves:
        return ""
    lines = ["", "In context: held-out pass rate with the knowledge of the chains played (extractor.eval_chains) "
             "at an accumulation step in the teacher's prompt (step 0: none; * the step consolidation reads)", "",
             "| round | step | chains | games | knowledge tokens | pass rate | 95% CI | tokens/turn |",
             "|---|---|---|---|---|---|---|---|"]
    for r, curve in sorted(curves.items()):
        for row in curve["steps"]:
            mark = "*" if row["step"] == curve["use_step"] else ""
            lines.append(f"| {r} | {row['step']}{mark} | {curve.get('chains', '-')} | {row['games']} | {curve_cells(row)} "
                         f"| {row['response_tokens_per_turn']:.1f} |")
    return "\n".join(lines) + "\n"


def ifeval_accuracy(report: dict) -> Optional[float]:
    return report["ifeval"]["strict_prompt_accuracy"] if "ifeval" in report else None


def plot_rounds(reports: list[dict], path: Path, curves: Optional[dict[int, dict]] = None) -> Optional[Path]:
    """Pass rate (with its 95% interval) and mean response tokens per turn, per round; beside the
    pass rate, when measured, each round's in-context curve (`curves`: knowledge_eval.json by round)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience: never fail a run for it
        log.warning("matplotlib is not installed; skipping %s", path)
        return None
    rounds = [r["round"] for r in reports]
    rate = [r["pass_rate"] for r in reports]
    err = [[r["pass_rate"] - r["ci_low"] for r in reports], [r["ci_high"] - r["pass_rate"] for r in reports]]
    ood = [ifeval_accuracy(r) for r in reports]
    panels = (3 if any(v is not None for v in ood) else 2) + bool(curves)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5))
    if curves:
        _plot_curves(axes[1], curves)
        axes = [axes[0], *axes[2:]]  # the per-round panels
    left, right = axes[0], axes[1]
    left.errorbar(rounds, rate, yerr=err, marker="o", capsize=4)
    left.set(xlabel="round", ylabel="pass rate", ylim=(0, 1), title="held-out pass rate (95% CI)")
    right.plot(rounds, [r["response_tokens_per_turn"] for r in reports], marker="o", color="tab:orange")
    right.set(xlabel="round", ylabel="tokens", title="response tokens per turn")
    if len(axes) == 3:
        axes[2].plot(rounds, [float("nan") if v is None else v for v in ood], marker="o", color="tab:green")
        axes[2].set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="IF-Eval prompt-level strict (OOD)")
    for ax in axes:
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with artifacts.atomic_open(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def _plot_curves(ax, curves: dict[int, dict]) -> None:
    """Pass rate by accumulation step, one line and 95% band per round; hollow: the step used."""
    for r, curve in sorted(curves.items()):
        rows = curve["steps"]
        steps = [row["step"] for row in rows]
        line, = ax.plot(steps, [row["pass_rate"] for row in rows], marker="o", label=f"round {r}")
        ax.fill_between(steps, [row["ci_low"] for row in rows], [row["ci_high"] for row in rows],
                        color=line.get_color(), alpha=0.15)
        used = [row for row in rows if row["step"] == curve["use_step"]]
        ax.plot([row["step"] for row in used], [row["pass_rate"] for row in used], marker="o", markersize=11,
                markerfacecolor="none", color=line.get_color(), linestyle="none")
    ax.set(xlabel="accumulation step (knowledge in context)", ylabel="pass rate", ylim=(0, 1),
           title="in context (95% CI)")
    ax.set_xticks(sorted({row["step"] for curve in curves.values() for row in curve["steps"]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


class progress:
    """A progress bar on stderr for a long stage (a no-op with tracking.progress_bars=false);
    `update(n, **shown)` advances it and shows the latest values."""

    def __init__(self, total: int, name: str, cfg: TrackingConfig, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=f"  {name}", disable=not cfg.progress_bars,
                        leave=False, dynamic_ncols=True)

    def __enter__(self) -> "progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def update(self, n: int, **shown: float) -> None:
        if shown:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        self.bar.update(n)
