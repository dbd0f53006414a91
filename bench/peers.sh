#!/usr/bin/env bash
# posfleet side by side with its peers in ../shared/bench (same broker, same generated fleet, one run).
#
# Prepares var/bench/collector.yaml and var/bench/terminals.csv (100,000 terminals T0000000.. on 2,000 sites,
# 50 per site, 4 acquirers; merchant ids as fleetgen sends them, so no terminal is a merchant mismatch), sets the
# COLLECTOR_* variables of the bench README's "Plugging in our collector" and runs ../shared/bench/run_peers.sh
# with the arguments given (default: the quick burst comparison below). Environment passes through, e.g.
#
#   bench/peers.sh                                                    # naive vs posfleet, burst, QoS 1
#   BENCH_MAX_INFLIGHT=20 bench/peers.sh                              # Mosquitto's default in-flight window
#   bench/peers.sh --modes burst,paced,drain --qos 1                  # the issue's full comparison
#   COLLECTOR_POLL_S=0 bench/peers.sh                                 # read /metrics only after warm-up and at the end
#   PEERS_TERMINALS=1000000 PEERS_SITES=300000 bench/peers.sh --terminals 1000000 ...
set -o errexit -o pipefail -o nounset

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
terminals=${PEERS_TERMINALS:-100000}
sites=${PEERS_SITES:-2000}
bench_dir=${PEERS_BENCH_DIR:-../shared/bench}
mkdir -p var/bench/results

.venv/bin/python - "$terminals" "$sites" <<'EOF'
import sys

terminals, sites = int(sys.argv[1]), int(sys.argv[2])
per_site = max(1, terminals // sites)
with open("var/bench/terminals.csv", "w") as fh:
    fh.write("terminal_id,merchant_id,acquirer,model,site,region\n")
    for i in range(terminals):
        site = min(i // per_site, sites - 1)
        # fleetgen's heartbeat carries mid M%05d of i // 20 and model A920.
        fh.write(f"T{i:07d},M{i // 20:05d},acq-{'abcd'[site % 4]},A920,S{site:06d},r{site % 10}\n")
EOF

cat > var/bench/collector.yaml <<EOF
# Written by bench/peers.sh for ../shared/bench: its broker on 18861, our API and /metrics on 18864.
mqtt:
  url: mqtt://127.0.0.1:${BENCH_MQTT_PORT_OVERRIDE:-18861}
  client_id: posfleet-bench
http:
  host: 127.0.0.1
  port: 18864
registry:
  path: $root/var/bench/terminals.csv
  reload_interval_s: 3600
state:
  snapshot_path: $root/var/bench/state.snapshot
  snapshot_interval_s: 3600
EOF
.venv/bin/posfleet check-config var/bench/collector.yaml >/dev/null

export COLLECTOR_NAME=${COLLECTOR_NAME:-posfleet}
export COLLECTOR_CMD=${COLLECTOR_CMD:-"rm -f $root/var/bench/state.snapshot*; cd $root && exec .venv/bin/python -m collector.cli --log-level WARNING run --config $root/var/bench/collector.yaml"}
export COLLECTOR_METRICS_URL=${COLLECTOR_METRICS_URL:-http://127.0.0.1:18864/metrics}
export COLLECTOR_COUNTER=${COLLECTOR_COUNTER:-posfleet_messages}
export COLLECTOR_LABEL_FILTER=${COLLECTOR_LABEL_FILTER:-'result="accepted"'}
export COLLECTOR_POLL_S=${COLLECTOR_POLL_S:-0.25}

echo "load before the run: $(uptime)" >&2
if [ "$#" -eq 0 ]; then
  set -- --ingesters naive,collector --modes burst --qos 1 --terminals "$terminals" --burst-count 200000 \
    --skip-selftest
fi
status=0
"$bench_dir/run_peers.sh" --results-dir var/bench/results "$@" || status=$?
echo "load after the run: $(uptime)" >&2
exit "$status"
