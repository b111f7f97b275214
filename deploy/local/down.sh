#!/usr/bin/env bash
# Stops the topology up.sh started: the load balancer first (no new requests), then every replica with
# SIGTERM (in-flight requests finish, journals are flushed to the database), then Prometheus and the
# simulator. Journals, logs and Prometheus' data stay under the state directory unless --purge.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STATE_DIR=$DEFAULT_STATE_DIR
PURGE=false
while [ $# -gt 0 ]; do
  case $1 in
    --state-dir)
      [ $# -ge 2 ] || die "--state-dir needs a value"
      STATE_DIR=$2
      shift 2
      ;;
    --purge)
      PURGE=true
      shift
      ;;
    -h | --help)
      echo "usage: deploy/local/down.sh [--state-dir DIR (default $DEFAULT_STATE_DIR)] [--purge]"
      exit 0
      ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -d "$STATE_DIR" ] || die "no state directory $STATE_DIR"

SHUTDOWN_GRACE=30
[ -f "$STATE_DIR/topology.env" ] && load_topology

stop_process "$STATE_DIR/nginx/pid" 10 QUIT
for dir in "$STATE_DIR"/replica-*/; do
  [ -f "$dir/pid" ] && stop_process "$dir/pid" "$((SHUTDOWN_GRACE + 30))" TERM &
done
wait
stop_process "$STATE_DIR/prometheus/pid" 20 TERM
stop_process "$STATE_DIR/simulator/pid" 10 TERM

if $PURGE; then
  rm -rf "$STATE_DIR"
  echo "stopped; removed $STATE_DIR"
else
  echo "stopped; logs, journals and Prometheus data remain under $STATE_DIR (--purge removes them)"
fi
