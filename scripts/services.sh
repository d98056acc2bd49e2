#!/usr/bin/env bash
# Start (or stop) the backing services on 127.0.0.1 with their state under var/services:
#   Redis       127.0.0.1:${RUNNER_REDIS_PORT:-6390}
#   PostgreSQL  127.0.0.1:${RUNNER_PG_PORT:-5439}  (database "runner", user "runner")
#   registry    127.0.0.1:${RUNNER_REGISTRY_PORT:-5000}
# Usage: scripts/services.sh start|stop|restart [redis] [postgres] [registry] | status
# Idempotent: a service that already answers is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STATE="$ROOT/var/services"
REDIS_PORT=${RUNNER_REDIS_PORT:-6390}
PG_PORT=${RUNNER_PG_PORT:-5439}
REGISTRY_PORT=${RUNNER_REGISTRY_PORT:-5000}
mkdir -p "$STATE"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 100); do port_open "$port" && return 0; sleep 0.1; done
  echo "error: $name did not start on 127.0.0.1:$port (see $STATE/$name.log)" >&2
  tail -5 "$STATE/$name.log" >&2 || true
  exit 1
}

start_redis() {
  if port_open "$REDIS_PORT"; then return; fi
  mkdir -p "$STATE/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$STATE/redis" \
    --daemonize yes --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" \
    --save 60 1 --appendonly yes
  wait_port "$REDIS_PORT" redis
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; }

start_postgres() {
  if port_open "$PG_PORT"; then return; fi
  local bin data=$STATE/postgres
  bin=$(pg_bin)
  # PostgreSQL refuses to run as root; its own account owns the data directory.
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data" && chown postgres:postgres "$data" && chmod 700 "$data"
    runuser -u postgres -- "$bin/initdb" -D "$data" -U postgres --auth=trust \
      >"$STATE/postgres-init.log" 2>&1
  fi
  touch "$STATE/postgres.log" && chown postgres:postgres "$STATE/postgres.log"
  runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$STATE/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$data -c fsync=off -c max_connections=200" \
    start >/dev/null
  wait_port "$PG_PORT" postgres
  local psql=("$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='runner'")" ]; then
    "${psql[@]}" -c "CREATE ROLE runner LOGIN SUPERUSER PASSWORD 'runner'"
  fi
  if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='runner'")" ]; then
    "${psql[@]}" -c "CREATE DATABASE runner OWNER runner"
  fi
}

start_registry() {
  if port_open "$REGISTRY_PORT"; then return; fi
  mkdir -p "$STATE/registry"
  cat >"$STATE/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $STATE/registry}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$REGISTRY_PORT
YAML
  nohup docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
  echo $! >"$STATE/registry.pid"
  wait_port "$REGISTRY_PORT" registry
}

stop_pidfile() {
  local pid_file=$STATE/$1.pid
  [ -f "$pid_file" ] || return 0
  local pid
  pid=$(cat "$pid_file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pid_file"
}
stop_redis() { stop_pidfile redis; }
stop_registry() { stop_pidfile registry; }
stop_postgres() {
  if [ -s "$STATE/postgres/postmaster.pid" ]; then
    runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$STATE/postgres" -m fast stop >/dev/null || true
  fi
}

cmd=${1:-start}
shift || true
case "$cmd" in
  start)
    services=("$@")
    [ ${#services[@]} -eq 0 ] && services=(redis postgres registry)
    for s in "${services[@]}"; do "start_$s"; done
    ;;
  stop)
    services=("$@")
    [ ${#services[@]} -eq 0 ] && services=(redis postgres registry)
    for s in "${services[@]}"; do "stop_$s"; done
    ;;
  restart)
    for s in "$@"; do "stop_$s"; "start_$s"; done
    ;;
  status)
    for pair in "redis:$REDIS_PORT" "postgres:$PG_PORT" "registry:$REGISTRY_PORT"; do
      if port_open "${pair#*:}"; then echo "${pair%%:*}: up on 127.0.0.1:${pair#*:}";
      else echo "${pair%%:*}: down"; fi
    done
    ;;
  *) echo "usage: $0 start|stop [redis|postgres|registry...] | status" >&2; exit 2 ;;
esac
