"""The support desk: diagnosis, transaction ledger, reconciliation, its routes, CLI and page."""
