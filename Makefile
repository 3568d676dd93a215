# One-command entry points: `make test` and `make demo` set everything up on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_SYSTEM := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
FASHION_LOCAL := .data/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: setup data test test-fast demo bench results gpu-check clean

setup: $(STAMP) data

# The whole pinned stack in one pip call (torch/torchvision CUDA build that runs on CPU, ~7 GB, ~4 min cold).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian: installed system-wide as root, else the .deb is extracted into ./.data.
data:
	@if [ -f $(FASHION_SYSTEM) ] || [ -f $(FASHION_LOCAL) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist); \
	else \
		mkdir -p .data && cd .data && apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb . ; \
	fi

test: setup
	$(PY) -m pytest -q

# The edit-test loop: everything that neither starts Ray nor is slow (MLflow stores, the loopback S3 server); < 1 min.
test-fast: setup
	$(PY) -m pytest -q -m "not ray and not slow"

demo: setup
	$(VENV)/bin/otc-ray demo

# docs/results.md, every table and plot in it, rebuilt from the cell files of benchmarks/results/cells (about a minute;
# trains nothing).
results: setup
	$(PY) benchmarks/defense_bench.py report

# A first sitting of the defense benchmark on 2 cores (~1.5 h; run it on an idle machine): the OT solver benchmark,
# the re-match stage, and one seed of two fashion attacks, whose cell files land in benchmarks/results/cells and
# docs/results.md is rebuilt from them. The whole matrix (2 data sets x 3 attacks x 4 defenses x 3 seeds, ~7.5 h)
# is `defense_bench.py run` without flags; a variant is `--variants NAME` (benchmarks/variants/NAME.yaml).
bench: setup
	$(PY) benchmarks/ot_bench.py
	$(PY) benchmarks/rematch_bench.py --quick
	$(PY) benchmarks/defense_bench.py run --datasets fashion --seeds 0 --attacks patch+targeted,blended

# On one CUDA GPU: OTCCLIP in bf16 on the GPU, the re-match stage on a GPU actor, OT us/pair GPU vs CPU (< 5 min).
# `make gpu-check GPU_CHECK_ARGS=--cpu` is the dry run of the same parts on the CPU.
gpu-check:
	benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
