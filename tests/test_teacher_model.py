"""teacher.model (the public code's ref_model_path): another checkpoint of the same tokenizer teaches
every round, end to end on `tiny` with every real part. The teacher here is deeper than the student
(3 layers against 2, its own random weights), so a round start that handed it the student's weights,
as the default teacher gets them, would be refused: a two-round run that finishes shows the teacher
was built from teacher.model and kept it."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def deeper_teacher(tiny_model: str, where) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers += 1
    config.layer_types = config.layer_types + config.layer_types[-1:]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(where)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(where)
    return str(where)


def test_another_checkpoint_teaches_every_round(tiny_model, smallest_tiny, tmp_path):
    teacher = deeper_teacher(tiny_model, tmp_path / "teacher")
    out = tmp_path / "run"
    overrides = [a for a in smallest_tiny if not a.startswith("rounds=")] + ["rounds=2"]
    proc = subprocess.run([sys.executable, "-m", "oel_ray.main", *overrides, f"model.path={tiny_model}",
                           f"teacher.model={teacher}", f"hydra.run.dir={out}"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["model"] == teacher
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    # A random teacher is far from the student: the KL is large from the first step of each round,
    # unlike a round-start teacher, whose only difference is the knowledge in its prompt.
    rows = [json.loads(line) for r in (1, 2) for line in (out / f"round_{r}" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["kl"] > 0.5 for row in rows), [row["kl"] for row in rows]
