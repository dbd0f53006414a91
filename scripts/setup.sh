#!/usr/bin/env bash
# Set up posfleet on a Debian machine: the Python venv, and (with --services) the real services the tests use.
set -o errexit -o pipefail -o nounset
cd "$(dirname "$0")/.."

want_services=0
for arg in "$@"; do
  case "$arg" in
    --services) want_services=1 ;;
    *) echo "usage: scripts/setup.sh [--services]" >&2; exit 2 ;;
  esac
done

if [ "$want_services" = 1 ]; then
  packages=(mosquitto mosquitto-clients prometheus prometheus-alertmanager victoria-metrics influxdb chromium fonts-wqy-microhei curl systemd openssl tzdata)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # Packages start their system services; the tests start their own on free ports, so stop these.
    for s in mosquitto prometheus prometheus-alertmanager prometheus-node-exporter influxdb victoria-metrics; do
      "${sudo_cmd[@]}" service "$s" stop >/dev/null 2>&1 || true
    done
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,grafana]'
echo "setup: done (.venv)"
