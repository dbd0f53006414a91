"""Grafana (build time): dashboard generator and its CLI."""
