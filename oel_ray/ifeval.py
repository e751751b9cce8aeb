"""IF-Eval (out-of-distribution skill): prompt-level strict accuracy through the project's workers.

Rows use the IF-Eval JSONL format (google-research `instruction_following_eval/data/input_data.jsonl`,
the HF `google/IFEval` rows): `key`, `prompt`, `instruction_id_list` and one `kwargs` dict per
instruction. Each prompt goes to the policy as one user turn through the chat template (thinking off
by default, as in the paper's protocol), one sampled reply per prompt; a prompt counts when its
reply follows every instruction (`oel_ray.ifeval_checks`). The lm-eval route for the full benchmark
is in `oel_ray.ifeval_lmeval`.

Each prompt samples with its own seed derived from (sampling seed, row key), so a prompt's reply
does not depend on the number of workers or on what else is in the batch, and is the same in every
round: rounds are compared on common random numbers.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from oel_ray.evaluate import wilson_interval
from oel_ray.ifeval_checks import INSTRUCTIONS, follows, instruction_kwargs, unknown_message
from oel_ray.prompts import THINK_CLOSE, chat_ids
from oel_ray.seeds import ifeval_prompt_seed
from oel_ray.types import Sampling

FIXTURE = Path(__file__).resolve().parent / "data" / "ifeval_fixture.jsonl"
UNKNOWN_MODES = ("error", "skip")


@dataclass(frozen=True)
class IFEvalRow:
    key: Union[int, str]
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]
    where: str = field(default="", compare=False)  # "file:line", for error messages

    def label(self) -> str:
        return f"{self.where or 'row'} (key {self.key})"


# ----------------------------------------------------------------------------- loading

def parse_row(obj, where: str) -> IFEvalRow:
    """One IF-Eval row from its JSON object; a one-line error names the place and the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a row must be a JSON object with key, prompt, instruction_id_list, kwargs")
    missing = [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in obj]
    if missing:
        raise ValueError(f"{where}: missing field {', '.join(missing)} (IF-Eval rows have key, prompt, "
                         "instruction_id_list, kwargs)")
    key, prompt, ids, kwargs = obj["key"], obj["prompt"], obj["instruction_id_list"], obj["kwargs"]
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise ValueError(f"{where}: field key must be an integer or a string, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: field prompt must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: field instruction_id_list must be a non-empty list of instruction ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: field kwargs must hold one object per instruction id "
                         f"({len(ids)}), got {json.dumps(kwargs)[:80]}")
    return IFEvalRow(key, prompt, tuple(ids), tuple(kwargs), where)


def load_rows(source: Union[str, Path]) -> list[IFEvalRow]:
    """"fixture": the team's fixture; otherwise the path of an IF-Eval JSONL file."""
    path = FIXTURE if str(source) == "fixture" else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"IF-Eval rows: {path} is not a file; give 'fixture' or the path of an IF-Eval "
                                "JSONL file (e.g. google-research's instruction_following_eval/data/input_data.jsonl)")
    rows: list[IFEvalRow] = []
    seen: dict = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}, column {err.colno}); "
                                 "each line must be one IF-Eval row object") from None
            row = parse_row(obj, where)
            if row.key in seen:  # keys seed the sampling: duplicates would share replies
                raise ValueError(f"{where}: key {row.key!r} already used at line {seen[row.key]}; keys must be unique")
            seen[row.key] = number
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no IF-Eval rows in this file")
    return rows


def select_rows(rows: list[IFEvalRow], unknown: str = "error") -> tuple[list[IFEvalRow], Counter, int]:
    """Check every row's instructions before anything is generated. unknown="error": the first
    unsupported id stops with a one-line error; "skip": such instructions are dropped and counted,
    and a prompt left with none is dropped too. Returns (rows, skipped ids, prompts dropped)."""
    if unknown not in UNKNOWN_MODES:
        raise ValueError(f"unknown={unknown!r} is not one of {', '.join(UNKNOWN_MODES)}")
    kept, skipped, dropped = [], Counter(), 0
    for row in rows:
        pairs = []
        for iid, kw in zip(row.instruction_ids, row.kwargs):
            if iid not in INSTRUCTIONS:
                if unknown == "error":
                    raise ValueError(unknown_message(iid, row.label()))
                skipped[iid] += 1
                continue
            pairs.append((iid, instruction_kwargs(iid, kw, row.label())))
        if not pairs:
            dropped += 1
            continue
        kept.append(dataclasses.replace(row, instruction_ids=tuple(p[0] for p in pairs),
                                        kwargs=tuple(p[1] for p in pairs)))
    return kept, skipped, dropped


def check_response(row: IFEvalRow, response: str) -> list[bool]:
    """Whether the reply follows each instruction of the row, in order (strict)."""
    return [follows(iid, response, kw, row.label()) for iid, kw in zip(row.instruction_ids, row.kwargs)]


# ----------------------------------------------------------------------------- report

