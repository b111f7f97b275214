# shellcheck shell=bash disable=SC2034  # (REPO_DIR, DEFAULT_STATE_DIR: for the scripts that source this)
# Shared by up.sh, down.sh and replica.sh: the state directory's layout and starting and stopping
# processes. Every process runs in its own session (setsid), its pid in a file:
#
#   STATE_DIR/topology.env           what up.sh started (sourced by down.sh and replica.sh)
#   STATE_DIR/meter.env              the METER_* settings every replica gets
#   STATE_DIR/replica-N/{pid,meter.log,journal/}
#   STATE_DIR/simulator/{pid,simulator.log}
#   STATE_DIR/nginx/{pid,nginx.conf,access.log,error.log}
#   STATE_DIR/prometheus/{pid,prometheus.yml,prometheus.log,data/}

LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LOCAL_DIR/../.." && pwd)
DEFAULT_STATE_DIR=${TMPDIR:-/tmp}/meter-local

die() {
  echo "error: $*" >&2
  exit 1
}

helper() {
  "$PYTHON" "$LOCAL_DIR/helper.py" "$@"
}

load_topology() {
  [ -f "$STATE_DIR/topology.env" ] || die "no topology under $STATE_DIR (start one with up.sh)"
  # shellcheck source=/dev/null
  source "$STATE_DIR/topology.env"
  read -r -a REPLICA_PORT_LIST <<<"$REPLICA_PORTS"
}

# is_running PIDFILE: the process is alive (a zombie is not).
is_running() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(<"$1")
  kill -0 "$pid" 2>/dev/null || return 1
  [ "$(sed -E 's/.*\) ([A-Z]).*/\1/' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

# wait_gone PID SECONDS
wait_gone() {
  local pid=$1 end=$((SECONDS + $2))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$(sed -E 's/.*\) ([A-Z]).*/\1/' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.1
  done
}

# start_background PIDFILE LOGFILE COMMAND...: COMMAND in its own session (so its whole process group
# can be killed), output appended to LOGFILE.
start_background() {
  local pidfile=$1 log=$2
  shift 2
  (exec setsid "$@" </dev/null >>"$log" 2>&1) &
  echo $! >"$pidfile"
}

# stop_process PIDFILE SECONDS [SIGNAL]: SIGNAL (default TERM), then SIGKILL to its process group
# after SECONDS.
stop_process() {
  local pidfile=$1 timeout=$2 signal=${3:-TERM} pid
  [ -f "$pidfile" ] || return 0
  pid=$(<"$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$timeout"; then
      echo "pid $pid ($pidfile) still running after ${timeout} s: SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 || true
    fi
  fi
  rm -f "$pidfile"
}

# kill_process PIDFILE: SIGKILL to the process group at once (a crash, as the OOM killer would).
kill_process() {
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(<"$pidfile")
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  wait_gone "$pid" 10 || true
  rm -f "$pidfile"
}

# Only the variables meter.env sets reach meter: a METER_* left in the caller's shell would change a
# replica's behaviour behind the topology's back (or, unknown, stop it at start).
clear_meter_environment() {
  local name
  for name in $(compgen -e); do
    case $name in
      METER_* | OTEL_* | PROMETHEUS_MULTIPROC_DIR) unset "$name" ;;
    esac
  done
}

replica_port() {
  local n=$1
  if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt "${#REPLICA_PORT_LIST[@]}" ]; then
    die "no replica $n (replicas: 1 to ${#REPLICA_PORT_LIST[@]})"
  fi
  echo "${REPLICA_PORT_LIST[$((n - 1))]}"
}

start_replica() {
  local n=$1 port dir
  port=$(replica_port "$n")
  dir="$STATE_DIR/replica-$n"
  mkdir -p "$dir/journal"
  if is_running "$dir/pid"; then
    die "replica $n is already running (pid $(<"$dir/pid"))"
  fi
  (
    clear_meter_environment
    set -a
    # shellcheck source=/dev/null
    source "$STATE_DIR/meter.env"
    set +a
    export METER_HOST=127.0.0.1 METER_PORT="$port" METER_JOURNAL_DIR="$dir/journal"
    start_background "$dir/pid" "$dir/meter.log" "$PYTHON" -m meter serve
  )
}

# wait_replica N [SECONDS]: until its /readyz answers 200 (it records usage).
wait_replica() {
  local n=$1 timeout=${2:-60} port dir
  port=$(replica_port "$n")
  dir="$STATE_DIR/replica-$n"
  if ! helper wait-http "http://127.0.0.1:$port/readyz" --timeout "$timeout" --pid "$(<"$dir/pid")"; then
    echo "--- $dir/meter.log (last lines)" >&2
    tail -n 30 "$dir/meter.log" >&2 || true
    return 1
  fi
}

stop_replica() {
  # SIGTERM: in-flight requests finish (METER_SHUTDOWN_GRACE), then the journal is flushed.
  stop_process "$STATE_DIR/replica-$1/pid" "$((SHUTDOWN_GRACE + 30))" TERM
}
