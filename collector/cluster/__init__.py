"""Partitioned collectors on a NATS JetStream cluster (issue 12): which terminals are whose, and failover.

    terminals --MQTT--> NATS MQTT gateway --mapping--> posp.<p>.<tid>.<kind> --source--> stream POSP
    collector: lease p in KV -> state of p from the object store -> consumer posfleet-p<p> from seq + 1

- `partition.py` (pure): p = fnv1a_32(tid) % N, what the servers' `{{partition(N,1)}}` mapping computes (checked
  against a real cluster); the subject back to the MQTT topic ('//' -> '.') for protocol.decode, unchanged.
- `streams.py`: the two stream definitions (POSP partitioned, FEED the acquirer feeds), sourced from the gateway's
  `$MQTT_msgs` so that what the gateway PUBACKed is never lost to a leader change.
- `ownership.py` (pure): who takes and releases what, from the leases and live members read from KV.
- `keeper.py` (I/O, supervised by the app): leases `p.<N>` and members `m.<instance>` in KV bucket
  `posfleet_leases` (bucket TTL = `nats.lease_ttl_s`; create = acquire, update with the last revision = renew,
  delete = clean release), state objects `p<N>` in object store `posfleet_state` (last applied stream sequence +
  the snapshot encoding of the partition's terminals, written every `state.snapshot_interval_s`, on release and
  on shutdown), adoption into the Fleet (a full offline period from adoption: no false offline storm while the
  stream is replayed), self-metrics (`posfleet_cluster_*`).
- collector/ingest/nats.py reads the owned partitions (durable pull consumers, AckPolicy.ALL, acknowledged after
  the batch is applied, rx = the stored timestamp) and the whole acquirer feed (one durable consumer per
  collector); collector/app.py wires it (`ingest.source: nats`), `/readyz` is unready while it owns no partition,
  cannot reach NATS or cannot renew its leases.

Design decisions beyond the brief, and why:
- The streams are sourced from `$MQTT_msgs`, not capturing `posp.>`: H12b measured acknowledged heartbeats lost
  by a capturing stream during a leader change.
- Partition ownership modes: `lease` (default, failover) and `static` (exactly the partitions of `shard: i/K`,
  nobody takes them over; the durable consumers keep their position and the local snapshot file is used, as
  with MQTT). In lease mode `shard` is only a preference, and the local snapshot file is not used.
- Takeover replays from the state object's sequence + 1 even when the dead owner's consumer acknowledged more:
  the state we hold is the object's, so what came after it must be applied again (duplicates of the newest
  heartbeat are recognised by seq). A partition with no state object starts from the last message of every
  subject (DeliverPolicy.LAST_PER_SUBJECT): every terminal's newest heartbeat and status, not 24 h of stream.
- A collector releases partitions above its fair share, or preferred by a live member with room, a few per
  round; it never takes a free partition that a live member with room prefers (no churn between two).
- A collector whose lease renewal failed drops the partition at once and never writes its state again (the
  new owner's); a state write also needs a renewal within the TTL. Renewals run in their own task.
- Our own pull requests answered into a callback subscription instead of nats-py's `fetch`: on Python 3.11
  `fetch` drops a message arriving as its wait times out (asyncio.wait_for around queue.get), the consumer counts
  it delivered and AckPolicy.ALL then acknowledges past it. Every delivery's consumer sequence is checked; a gap
  (a response lost with a node) recreates the consumer from the last applied sequence + 1.
- Deaf = no silence judged (as with a lost MQTT broker): while the connection is down, while a consumer answers
  nothing (not even idle heartbeats), and while the partitioned stream has no leader.

Done: partition function, config section (`ingest.source`, `nats:`, every problem at check-config time), static
shards, leases + state objects + takeover + hand-back on rejoin, acquirer feed read by every collector
(records of terminals owned elsewhere counted `elsewhere`), metrics (owned partitions, pending per partition,
renew failures, leases lost, takeovers by state), tests (tests/unit/test_cluster_*.py,
tests/integration/test_nats_collectors.py: every fault on its owner, kill -9 -> served again in ~7 s, 0 lost).

Measured with an ad-hoc run (not a committed test): 2 collectors, 40 terminals at a 1 s interval (offline
after 3 s), stop of node 2 then kill -9 of node 1, 4 runs after the last fixes: 0 heartbeats unapplied; in one
run 56 heartbeats were stored by POSP out of order after the node restart (seq 22 before 18-21: the sourcing
from `$MQTT_msgs` re-delivers) and judged `stale` (counted, not in history); false `offline` on 2-6 terminals
in 2 of 4 runs at that 1 s interval (the silence starts before a dead consumer leader is noticed, ~1 s):
realistic intervals (offline after 90 s) are far from that; the committed node-stop test
(tests/integration/test_nats_cluster.py, 5 s interval) passes.

Not done (later work): KV reads by a watcher instead of a subjects listing + one get per key per round; a
registry reload computes the partition of every registered id (about 2 s per million ids in Python); the
state objects of every owned partition are encoded at once each snapshot round (memory peak of one snapshot).

Answers across collectors (H12c): `forward.py` - a terminal's routes (the terminal, diagnosis, timeline,
reconcile/receipts with ?terminal_id=) on a collector that does not hold its partition are answered by the owner
through NATS request-reply on `posfleet.api.p.<N>` (subscribed while held; the owner answers through its own API on
loopback with the same bearer token); a partition nobody holds is a 503 naming it; lists (/api/v1/terminals,
/api/v1/sites, /api/v1/reconcile, /api/v1/support/facets) are merged by scatter-gather on `posfleet.api.members`,
naming live members (KV `m.*`) that did not answer and partitions no answer covered (`local=1`: one collector's
part). `fleetwide.py` - every collector publishes sparse per-site offline/shutdown counts each round
(`posfleet.fleet.counts.<instance>`); the owner of partition 0 sums them with the registry's totals, runs the
single-collector hysteresis (`mass_offline_step`) and alone exports the mass-offline and acquirer feed series
(FleetCollector.fleet_level). PosUpstreamFeedStale counts only collectors still exporting the feed series;
dashboards aggregate feed and mass series by acquirer/site. Tests: tests/unit/test_cluster_fleetwide.py,
tests/integration/test_nats_across.py, promtool cases in alert_rules/tests/fleet.test.yml.
Not done there: /api/v1/receipts by acquirer or merchant is not merged (a stream; a 400 says to ask with
terminal_id= or each collector with local=1); every collector still runs its own per-shard mass-offline hysteresis
(logged, and shown by /api/v1/sites?local=1; not exported); a new fleet leader starts its hysteresis afresh (a mass
outage in progress is raised again after `mass_offline.raise_after` of its rounds); merged terminal lists page up to
offset + limit = 1000 (a deeper page is a 400, also on the support page); all collectors must share the API tokens
file (the bearer token is forwarded over NATS: use TLS there); forwarding timeouts are constants (3 s one terminal,
5 s a list), not in the config tree.
"""
