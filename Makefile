# The two quick-start commands. Each one sets up .venv/ first (fast when nothing changed).
PY := .venv/bin/python
ARGS ?=

.PHONY: setup finetune test lint dry-run

setup:
	@bash scripts/setup_env.sh dev,bench,wandb,gguf

finetune: setup
	$(PY) scripts/finetune.py --config configs/quickstart.yaml $(ARGS)

dry-run: setup
	$(PY) scripts/finetune.py --dry-run $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check qlora_orpo scripts tests
