#!/usr/bin/env bash
# One replica of the topology up.sh started:
#
#   replica.sh [--state-dir DIR] start N     start it (on its port, with its own journal) and wait until ready
#   replica.sh [--state-dir DIR] stop N      SIGTERM: in-flight requests finish, the journal is flushed
#   replica.sh [--state-dir DIR] kill N      SIGKILL, as a crash would (the journal keeps every record)
#   replica.sh [--state-dir DIR] restart N   stop, then start
#   replica.sh [--state-dir DIR] status      which replicas run
#
# A restarted replica claims the same journal directory and delivers what it had not yet written.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STATE_DIR=$DEFAULT_STATE_DIR
if [ "${1:-}" = --state-dir ]; then
  [ $# -ge 2 ] || die "--state-dir needs a value"
  STATE_DIR=$2
  shift 2
fi
action=${1:-}
load_topology

case $action in
  start)
    start_replica "${2:?replica number}"
    wait_replica "$2" 60
    echo "replica $2 ready at http://127.0.0.1:$(replica_port "$2") (pid $(<"$STATE_DIR/replica-$2/pid"))"
    ;;
  stop)
    replica_port "${2:?replica number}" >/dev/null
    stop_replica "$2"
    echo "replica $2 stopped"
    ;;
  kill)
    replica_port "${2:?replica number}" >/dev/null
    kill_process "$STATE_DIR/replica-$2/pid"
    echo "replica $2 killed (SIGKILL)"
    ;;
  restart)
    replica_port "${2:?replica number}" >/dev/null
    stop_replica "$2"
    start_replica "$2"
    wait_replica "$2" 60
    echo "replica $2 restarted"
    ;;
  status)
    for n in $(seq 1 "$REPLICAS"); do
      if is_running "$STATE_DIR/replica-$n/pid"; then state="running (pid $(<"$STATE_DIR/replica-$n/pid"))"; else state=stopped; fi
      echo "replica $n  http://127.0.0.1:$(replica_port "$n")  $state"
    done
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
