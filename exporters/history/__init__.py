"""History (runtime): InfluxDB line protocol, the batched writer and its disk spool."""
