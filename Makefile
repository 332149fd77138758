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

# Everything that needs a CUDA GPU, in one go (GPU tests, then the GPU benchmarks); results in $(OUT)/gpu/.
gpu-check: $(STAMP)
	mkdir -p $(OUT)/gpu
	$(PY) -m pip install --quiet -e '.[test,gpu]' || echo "PyNvVideoCodec not installable here: codec GPU tests will skip"
	$(PY) -m pytest -q -m gpu --device cuda 2>&1 | tee $(OUT)/gpu/tests.txt
	$(PY) -m benchmarks.grl_speed --device cuda --compile 2>&1 | tee $(OUT)/gpu/grl_speed.txt
	$(PY) -m benchmarks.nvcodec_speed 2>&1 | tee $(OUT)/gpu/nvcodec_speed.txt
	$(VENV)/bin/degrade bench --device cuda --runs 3 --json $(OUT)/gpu/bench.json 2>&1 | tee $(OUT)/gpu/bench.txt

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
