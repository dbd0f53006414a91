"""The test harness: real services on free loopback ports, one process type (`core.Process`) and one way to
wait (`core.wait_until(check, timeout, what)`). Fixtures are registered in tests/conftest.py.

- core: ports, HTTP helpers, `Process`, `spawn`, Mosquitto and the collector
- alerting: Prometheus + Alertmanager from the deploy/ configs, a webhook sink
- dash: Prometheus scraping given targets, InfluxDB 1.x with a database, a fake Grafana, a v2-write bridge
- tsdb: VictoriaMetrics and influxd processes
- nats: a three-node NATS JetStream cluster with its MQTT gateway, the partition mapping and the streams
"""
