"""Generated documentation stays in sync with the code."""

from pathlib import Path

from collector.commands import render_schema_section

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_schemas_in_docs_match_the_code() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert render_schema_section() in text, "run: posfleet schema --write docs/protocol.md"
