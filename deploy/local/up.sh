#!/usr/bin/env bash
# The multi-replica topology of deploy/compose.yaml from native processes, on one machine, without
# containers: N meter replicas behind nginx, sharing this machine's PostgreSQL (usage) and Redis
# (quotas), scraped by Prometheus with meter's alert rules, in front of meter's simulator (or a real
# upstream). Everything runs in the background; pids, logs, configuration and journals go under the
# state directory. Stop it with down.sh; kill or restart one replica with replica.sh.
#
# Needs: nginx and prometheus (Debian: apt-get install nginx prometheus), PostgreSQL and Redis
# reachable, and a Python with meter installed (default: the repository's .venv).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
usage: deploy/local/up.sh [options]

  --state-dir DIR        pids, logs, configs, journals [$DEFAULT_STATE_DIR]
  --replicas N           meter replicas [3]
  --database URL         PostgreSQL, created if missing and migrated
                         [postgresql+asyncpg://postgres@127.0.0.1:5432/meter_local]
  --redis URL            Redis for quotas [redis://127.0.0.1:6379/0]
  --quota-prefix P       Redis key prefix of this topology [meter:local:quota:]
  --upstream URL         forward to URL instead of starting the simulator
  --lb-port P            nginx, where clients connect [8787]
  --replica-ports LIST   comma-separated, one per replica [8791,8792,...]
  --simulator-port P     [8788]
  --prometheus-port P    [9090]
  --scrape-interval D    Prometheus scrape and rule interval [5s]
  --admin-token T        METER_ADMIN_TOKEN [generated once into the state directory]
  --key-secret S         METER_KEY_SECRET [generated once into the state directory]
  --python PATH          Python with meter installed [repository .venv, else python3]
  --env NAME=VALUE       another METER_* or OTEL_* setting for every replica (repeatable)
  -h, --help
EOF
}

STATE_DIR=$DEFAULT_STATE_DIR
REPLICAS=3
DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/meter_local
REDIS_URL=redis://127.0.0.1:6379/0
QUOTA_PREFIX=meter:local:quota:
UPSTREAM_URL=
LB_PORT=8787
REPLICA_PORTS=
SIMULATOR_PORT=8788
PROMETHEUS_PORT=9090
SCRAPE_INTERVAL=5s
ADMIN_TOKEN=
KEY_SECRET=
PYTHON=
EXTRA_ENV=()

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --state-dir | --replicas | --database | --redis | --quota-prefix | --upstream | --lb-port | \
      --replica-ports | --simulator-port | --prometheus-port | --scrape-interval | --admin-token | \
      --key-secret | --python | --env)
      [ $# -ge 2 ] || die "$1 needs a value"
      ;;
    *)
      usage >&2
      die "unknown option $1"
      ;;
  esac
  case $1 in
    --state-dir) STATE_DIR=$2 ;;
    --replicas) REPLICAS=$2 ;;
    --database) DATABASE_URL=$2 ;;
    --redis) REDIS_URL=$2 ;;
    --quota-prefix) QUOTA_PREFIX=$2 ;;
    --upstream) UPSTREAM_URL=$2 ;;
    --lb-port) LB_PORT=$2 ;;
    --replica-ports) REPLICA_PORTS=$2 ;;
    --simulator-port) SIMULATOR_PORT=$2 ;;
    --prometheus-port) PROMETHEUS_PORT=$2 ;;
    --scrape-interval) SCRAPE_INTERVAL=$2 ;;
    --admin-token) ADMIN_TOKEN=$2 ;;
    --key-secret) KEY_SECRET=$2 ;;
    --python) PYTHON=$2 ;;
    --env)
      [[ $2 =~ ^(METER|OTEL)_[A-Z0-9_]+=.*$ ]] || die "--env $2: expected NAME=VALUE, NAME a METER_* or OTEL_* variable"
      EXTRA_ENV+=("$2")
      ;;
  esac
  shift 2
done

[[ $REPLICAS =~ ^[1-9][0-9]*$ ]] || die "--replicas must be a positive number"
if [ -z "$REPLICA_PORTS" ]; then
  REPLICA_PORTS=$(seq -s, 8791 $((8790 + REPLICAS)))
