"""Memory of the consolidation loss at Qwen3's vocabulary, and the bytes the teacher sends per token.

    python -m benchmarks.kl_memory

1. Loss memory at V=151,936, T=1024 response tokens, batch 2, hidden 256, fp32, forward + backward
   (gradients for the hidden states and the output head), side by side in one run:
   - topk: oel_ray's loss as the learner calls it (`losses.topk_reverse_kl_from_hidden`, the chunked
     `_HeadKL`, `DistillModule.chunk_tokens` positions per chunk), student top-k support, k=256;
   - naive: the logits materialised as [B, T, V] fp32, log-softmax, exact full-vocabulary reverse
     KL against the teacher's full [B, T, V] fp32 logits (what a learner needs without a support),
     autograd backward.
   Each variant runs in a fresh subprocess. Memory = peak RSS while the variant runs minus RSS just
   before it; what both share (hidden states, output head) exists before, what each needs (support
   and teacher log-probs, or the teacher's full logits) is allocated inside. The peak is Linux's
   VmHWM, reset first through /proc/self/clear_refs (ru_maxrss when that is not allowed): torch's
   CPU allocations are not seen by tracemalloc, and large ones go straight to mmap, so RSS is exact.
2. Teacher payload: bytes per response token of what the real TeacherServer returns (per sample
   its k fp32 log-probs per token, DistillSample.teacher_logprobs) and of the support ids it is given (DistillSample.support_ids: k
   int32 per token), pickled with protocol 5 as Ray stores numpy payloads. Limit: 8k + 16.

Prints a table and saves benchmarks/results/kl_memory.json. Needs ~10 GB of free memory (naive).
"""

from __future__ import annotations

import json
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

V, T, BATCH, HIDDEN, K = 151_936, 1024, 2, 256, 256
TEMPERATURE = 0.7
MAX_RATIO = 1 / 8
ROOT = Path(__file__).resolve().parents[1]
TEACHER_SAMPLES, TEACHER_RESPONSE_TOKENS = 4, 1024


# ----------------------------------------------------------------------------- one variant (subprocess)

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def run_variant(name: str) -> dict:
    import torch

    from oel_ray import losses
    from oel_ray.deepspeed_setup import DistillModule

    torch.manual_seed(0)
    hidden = (torch.randn(BATCH, T, HIDDEN) * 0.5).requires_grad_()
    head = (torch.randn(V, HIDDEN) * 0.02).requires_grad_()
    mask = torch.ones(BATCH, T, dtype=torch.bool)
    baseline = _rss_bytes("VmRSS")
    exact_peak = _reset_peak()
    start = time.perf_counter()
    if name == "topk":
        support = torch.randint(0, V, (BATCH, T, K))
        teacher_lp = torch.log_softmax(torch.randn(BATCH, T, K), -1)
        out = losses.topk_reverse_kl_from_hidden(hidden, head, support, teacher_lp, mask, temperature=TEMPERATURE,
                                                  chunk_tokens=DistillModule.chunk_tokens)
        loss = out.loss
    elif name == "naive":
        teacher_logits = torch.randn(BATCH, T, V)
        ls = torch.log_softmax(hidden @ head.t() / TEMPERATURE, -1)
        lt = torch.log_softmax(teacher_logits / TEMPERATURE, -1)
        loss = (ls.exp() * (ls - lt)).sum(-1).mean()
    else:
        raise ValueError(name)
    loss.backward()
    seconds = time.perf_counter() - start
    assert hidden.grad is not None and head.grad is not None
    peak = _rss_bytes("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": name, "peak_bytes": peak - baseline, "seconds": seconds, "loss": float(loss),
            "peak_source": "VmHWM after clear_refs" if exact_peak else "ru_maxrss"}


def measure(name: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kl_memory", "--variant", name],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- teacher payload

def teacher_payload(model_path: str) -> dict:
    """Bytes per response token the real TeacherServer returns and is given, at k = K."""
    import numpy as np

    from oel_ray.teacher import TeacherServer
    from oel_ray.types import DistillSample

    teacher = TeacherServer(model_path, dtype="float32", temperature=TEMPERATURE, chunk_tokens=1024,
                            batch_tokens=8192)
    vocab = teacher.model.config.vocab_size
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(TEACHER_SAMPLES):
        prompt = rng.integers(10, vocab, 64).tolist()
        response = rng.integers(10, vocab, TEACHER_RESPONSE_TOKENS).tolist()
        support = np.stack([rng.choice(vocab, K, replace=False) for _ in response]).astype(np.int32)
        samples.append(DistillSample(prompt[:32], prompt, response, support))
    scores = teacher.score(samples)
    tokens = sum(len(s.response_ids) for s in samples)
    assert all(lp.shape == (len(s.response_ids), K) and lp.dtype == np.float32
               for s, lp in zip(samples, scores))
    returned = len(pickle.dumps(scores, protocol=5))
    given = len(pickle.dumps([s.support_ids for s in samples], protocol=5))
    return {"k": K, "response_tokens": tokens, "samples": len(samples),
            "teacher_returns_bytes_per_token": returned / tokens,
            "support_ids_bytes_per_token": given / tokens,
            "total_bytes_per_token": (returned + given) / tokens,
            "limit_bytes_per_token": 8 * K + 16}


# ----------------------------------------------------------------------------- report

def main() -> None:
    from benchmarks.common import markdown_table, save, tiny_model_path

    rows = {name: measure(name) for name in ("topk", "naive")}
    ratio = rows["topk"]["peak_bytes"] / rows["naive"]["peak_bytes"]
    payload = teacher_payload(tiny_model_path())
    gib = 2**30
    print(f"\nLoss, forward + backward: V={V:,}, T={T}, batch {BATCH}, hidden {HIDDEN}, k={K}, fp32\n")
    print(markdown_table(["variant", "peak memory (GiB)", "seconds"],
                         [[n, r["peak_bytes"] / gib, r["seconds"]] for n, r in rows.items()]))
    print(f"\ntopk / naive peak memory: {ratio:.3f} (limit {MAX_RATIO:.3f})\n")
    print(markdown_table(["teacher payload per response token", "bytes"], [
        ["returned: teacher_logprobs (k fp32 log-probs)", payload["teacher_returns_bytes_per_token"]],
        ["given: DistillSample.support_ids (k int32)", payload["support_ids_bytes_per_token"]],
        ["total", payload["total_bytes_per_token"]],
        ["limit 8k + 16", payload["limit_bytes_per_token"]]]))
    path = save("kl_memory", {
        "shape": {"vocab": V, "response_tokens": T, "batch": BATCH, "hidden": HIDDEN, "k": K, "dtype": "float32"},
        "variants": rows, "peak_ratio_topk_over_naive": ratio, "max_ratio": MAX_RATIO,
        "teacher_payload": payload})
    print(f"\nsaved {path}")
    assert ratio <= MAX_RATIO, f"top-k loss peak is {ratio:.3f} of the naive one (limit {MAX_RATIO:.3f})"
    assert payload["total_bytes_per_token"] <= payload["limit_bytes_per_token"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(run_variant(sys.argv[2])))
    else:
        from benchmarks.common import quiet_libraries

        quiet_libraries()
        main()
