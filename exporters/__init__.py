"""What leaves the collector process: InfluxDB history, Prometheus rules, Alertmanager, Grafana."""
