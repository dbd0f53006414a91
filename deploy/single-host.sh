#!/usr/bin/env bash
# The posfleet stack on one Debian host without Docker: Mosquitto (per-terminal ACL), VictoriaMetrics (the
# line-protocol history server), Alertmanager, Prometheus (posfleet's alert rules) and the collector from a
# Python venv, every one from its Debian package (or the venv) and configured under one prefix directory.
#
#   deploy/single-host.sh [options] up|down|status
#
# By default each service runs as a plain background process with a PID file under PREFIX/run (no root, no
# systemctl: this is how the tests run it, on free ports in a temp dir). With --systemd each service becomes a
# `posfleet-stack-<name>.service` unit instead (root only). See docs/deploy.md.
set -o errexit -o pipefail -o nounset

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_UP=(mosquitto victoria-metrics alertmanager collector prometheus)
SERVICES_DOWN=(prometheus collector alertmanager victoria-metrics mosquitto)

usage() {
  cat <<EOF
usage: $(basename "$0") [options] up|down|status

  --prefix DIR             configs, data, logs, PID files and secrets live here (default /var/lib/posfleet-stack)
  --bind ADDR              address of the HTTP services (default 127.0.0.1)
  --mqtt-bind ADDR         address terminals connect to (default 0.0.0.0)
  --mqtt-port N            terminals, feeds, collector (default 1883)
  --mqtt-gateway-port N    gateways such as the simulator (default 1884)
  --collector-port N       (default 9108)
  --metrics-port N         serve the collector's /metrics only on this port (default: on --collector-port)
  --prometheus-port N      (default 9090)      --alertmanager-port N  (default 9093)
  --vm-port N              VictoriaMetrics (default 8428)
  --scrape-interval DUR    Prometheus scrape interval (default 30s, as the alert rules assume)
  --venv DIR               venv with posfleet installed (default $REPO/.venv)
  --registry FILE          terminal registry CSV for the collector (default: none)
  --collector-config FILE  use this collector config instead of generating one (ports must match)
  --alertmanager-config F  (default deploy/alertmanager/alertmanager.yml when present, else a null receiver)
  --rules GLOB             alert rule files (default $REPO/alert_rules/*.rules.yml)
  --systemd                run the services as systemd units instead of PID-file processes (root)
  --timeout SECONDS        how long \`up\` waits for every service to be ready (default 60)

status exits 0 when every service runs and answers, 3 otherwise.
EOF
}

die() { echo "single-host: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------- options
PREFIX=/var/lib/posfleet-stack
BIND=127.0.0.1
MQTT_BIND=0.0.0.0
MQTT_PORT=1883
MQTT_GATEWAY_PORT=1884
COLLECTOR_PORT=9108
METRICS_PORT=""
PROMETHEUS_PORT=9090
ALERTMANAGER_PORT=9093
VM_PORT=8428
SCRAPE_INTERVAL=30s
VENV="$REPO/.venv"
REGISTRY=""
COLLECTOR_CONFIG=""
ALERTMANAGER_CONFIG=""
RULES="$REPO/alert_rules/*.rules.yml"
SYSTEMD=0
TIMEOUT=60
ACTION=""

while (($#)); do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --bind) BIND="$2"; shift 2 ;;
    --mqtt-bind) MQTT_BIND="$2"; shift 2 ;;
    --mqtt-port) MQTT_PORT="$2"; shift 2 ;;
    --mqtt-gateway-port) MQTT_GATEWAY_PORT="$2"; shift 2 ;;
    --collector-port) COLLECTOR_PORT="$2"; shift 2 ;;
    --metrics-port) METRICS_PORT="$2"; shift 2 ;;
    --prometheus-port) PROMETHEUS_PORT="$2"; shift 2 ;;
    --alertmanager-port) ALERTMANAGER_PORT="$2"; shift 2 ;;
    --vm-port) VM_PORT="$2"; shift 2 ;;
    --scrape-interval) SCRAPE_INTERVAL="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --registry) REGISTRY="$2"; shift 2 ;;
    --collector-config) COLLECTOR_CONFIG="$2"; shift 2 ;;
    --alertmanager-config) ALERTMANAGER_CONFIG="$2"; shift 2 ;;
    --rules) RULES="$2"; shift 2 ;;
    --systemd) SYSTEMD=1; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    up | down | status) ACTION="$1"; shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ -n "$ACTION" ]] || { usage >&2; exit 2; }
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
STACK_ENV="$PREFIX/stack.env"

# `status` and `down` use what `up` chose, whatever options they are given.
if [[ "$ACTION" != up && -f "$STACK_ENV" ]]; then
  # shellcheck source=/dev/null
  source "$STACK_ENV"
fi

RUN="$PREFIX/run" LOG="$PREFIX/log" ETC="$PREFIX/etc" DATA="$PREFIX/data" SECRETS="$PREFIX/secrets"

# ---------------------------------------------------------------------------------------------- helpers
need() {  # need BINARY DEBIAN-PACKAGE
  command -v "$1" >/dev/null || die "$1 not found: apt-get install $2"
}

binary_of() {
  case "$1" in
    mosquitto) command -v mosquitto || echo /usr/sbin/mosquitto ;;
    victoria-metrics) command -v victoria-metrics ;;
    alertmanager) command -v prometheus-alertmanager ;;
    prometheus) command -v prometheus ;;
  esac
}

port_of() {
  case "$1" in
    mosquitto) echo "$MQTT_PORT" ;;
    victoria-metrics) echo "$VM_PORT" ;;
    alertmanager) echo "$ALERTMANAGER_PORT" ;;
    prometheus) echo "$PROMETHEUS_PORT" ;;
    collector) echo "$COLLECTOR_PORT" ;;
  esac
}

listening() {  # listening PORT: something accepts TCP connections on loopback
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

http_host() { [[ "$BIND" == 0.0.0.0 ]] && echo 127.0.0.1 || echo "$BIND"; }

ready() {  # ready SERVICE: the service answers its health endpoint
  local host
  host="$(http_host)"
  case "$1" in
    mosquitto) listening "$MQTT_PORT" && listening "$MQTT_GATEWAY_PORT" ;;
    victoria-metrics) curl -fsS --max-time 2 "http://$host:$VM_PORT/health" >/dev/null 2>&1 ;;
    alertmanager) curl -fsS --max-time 2 "http://$host:$ALERTMANAGER_PORT/-/ready" >/dev/null 2>&1 ;;
    prometheus) curl -fsS --max-time 2 "http://$host:$PROMETHEUS_PORT/-/ready" >/dev/null 2>&1 ;;
    collector) curl -fsS --max-time 2 "http://$host:$COLLECTOR_PORT/readyz" >/dev/null 2>&1 ;;
  esac
}

live_pid() {  # live_pid SERVICE: the PID its PID file names, if that process is alive (whatever it runs)
  local file="$RUN/$1.pid" pid
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

pid_of() {  # pid_of SERVICE: its PID if the PID file names a live process of that binary
  local pid
  pid="$(live_pid "$1")" || return 1
  # A PID file can outlive its process and the PID be reused: require this stack's prefix in its command line.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$PREFIX/" || return 1
  echo "$pid"
}

command_of() {  # command_of SERVICE: the argv, one word per line
  case "$1" in
    mosquitto) printf '%s\n' "$(binary_of mosquitto)" -c "$ETC/mosquitto.conf" ;;
    victoria-metrics)
      printf '%s\n' "$(binary_of victoria-metrics)" "-httpListenAddr=$BIND:$VM_PORT" \
        "-storageDataPath=$DATA/victoria-metrics" -retentionPeriod=400d -loggerLevel=WARN ;;
    alertmanager)
      printf '%s\n' "$(binary_of alertmanager)" "--config.file=$ETC/alertmanager.yml" \
        "--storage.path=$DATA/alertmanager" "--web.listen-address=$BIND:$ALERTMANAGER_PORT" \
        "--cluster.listen-address=" --log.level=warn ;;
    prometheus)
      printf '%s\n' "$(binary_of prometheus)" "--config.file=$ETC/prometheus.yml" \
        "--storage.tsdb.path=$DATA/prometheus" "--web.listen-address=$BIND:$PROMETHEUS_PORT" \
        --storage.tsdb.retention.time=30d --log.level=warn ;;
    collector) collector_argv; printf '%s\n' run --config "$ETC/collector.yaml" ;;
  esac
}

collector_argv() {  # the installed entry point, or the source tree run with the venv's Python
  if [[ -x "$VENV/bin/posfleet" ]]; then
    printf '%s\n' "$VENV/bin/posfleet"
  else
    printf '%s\n' env "PYTHONPATH=$REPO" "$VENV/bin/python" -m collector.cli
  fi
}

# ---------------------------------------------------------------------------------------------- configs
random_secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n' ; }

ensure_secret() {  # ensure_secret NAME: a random secret file, created once, readable by the owner only
  local file="$SECRETS/$1"
  [[ -s "$file" ]] || (umask 077 && random_secret >"$file")
}

write_secrets() {
  install -d -m 0700 "$SECRETS"
  ensure_secret collector_mqtt_password
  ensure_secret simulator_mqtt_password
  # Users already in the password file (terminals, acquirer feeds) are kept; ours are (re)set.
  (umask 077 && touch "$SECRETS/mosquitto_passwd")
  mosquitto_passwd -b "$SECRETS/mosquitto_passwd" posfleet-collector "$(<"$SECRETS/collector_mqtt_password")"
  mosquitto_passwd -b "$SECRETS/mosquitto_passwd" posfleet-simulator "$(<"$SECRETS/simulator_mqtt_password")"
}

write_configs() {
  install -d "$ETC" "$RUN" "$LOG" "$DATA"/{mosquitto,victoria-metrics,alertmanager,prometheus,collector}
  local user
  user="$(id -un)"

  # Same listeners and ACLs as the compose stack (deploy/mosquitto/); only paths and ports differ.
  cat >"$ETC/mosquitto.conf" <<EOF
# Generated by deploy/single-host.sh; edit deploy/mosquitto/acl* or the script, not this file.
per_listener_settings true
user $user
persistence true
persistence_location $DATA/mosquitto/
autosave_interval 60
log_dest stdout
log_type error
log_type warning
log_type notice
max_queued_messages 250000
max_inflight_messages 1000

listener $MQTT_PORT $MQTT_BIND
allow_anonymous false
password_file $SECRETS/mosquitto_passwd
acl_file $REPO/deploy/mosquitto/acl
use_username_as_clientid true

listener $MQTT_GATEWAY_PORT $MQTT_BIND
allow_anonymous false
password_file $SECRETS/mosquitto_passwd
acl_file $REPO/deploy/mosquitto/acl-gateways
EOF

  if [[ -n "$ALERTMANAGER_CONFIG" ]]; then
    cp "$ALERTMANAGER_CONFIG" "$ETC/alertmanager.yml"
  elif [[ -f "$REPO/deploy/alertmanager/alertmanager.yml" ]]; then
    cp "$REPO/deploy/alertmanager/alertmanager.yml" "$ETC/alertmanager.yml"
  else
    printf 'route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n' >"$ETC/alertmanager.yml"
  fi

  local host
  host="$(http_host)"
  cat >"$ETC/prometheus.yml" <<EOF
# Generated by deploy/single-host.sh.
global:
  scrape_interval: $SCRAPE_INTERVAL
  evaluation_interval: $SCRAPE_INTERVAL
rule_files:
  - $RULES
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['$host:$ALERTMANAGER_PORT']
scrape_configs:
  - job_name: posfleet
    static_configs:
      - targets: ['$host:${METRICS_PORT:-$COLLECTOR_PORT}']
  - job_name: prometheus
    static_configs:
      - targets: ['$host:$PROMETHEUS_PORT']
  - job_name: alertmanager
    static_configs:
      - targets: ['$host:$ALERTMANAGER_PORT']
  - job_name: victoria-metrics
    static_configs:
      - targets: ['$host:$VM_PORT']
EOF

  if [[ -n "$COLLECTOR_CONFIG" ]]; then
    cp "$COLLECTOR_CONFIG" "$ETC/collector.yaml"
  else
    {
      echo "# Generated by deploy/single-host.sh; pass --collector-config to use your own."
      echo "mqtt:"
      echo "  url: mqtt://127.0.0.1:$MQTT_PORT"
      echo "  client_id: posfleet-collector"
      echo "  username: posfleet-collector"
      echo "  password_file: $SECRETS/collector_mqtt_password"
      echo "http:"
      echo "  host: $BIND"
      echo "  port: $COLLECTOR_PORT"
      if [[ -n "$METRICS_PORT" ]]; then
        echo "metrics:"
        echo "  host: $BIND"
        echo "  port: $METRICS_PORT"
      fi
      if [[ -n "$REGISTRY" ]]; then
        echo "registry:"
        echo "  path: $(realpath "$REGISTRY")"
      fi
      echo "state:"
      echo "  snapshot_path: $DATA/collector/state.snapshot"
      echo "  spool_dir: $DATA/collector/influx-spool"
      echo "influx:"
      echo "  enabled: true"
      echo "  url: http://$host:$VM_PORT"
      echo "  bucket: posfleet"
    } >"$ETC/collector.yaml"
  fi

  cat >"$STACK_ENV" <<EOF
# Written by \`single-host.sh up\`; read by status and down.
BIND=$BIND
MQTT_BIND=$MQTT_BIND
MQTT_PORT=$MQTT_PORT
MQTT_GATEWAY_PORT=$MQTT_GATEWAY_PORT
COLLECTOR_PORT=$COLLECTOR_PORT
METRICS_PORT=$METRICS_PORT
PROMETHEUS_PORT=$PROMETHEUS_PORT
ALERTMANAGER_PORT=$ALERTMANAGER_PORT
VM_PORT=$VM_PORT
VENV=$VENV
SYSTEMD=$SYSTEMD
EOF
}

check_configs() {
  promtool check config "$ETC/prometheus.yml" >"$LOG/promtool.log" 2>&1 \
    || die "Prometheus config or rules invalid: $(cat "$LOG/promtool.log")"
  local argv=()
  mapfile -t argv < <(collector_argv)
  "${argv[@]}" check-config "$ETC/collector.yaml" >"$LOG/check-config.log" 2>&1 \
    || die "collector config invalid: $(cat "$LOG/check-config.log")"
}

# ---------------------------------------------------------------------------------------------- process mode
start_process() {
  local svc="$1" argv=()
  if pid_of "$svc" >/dev/null; then
    echo "$svc: already running"
    return 0
  fi
  local port
  for port in $(port_of "$svc") $([[ "$svc" == mosquitto ]] && echo "$MQTT_GATEWAY_PORT"); do
    if listening "$port"; then
      echo "single-host: $svc: port $port is already in use" >&2
      return 1
    fi
  done
  mapfile -t argv < <(command_of "$svc")
  # Detached from our stdio and session: `up` returns while the service keeps running.
  (cd "$DATA/$svc" && exec setsid "${argv[@]}" >>"$LOG/$svc.log" 2>&1 </dev/null) &
  echo $! >"$RUN/$svc.pid"
}

stop_process() {
  local svc="$1" pid waited=0
  pid="$(pid_of "$svc")" || { rm -f "$RUN/$svc.pid"; return 0; }
  kill -TERM "$pid"
  # The collector flushes its spool and snapshot on SIGTERM: give it its shutdown deadline before SIGKILL.
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited >= 300)); then
      echo "$svc: still running after 30s, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$RUN/$svc.pid"
}

# ---------------------------------------------------------------------------------------------- systemd mode
unit_of() { echo "posfleet-stack-$1.service"; }

start_unit() {
  local svc="$1" argv=() exec_start=""
  mapfile -t argv < <(command_of "$svc")
  printf -v exec_start '%q ' "${argv[@]}"
  cat >"/etc/systemd/system/$(unit_of "$svc")" <<EOF
# Generated by $REPO/deploy/single-host.sh --systemd
[Unit]
Description=posfleet stack: $svc
After=network-online.target
Wants=network-online.target
[Service]
ExecStart=$exec_start
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
[Install]
WantedBy=multi-user.target
EOF
  systemctl daemon-reload
  systemctl enable --now "$(unit_of "$svc")"
}

stop_unit() {
  local unit
  unit="$(unit_of "$1")"
  systemctl disable --now "$unit" 2>/dev/null || true
  rm -f "/etc/systemd/system/$unit"
}

# ---------------------------------------------------------------------------------------------- actions
running() {  # running SERVICE: its process (or unit) is alive
  if ((SYSTEMD)); then
    systemctl is-active --quiet "$(unit_of "$1")"
  else
    pid_of "$1" >/dev/null
  fi
}

started() {  # started SERVICE: the process just started is alive. Not `running`: until the child has exec'd
  # its binary, /proc shows the command line of this script (no "$PREFIX/" in it), and on a loaded machine the
  # first readiness poll can come that early: a service still starting was reported as exited.
  if ((SYSTEMD)); then
    running "$1"
    return
  fi
  live_pid "$1" >/dev/null
}

wait_ready() {
  local svc="$1" deadline=$((SECONDS + TIMEOUT))
  until ready "$svc"; do
    if ! started "$svc"; then
      echo "$svc exited; last log lines:" >&2
      tail -n 20 "$LOG/$svc.log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "$svc not ready after ${TIMEOUT}s; last log lines:" >&2
      tail -n 20 "$LOG/$svc.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

do_up() {
  need mosquitto mosquitto
  need mosquitto_passwd mosquitto
  need victoria-metrics victoria-metrics
  need prometheus-alertmanager prometheus-alertmanager
  need prometheus prometheus
  need promtool prometheus
  need curl curl
  [[ -x "$VENV/bin/python" ]] || die "$VENV/bin/python not found: python3 -m venv $VENV && $VENV/bin/pip install $REPO"
  if ((SYSTEMD)); then
    [[ $EUID -eq 0 ]] || die "--systemd needs root"
  fi
  write_secrets
  write_configs
  check_configs
  local svc failed=0
  for svc in "${SERVICES_UP[@]}"; do
    if ((SYSTEMD)); then start_unit "$svc"; else start_process "$svc" || failed=1; fi
    if ((failed)) || ! wait_ready "$svc"; then
      echo "single-host: $svc failed to start; stopping what was started" >&2
      do_down >&2
      exit 1
    fi
    echo "$svc: up (port $(port_of "$svc"))"
  done
  echo "stack up under $PREFIX"
}

do_down() {
  local svc
  for svc in "${SERVICES_DOWN[@]}"; do
    if ((SYSTEMD)); then stop_unit "$svc"; else stop_process "$svc"; fi
    echo "$svc: down"
  done
}

do_status() {
  local svc bad=0 pid
  for svc in "${SERVICES_UP[@]}"; do
    if ! running "$svc"; then
      echo "$svc: not running"
      bad=1
    elif ! ready "$svc"; then
      echo "$svc: running but not answering on port $(port_of "$svc")"
      bad=1
    else
      pid="$(pid_of "$svc" || echo systemd)"
      echo "$svc: up (pid $pid, port $(port_of "$svc"))"
    fi
  done
  ((bad == 0)) || exit 3
}

case "$ACTION" in
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
esac
