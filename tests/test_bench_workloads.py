"""The consolidation benchmark's paper-shape workloads run on their own random-initialised model:
`python -m benchmarks.consolidation --workloads paper-large` works on a machine where the tiny
model was never built."""


def test_a_paper_workload_needs_no_tiny_model(tmp_path, monkeypatch):
    from benchmarks.consolidation import WORKLOADS, workload_config
    from benchmarks.paper_shape import SMALL_ARCH, build_random

    cache = tmp_path / "cache"  # where conf/model/tiny.yaml would find the tiny model: empty
    monkeypatch.setenv("OEL_RAY_CACHE", str(cache))
    model = build_random(SMALL_ARCH, tmp_path / "model")
    cfg = workload_config(WORKLOADS["paper-small"], str(model))
    assert (cfg.model.path, cfg.model.build) == (str(model), None)
    assert not cache.exists()
