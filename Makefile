# Two entry points; each sets up .venv by itself first (a no-op once installed).
.PHONY: setup pipeline test lint

setup:
	@bash scripts/setup.sh

pipeline: setup
	.venv/bin/snakemake --cores all $(SNAKEMAKE_ARGS)

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