fi
REPLICA_PORTS=${REPLICA_PORTS//,/ }
read -r -a REPLICA_PORT_LIST <<<"$REPLICA_PORTS"
[ "${#REPLICA_PORT_LIST[@]}" -eq "$REPLICAS" ] || die "--replica-ports needs $REPLICAS ports"

# --- what this needs -----------------------------------------------------------------------------
if [ -z "$PYTHON" ]; then
  if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import meter" 2>/dev/null ||
  die "$PYTHON cannot import meter: pip install -e . (or pass --python)"
NGINX=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
[ -n "$NGINX" ] || die "nginx is not installed: apt-get install nginx"
PROMETHEUS=$(command -v prometheus || true)
[ -n "$PROMETHEUS" ] || die "prometheus is not installed: apt-get install prometheus"

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
for pidfile in "$STATE_DIR"/*/pid; do
  if is_running "$pidfile"; then
    die "a topology is already running under $STATE_DIR ($pidfile): deploy/local/down.sh --state-dir $STATE_DIR"
  fi
done

ports=("$LB_PORT" "$PROMETHEUS_PORT" "${REPLICA_PORT_LIST[@]}")
[ -n "$UPSTREAM_URL" ] || ports+=("$SIMULATOR_PORT")
helper port-free "${ports[@]}" || die "choose other ports (see --help)"
helper ping-redis "$REDIS_URL" || die "Redis is needed for quotas shared by the replicas"
case $DATABASE_URL in
  postgres*) helper create-database "$DATABASE_URL" || die "PostgreSQL is needed (replicas share it)" ;;
  *) die "--database must be a PostgreSQL URL: replicas share one database" ;;
esac

# Secrets, generated once and kept: the key secret fingerprints API keys, so it never changes.
umask 077
[ -n "$KEY_SECRET" ] || { [ -s "$STATE_DIR/key-secret" ] || helper token >"$STATE_DIR/key-secret"; KEY_SECRET=$(<"$STATE_DIR/key-secret"); }
[ -n "$ADMIN_TOKEN" ] || { [ -s "$STATE_DIR/admin-token" ] || helper token >"$STATE_DIR/admin-token"; ADMIN_TOKEN=$(<"$STATE_DIR/admin-token"); }
umask 022

SHUTDOWN_GRACE=30
for setting in "${EXTRA_ENV[@]}"; do
  case $setting in METER_SHUTDOWN_GRACE=*) SHUTDOWN_GRACE=${setting#*=} ;; esac
done
SHUTDOWN_GRACE=${SHUTDOWN_GRACE%.*}

# If anything below fails, stop what was started.
stop_on_failure() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "up.sh failed: stopping what it started" >&2
    "$LOCAL_DIR/down.sh" --state-dir "$STATE_DIR" >&2 || true
  fi
}
trap stop_on_failure EXIT

# --- migrations, before any replica starts ---------------------------------------------------------
echo "migrating $DATABASE_URL"
(clear_meter_environment && "$PYTHON" -m meter db upgrade --database "$DATABASE_URL")

# --- the simulator (the upstream) -------------------------------------------------------------------
mkdir -p "$STATE_DIR/simulator" "$STATE_DIR/nginx/tmp" "$STATE_DIR/prometheus"
if [ -z "$UPSTREAM_URL" ]; then
  UPSTREAM_URL=http://127.0.0.1:$SIMULATOR_PORT
  start_background "$STATE_DIR/simulator/pid" "$STATE_DIR/simulator/simulator.log" \
    "$PYTHON" -m meter simulate --host 127.0.0.1 --port "$SIMULATOR_PORT"
  helper wait-http "$UPSTREAM_URL/_sim/stats" --timeout 30 --pid "$(<"$STATE_DIR/simulator/pid")" ||
    die "the simulator did not start: $STATE_DIR/simulator/simulator.log"
else
  SIMULATOR_PORT=
fi

{
  printf '%s=%q\n' STATE_DIR "$STATE_DIR" PYTHON "$PYTHON" REPLICAS "$REPLICAS" REPLICA_PORTS "$REPLICA_PORTS" \
    LB_PORT "$LB_PORT" SIMULATOR_PORT "$SIMULATOR_PORT" PROMETHEUS_PORT "$PROMETHEUS_PORT" \
    UPSTREAM_URL "$UPSTREAM_URL" DATABASE_URL "$DATABASE_URL" REDIS_URL "$REDIS_URL" \
    QUOTA_PREFIX "$QUOTA_PREFIX" SHUTDOWN_GRACE "$SHUTDOWN_GRACE"
} >"$STATE_DIR/topology.env"

# --- the replicas -----------------------------------------------------------------------------------
{
  printf '%s=%q\n' METER_UPSTREAM_URL "$UPSTREAM_URL" METER_DATABASE_URL "$DATABASE_URL" \
    METER_REDIS_URL "$REDIS_URL" METER_QUOTA_PREFIX "$QUOTA_PREFIX" \
    METER_KEY_SECRET "$KEY_SECRET" METER_ADMIN_TOKEN "$ADMIN_TOKEN" \
    METER_AUTO_MIGRATE false METER_LOG_FORMAT text METER_SHUTDOWN_GRACE "$SHUTDOWN_GRACE"
  for setting in "${EXTRA_ENV[@]}"; do printf '%s=%q\n' "${setting%%=*}" "${setting#*=}"; done
} >"$STATE_DIR/meter.env"
chmod 600 "$STATE_DIR/meter.env"

for n in $(seq 1 "$REPLICAS"); do start_replica "$n"; done
for n in $(seq 1 "$REPLICAS"); do wait_replica "$n" 60 || die "replica $n did not become ready"; done

# --- the load balancer ------------------------------------------------------------------------------
servers=""
for port in "${REPLICA_PORT_LIST[@]}"; do
  servers+="        server 127.0.0.1:$port max_fails=1 fail_timeout=2s;"$'\n'
done
conf=$(<"$LOCAL_DIR/nginx.conf.template")
conf=${conf//@STATE_DIR@/$STATE_DIR}
conf=${conf//@UPSTREAM_SERVERS@/${servers%$'\n'}}
conf=${conf//@LB_PORT@/$LB_PORT}
conf=${conf//@PROXY_TRIES@/$REPLICAS}
printf '%s\n' "$conf" >"$STATE_DIR/nginx/nginx.conf"
"$NGINX" -t -q -e "$STATE_DIR/nginx/error.log" -p "$STATE_DIR/nginx" -c "$STATE_DIR/nginx/nginx.conf" ||
  die "nginx rejected $STATE_DIR/nginx/nginx.conf"
start_background "$STATE_DIR/nginx/pid" "$STATE_DIR/nginx/error.log" \
  "$NGINX" -e "$STATE_DIR/nginx/error.log" -p "$STATE_DIR/nginx" -c "$STATE_DIR/nginx/nginx.conf"
helper wait-http "http://127.0.0.1:$LB_PORT/readyz" --timeout 20 --pid "$(<"$STATE_DIR/nginx/pid")" ||
  die "nginx did not start: $STATE_DIR/nginx/error.log"

# --- Prometheus: every replica, meter's alert rules -------------------------------------------------
{
  echo "# Written by deploy/local/up.sh: deploy/prometheus/prometheus.yml with this topology's replicas."
  echo "global:"
  echo "  scrape_interval: $SCRAPE_INTERVAL"
  echo "  evaluation_interval: $SCRAPE_INTERVAL"
  echo "rule_files:"
  echo "  - $REPO_DIR/deploy/prometheus/rules/*.yml"
  echo "scrape_configs:"
  echo "  - job_name: meter"
  echo "    metrics_path: /metrics"
  echo "    static_configs:"
  echo "      - targets:"
  for port in "${REPLICA_PORT_LIST[@]}"; do echo "          - 127.0.0.1:$port"; done
} >"$STATE_DIR/prometheus/prometheus.yml"
start_background "$STATE_DIR/prometheus/pid" "$STATE_DIR/prometheus/prometheus.log" \
  "$PROMETHEUS" --config.file="$STATE_DIR/prometheus/prometheus.yml" \
  --storage.tsdb.path="$STATE_DIR/prometheus/data" --storage.tsdb.retention.time=2d \
  --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --log.level=warn
helper wait-http "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" --timeout 30 --pid "$(<"$STATE_DIR/prometheus/pid")" ||
  die "prometheus did not start: $STATE_DIR/prometheus/prometheus.log"

trap - EXIT
replica_urls=""
for port in "${REPLICA_PORT_LIST[@]}"; do replica_urls+=" http://127.0.0.1:$port"; done
cat <<EOF

meter's local topology is up (state: $STATE_DIR)

  clients         http://127.0.0.1:$LB_PORT/v1        nginx: $STATE_DIR/nginx/{access,error}.log
  replicas       $replica_urls
                  logs $STATE_DIR/replica-N/meter.log, journals $STATE_DIR/replica-N/journal
  upstream        $UPSTREAM_URL${SIMULATOR_PORT:+ (meter simulate: $STATE_DIR/simulator/simulator.log)}
  prometheus      http://127.0.0.1:$PROMETHEUS_PORT        (targets: /targets, alerts: /alerts)
  database        $DATABASE_URL
  redis           $REDIS_URL (keys under $QUOTA_PREFIX)
  admin token     in $STATE_DIR/admin-token (METER_ADMIN_TOKEN; every replica's settings: $STATE_DIR/meter.env)

Try it:
  curl -s http://127.0.0.1:$LB_PORT/v1/chat/completions -H 'Authorization: Bearer sk-demo' \\
    -H 'Content-Type: application/json' -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
  $PYTHON -m meter usage --database $DATABASE_URL --group-by team,model
Crash and restart replica 2:   deploy/local/replica.sh --state-dir $STATE_DIR kill 2; deploy/local/replica.sh --state-dir $STATE_DIR start 2
Stop everything:               deploy/local/down.sh --state-dir $STATE_DIR
EOF
