"""posfleet collector: ingest, state, detection and the HTTP API."""

__version__ = "0.1.0"
