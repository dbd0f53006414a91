"""Where the build-time generators find their inputs, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

__all__ = ["artifact_dir"]


def artifact_dir(module_file: str, in_checkout: str, shipped: str) -> Path:
    """The repository's folder `in_checkout` (relative to the repository root) in a source checkout, else the copy
    the wheel ships next to `module_file` as `shipped` (pyproject maps alert_rules/, docs/runbooks/ and dashboards/
    into the packages). The CLIs also take every path explicitly (--config, --rules, --runbooks, --dir)."""
    here = Path(module_file).resolve().parent  # exporters/<room>/
    checkout = here.parents[1] / in_checkout
    return checkout if checkout.is_dir() else here / shipped
