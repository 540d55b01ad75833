# rollnet: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench data browser clean reproduce-mnist reproduce-mnist-fashion reproduce-vowels reproduce-resnet

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 numpy
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package, where apt is available (optional: its tests skip without it).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; Fashion-MNIST features will ask for it"; \
	fi

# Headless Chromium from Debian's package, where apt is available (optional: the report's browser test skips without it).
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "note: could not install chromium; the HTML report's browser test will be skipped"; \
	fi

demo: $(STAMP)
	$(PY) -m rollnet.demo

test: $(STAMP) data browser
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

# The paper's experiments with rollnet sweep (docs/reproduction.md): not part of make test.
# Each is resumable: rerun the target after an interruption. JOBS workers share the cores.
JOBS ?= 2
SWEEP := $(PY) -m rollnet sweep

reproduce-mnist: $(STAMP)
	$(SWEEP) configs/mnist_roll_c025.json --set roll.approx=3 epochs=270 val_margin_samples=0 progress=false \
		--grid roll.lam=1,2,4,8 --grid roll.C=0.25,1 --jobs $(JOBS) --out sweeps/mnist --study mnist \
		--export results/mnist

reproduce-mnist-fashion: $(STAMP) data
	$(SWEEP) configs/mnist_roll_c025.json --set data.name=fashion_mnist roll.approx=3 epochs=20 val_margin_samples=0 \
		progress=false --grid roll.lam=2,8 --grid roll.C=1 --jobs $(JOBS) --val-limit 1000 --test-limit 1000 \
		--out sweeps/mnist-fashion --study mnist-fashion --export results/mnist-fashion

reproduce-vowels: $(STAMP)
	$(SWEEP) configs/vowels_roll.json --set epochs=50 val_margin_samples=0 progress=false \
		--grid roll.lam=0.03125,0.25 --jobs $(JOBS) --out sweeps/vowels --study vowels --export results/vowels

reproduce-resnet: $(STAMP) data
	$(SWEEP) configs/fashion_resnet_roll_approx.json --set data.train_size=5000 epochs=10 val_margin_samples=0 \
		progress=false --grid roll.lam=0.001,0.01 --jobs $(JOBS) --val-limit 200 --test-limit 100 \
		--out sweeps/resnet --study resnet --export results/resnet
	$(PY) -m rollnet evaluate $$(ls -d results/resnet/*/) --limit 20 --distortion 0.03125 --samples 200 \
		--population 120 --generations 5 --out results/resnet

# make bench BENCH_ARGS="--device cuda" on a machine with a GPU
BENCH_ARGS ?=
bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
