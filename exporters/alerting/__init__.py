"""Alerting (build time): Prometheus rule generator, Alertmanager silences and their CLI."""
