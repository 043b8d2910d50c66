# Two commands do all set-up: `make demo` and `make test`. Each creates .venv
# when missing and installs what it needs; re-running is cheap.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test test-fast lint bench bench-long clean

# constraints.txt holds the exact versions (torch 2.14.1 + torchvision 0.29.1, ...);
# pyproject.toml only the ranges adaptnet supports.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Fashion-MNIST's idx files, from Debian, when we may install packages (best effort).
	if [ "$$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "note: dataset-fashion-mnist not installed"; fi
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,data,vision,hf,bench]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/adaptnet demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks

# pytest exits 5 when it collects no test; make treats that as a failure.
test: lint
	$(PY) -m pytest -q

# The loop while editing (under 2 minutes on 2 cores): everything but the tests marked
# slow (subprocesses, torchrun, kills, fuzzing, CLI and full recipe trainings,
# torch.compile/export/ONNX graph builds, benchmark smoke runs).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Every benchmark in turn (about an hour on 2 cores), then BENCHMARKS.md's tables are
# regenerated from benchmarks/results/. `python benchmarks/run.py NAME` runs one.
bench: $(STAMP)
	$(PY) benchmarks/run.py

# The long benchmarks: tying, ALBERT sharing and an SDN ResNet trained to convergence with
# three seeds, per-token depth decoders, earlyon side by side, torchvision ResNet-18
# transfer. Many hours on 2 cores; the converged ones keep their runs in runs/bench/ and
# pick up where they were cut when run again.
bench-long: $(STAMP)
	$(PY) benchmarks/run.py --long

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache .hypothesis
