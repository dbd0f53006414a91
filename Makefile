# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo test lint check-generated unit integration bench

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/posfleet demo

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports  # the rooms' import contracts (pyproject.toml [tool.importlinter])

check-generated:
	.venv/bin/posfleet rules check
	.venv/bin/posfleet dashboards check

unit:
	.venv/bin/python -m pytest tests/unit -q

integration:
	.venv/bin/python -m pytest tests/integration -q

test:
	scripts/setup.sh --services
	$(MAKE) lint check-generated
	.venv/bin/python -m pytest -q

bench:
	.venv/bin/python bench/bench_ingest.py
