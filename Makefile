# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo test lint check-generated unit integration bench

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/posfleet demo

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

check-generated:
	.venv/bin/posfleet rules check
	.venv/bin/posfleet dashboards check

unit:
	.venv/bin/python -m pytest tests/unit -q

test:
	scripts/setup.sh --services
	$(MAKE) lint check-generated
	.venv/bin/python -m pytest -q

bench:
	.venv/bin/python bench/bench_ingest.py
