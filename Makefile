# The README's commands. Every target installs first (idempotent, quick when done).
.PHONY: install demo test lint bench

install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh

test: install
	.venv/bin/python -m pytest tests

lint: install
	.venv/bin/ruff check .

# Benchmarks print their figures (minutes; run on a quiet machine).
bench: install
	.venv/bin/python -m pip install --quiet -e ".[dev,bench]"
	.venv/bin/python scripts/bench_preprocess.py
	.venv/bin/python scripts/bench_declared.py
	.venv/bin/python scripts/bench_loader.py
	.venv/bin/python scripts/bench_train.py
	.venv/bin/python scripts/bench_auc.py
	.venv/bin/python scripts/bench_predict.py
	.venv/bin/python scripts/bench_scale.py
	.venv/bin/python scripts/bench_large_table.py
	.venv/bin/python scripts/bench_baselines.py
