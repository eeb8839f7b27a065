# The front door: `make demo` and `make test` both start by creating the virtualenv and installing the
# pinned dependencies (torch as the CPU wheel torch==2.13.0; everything else from constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo demo-quick test bench docs clean gpu-check gpu-check-smoke

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -e ".[dev,bench]" -c constraints.txt
	touch $@

demo: install
	$(VENV)/bin/posttrain demo --out demo-out

demo-quick: install
	$(VENV)/bin/posttrain demo --quick --out demo-out-quick

test: install
	$(PY) -m pytest -n auto --dist loadfile

bench: install
	$(PY) benchmarks/sft.py
	$(PY) benchmarks/dpo.py
	$(PY) benchmarks/rm.py
	$(PY) benchmarks/grpo.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/rag.py

# on a machine with one CUDA GPU: every command on it (about 0.5B parameters), asserted and timed; see scripts/
gpu-check: install
	scripts/gpu_check.sh

gpu-check-smoke: install
	scripts/gpu_check.sh --cpu-smoke --out gpu-check-smoke-out

docs: install
	$(VENV)/bin/posttrain config-reference --out docs/config.md

clean:
	rm -rf demo-out demo-out-quick .pytest_cache
