# Two commands on a fresh machine (see README):
#   make demo   - set up, then degrade the built-in sample photographs (preview sheet + pairs)
#   make test   - set up, then run the test suite (CPU; GPU tests skip cleanly)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out

.PHONY: setup demo test bench gpu-check clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes: idempotent and fast once set up.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/degrade demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

# The standard workload of shared/spec/BENCH.md; the naive baseline needs the ffmpeg CLI.
bench: $(STAMP)
	@command -v ffmpeg >/dev/null || (apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null)
	$(VENV)/bin/degrade bench

# Everything that needs a CUDA GPU, in one bounded run (8 min): every CUDA test (gpu-marked and
# --device cuda), each test file in its own pytest process, then short GPU benchmarks, each under its own
# timeout; results and summary.txt in $(OUT)/gpu/ (benchmarks/gpu_check.sh). Installs nothing and uses
# $(PY) as it is: `make gpu-check PY=python3` on a machine whose python3 has the packages; on the GPU
# machine (no registry) run it through the offline kit instead:
#   bash .devkit/on-device.sh bash benchmarks/gpu_check.sh        (see shared/device/README.md)
gpu-check:
	PY=$(PY) OUT=$(OUT)/gpu bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