@dataclass
class IFEvalReport:
    prompts: int
    strict_prompt_accuracy: float  # fraction of prompts whose reply follows all their instructions
    ci_low: float  # 95% Wilson interval of the prompt-level accuracy
    ci_high: float
    strict_instruction_accuracy: float  # over all instructions of all prompts
    per_instruction: dict[str, float]  # instruction id -> fraction followed
    instruction_counts: dict[str, int]  # instruction id -> how many prompts carry it
    mean_response_tokens: float
    truncated: int = 0  # replies cut at max_tokens
    skipped_instructions: dict[str, int] = field(default_factory=dict)  # unsupported ids (unknown="skip")
    skipped_prompts: int = 0  # prompts with only unsupported instructions
    samples: list[dict] = field(default_factory=list)  # key, response, followed, response_tokens

    def summary(self) -> dict:
        """Everything but the replies: what goes into the round summary."""
        return {k: v for k, v in asdict(self).items() if k != "samples"}

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        skipped = sum(self.skipped_instructions.values())
        return (
            "| prompts | prompt-level strict | 95% CI | instruction-level strict | tokens/reply | truncated "
            "| skipped instructions |\n|---|---|---|---|---|---|---|\n"
            f"| {self.prompts} | {self.strict_prompt_accuracy:.3f} | [{self.ci_low:.3f}, {self.ci_high:.3f}] "
            f"| {self.strict_instruction_accuracy:.3f} | {self.mean_response_tokens:.1f} | {self.truncated} "
            f"| {skipped} |\n"
        )


def score(rows: list[IFEvalRow], responses: list[str], response_tokens: Optional[list[int]] = None,
          finished: Optional[list[bool]] = None) -> IFEvalReport:
    """The report for replies already generated (one per row, in order); rows as `select_rows` gives."""
    if len(responses) != len(rows):
        raise ValueError(f"{len(responses)} replies for {len(rows)} prompts")
    tokens = response_tokens or [0] * len(rows)
    followed_by_id: dict[str, list[bool]] = {}
    samples = []
    for row, reply, n in zip(rows, responses, tokens):
        followed = check_response(row, reply)
        for iid, ok in zip(row.instruction_ids, followed):
            followed_by_id.setdefault(iid, []).append(ok)
        samples.append({"key": row.key, "response": reply, "followed": followed, "response_tokens": n})
    passes = sum(all(s["followed"]) for s in samples)
    flat = [ok for s in samples for ok in s["followed"]]
    low, high = wilson_interval(passes, len(rows))
    return IFEvalReport(
        prompts=len(rows), strict_prompt_accuracy=passes / max(1, len(rows)), ci_low=low, ci_high=high,
        strict_instruction_accuracy=sum(flat) / max(1, len(flat)),
        per_instruction={i: sum(v) / len(v) for i, v in sorted(followed_by_id.items())},
        instruction_counts={i: len(v) for i, v in sorted(followed_by_id.items())},
        mean_response_tokens=sum(tokens) / max(1, len(rows)),
        truncated=0 if finished is None else sum(not f for f in finished),
        samples=samples,
    )


# ----------------------------------------------------------------------------- generation

def reference_sampling(max_tokens: int = 1280, seed: int = 42) -> Sampling:
    """The paper's IF-Eval sampling (temperature 0.7, top_p 0.8, top_k 20, seed 42); 1280 new tokens
    is lm-eval's ifeval default."""
    return Sampling(max_tokens=max_tokens, temperature=0.7, top_p=0.8, top_k=20, seed=seed)


def prompt_seeds(rows: list[IFEvalRow], base: int) -> list[int]:
    """One sampling seed per prompt from (base seed, row key): independent of batching and sharding."""
    return [ifeval_prompt_seed(base, r.key) for r in rows]


def answer_text(reply: str, thinking: bool) -> str:
    """The part of a reply that is checked. Thinking on: what follows the last </think> (a reply
    cut inside its reasoning has no answer). Thinking off: the reply exactly as generated."""
    if not thinking:
        return reply
    return reply.rsplit(THINK_CLOSE, 1)[1].lstrip() if THINK_CLOSE in reply else ""


def run_ifeval(workers, tokenizer, rows: list[IFEvalRow], sampling: Sampling, thinking: bool = False,
               *, unknown: str = "error") -> IFEvalReport:
    """Generate one reply per prompt through `workers.generate` (a RolloutGroup or anything with its
    API) and score them. Rows are checked first (`select_rows`), so a bad row fails before any
    generation. Without `sampling.seed` the replies are not reproducible."""
    kept, skipped, dropped = select_rows(rows, unknown)
    if not kept:
        raise ValueError(f"no IF-Eval prompt has a supported instruction ({dropped} dropped); "
                         f"skipped ids: {dict(skipped)}")
    sampling = dataclasses.replace(sampling, support_k=0)  # no top-k support needed to score replies
    prompts = [chat_ids(tokenizer, row.prompt, thinking=thinking) for row in kept]
    seeds = None if sampling.seed is None else prompt_seeds(kept, sampling.seed)
    generations = workers.generate(prompts, sampling, seeds)
    report = score(kept, [answer_text(g.text, thinking) for g in generations], [len(g.token_ids) for g in generations],
                   [g.finished for g in generations])
    report.skipped_instructions = dict(skipped)
    report.skipped_prompts = dropped
    return report
