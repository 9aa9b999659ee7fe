# The README's commands. Every target installs first (idempotent, quick when done).
.PHONY: install demo test lint

install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh

test: install
	.venv/bin/python -m pytest tests

lint: install
	.venv/bin/ruff check .
