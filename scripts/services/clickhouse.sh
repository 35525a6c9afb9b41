#!/usr/bin/env bash
# Private ClickHouse instance for skysnap integration tests.
#
#   scripts/services/clickhouse.sh install|start|stop|status|restart
#
# install : apt-get install clickhouse-server/clickhouse-client (Debian 12 ships 18.16)
#           only when the server binary is missing.
# start   : run our own server process (not the system service) with its own
#           config + data under $CLICKHOUSE_DIR, loopback only; waits for /ping.
#           Idempotent: a running instance is left alone.
# stop    : TERM, then KILL after a timeout. Data dir is kept, so stop+start
#           restarts on the same data.
#
# Env: SKYSNAP_SERVICES_DIR (default /tmp/skysnap-services)
#      CLICKHOUSE_DIR       (default $SKYSNAP_SERVICES_DIR/clickhouse)
#      CLICKHOUSE_HTTP_PORT (default 18123), CLICKHOUSE_TCP_PORT (default 19000)
#      CLICKHOUSE_START_TIMEOUT (s, default 60), CLICKHOUSE_STOP_TIMEOUT (s, default 30)
set -euo pipefail

SERVICES_DIR="${SKYSNAP_SERVICES_DIR:-/tmp/skysnap-services}"
CH_DIR="${CLICKHOUSE_DIR:-$SERVICES_DIR/clickhouse}"
HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-18123}"
TCP_PORT="${CLICKHOUSE_TCP_PORT:-19000}"
START_TIMEOUT="${CLICKHOUSE_START_TIMEOUT:-60}"
STOP_TIMEOUT="${CLICKHOUSE_STOP_TIMEOUT:-30}"
PID_FILE="$CH_DIR/clickhouse.pid"
LOG_DIR="$CH_DIR/log"
STDOUT_LOG="$LOG_DIR/stdout.log"

log() { echo "[clickhouse] $*" >&2; }

server_bin() {
  if command -v clickhouse-server >/dev/null 2>&1; then
    command -v clickhouse-server
  elif [ -x /usr/sbin/clickhouse-server ]; then
    echo /usr/sbin/clickhouse-server
  elif command -v clickhouse >/dev/null 2>&1; then
    # single-binary builds: "clickhouse server"
    echo "$(command -v clickhouse) server"
  else
    return 1
  fi
}

http_query() { # $1 = SQL; prints result
  curl -sS --max-time 30 "http://127.0.0.1:$HTTP_PORT/" --data-binary "$1"
}

version() {
  if command -v clickhouse-client >/dev/null 2>&1; then
    clickhouse-client --version 2>/dev/null | sed -n 's/.*version \([0-9.]*\).*/\1/p'
  else
    dpkg-query -W -f='${Version}\n' clickhouse-server 2>/dev/null || echo unknown
  fi
}

cmd_install() {
  if server_bin >/dev/null 2>&1; then
    log "already installed: clickhouse-server $(version)"
    return 0
  fi
  log "installing clickhouse-server + clickhouse-client via apt"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends clickhouse-server clickhouse-client; then
    apt-get update
    apt-get install -y --no-install-recommends clickhouse-server clickhouse-client
  fi
  # The package may enable/start the system service (listening on 8123/9000).
  # Our tests use a private instance; the system one is not needed. It is not
  # started in containers (policy-rc.d), and we leave it alone otherwise.
  server_bin >/dev/null || { log "clickhouse-server binary still missing after install"; exit 1; }
  log "installed clickhouse-server $(version)"
}

alive() { # PID: exists and is not a zombie
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ "$st" != Z ] && [ "$st" != X ]
}

is_running() { # our pid file points at a live clickhouse process
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [ -n "$pid" ] && alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q clickhouse
}

is_ready() {
  [ "$(curl -s --max-time 2 "http://127.0.0.1:$HTTP_PORT/ping" 2>/dev/null)" = "Ok." ]
}

write_config() {
  mkdir -p "$CH_DIR/data" "$CH_DIR/tmp" "$CH_DIR/user_files" "$LOG_DIR"
  cat >"$CH_DIR/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>$LOG_DIR/clickhouse-server.log</log>
        <errorlog>$LOG_DIR/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$HTTP_PORT</http_port>
    <tcp_port>$TCP_PORT</tcp_port>
    <!-- no interserver_http_port: no replication, so the interserver server is not started -->
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$CH_DIR/data/</path>
    <tmp_path>$CH_DIR/tmp/</tmp_path>
    <user_files_path>$CH_DIR/user_files/</user_files_path>
    <users_config>$CH_DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
    <query_log>
        <database>system</database>
        <table>query_log</table>
        <partition_by>toYYYYMM(event_date)</partition_by>
        <flush_interval_milliseconds>7500</flush_interval_milliseconds>
    </query_log>
    <max_table_size_to_drop>0</max_table_size_to_drop>
    <max_partition_size_to_drop>0</max_partition_size_to_drop>
</yandex>
EOF
  cat >"$CH_DIR/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>::1</ip>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
}

launch() {
  local bin
  bin="$(server_bin)" || { log "clickhouse-server not installed; run: $0 install"; exit 1; }
  rm -f "$PID_FILE"
  if is_ready; then
    log "port $HTTP_PORT already answers /ping but not from our pid file; refusing to start a second server"
    exit 1
  fi
  write_config
  log "starting $bin (config $CH_DIR/config.xml)"
  # setsid: own session, so the server outlives this script and the caller's
  # process group; 9>&-: do not hand the lock fd to the server.
  # shellcheck disable=SC2086
  setsid $bin --config-file="$CH_DIR/config.xml" \
    >>"$STDOUT_LOG" 2>&1 </dev/null 9>&- &
  echo $! >"$PID_FILE"
}

cmd_start() {
  server_bin >/dev/null || { log "clickhouse-server not installed; run: $0 install"; exit 1; }
  local launched=0
  if is_running; then
    if is_ready; then
      log "already running (pid $(cat "$PID_FILE")) on 127.0.0.1:$HTTP_PORT"
      return 0
    fi
    log "pid $(cat "$PID_FILE") alive but not ready yet; waiting for it"
  else
    launch
    launched=1
  fi

  local pid waited=0
  pid="$(cat "$PID_FILE")"
  while ! is_ready; do
    if ! alive "$pid"; then
      if [ "$launched" = 0 ]; then
        log "previous process $pid is gone; launching a new server"
        launch
        launched=1
        pid="$(cat "$PID_FILE")"
        continue
      fi
      log "server process $pid exited during startup"
      tail -n 40 "$LOG_DIR/clickhouse-server.err.log" "$STDOUT_LOG" >&2 2>/dev/null || true
      rm -f "$PID_FILE"
      exit 1
    fi
    if [ "$waited" -ge "$((START_TIMEOUT * 4))" ]; then
      log "not ready after ${START_TIMEOUT}s"
      tail -n 40 "$LOG_DIR/clickhouse-server.log" "$LOG_DIR/clickhouse-server.err.log" "$STDOUT_LOG" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.25
    waited=$((waited + 1))
  done
  log "ready: pid $pid, http 127.0.0.1:$HTTP_PORT, tcp 127.0.0.1:$TCP_PORT, version $(http_query 'SELECT version()')"
}

cmd_stop() {
  if ! is_running; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  local pid i
  pid="$(cat "$PID_FILE")"
  log "stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 4; i++)); do
    alive "$pid" || break
    sleep 0.25
  done
  if alive "$pid"; then
    log "still alive after ${STOP_TIMEOUT}s; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      alive "$pid" || break
      sleep 0.25
    done
  fi
  # make sure the ports are free before returning, so a quick restart binds
  for ((i = 0; i < 40; i++)); do
    curl -s --max-time 1 "http://127.0.0.1:$HTTP_PORT/ping" >/dev/null 2>&1 || break
    sleep 0.25
  done
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  if is_running && is_ready; then
    echo "clickhouse: running (pid $(cat "$PID_FILE")) http=127.0.0.1:$HTTP_PORT tcp=127.0.0.1:$TCP_PORT"
    return 0
  elif is_running; then
    echo "clickhouse: process $(cat "$PID_FILE") alive but not answering /ping"
    return 1
  fi
  echo "clickhouse: stopped"
  return 3
}

# Serialize start/stop/install of this service (concurrent test processes).
take_lock() {
  mkdir -p "$CH_DIR"
  exec 9>"$CH_DIR/.lock"
  flock -w 300 9 || { log "could not take $CH_DIR/.lock"; exit 1; }
}

case "${1:-}" in
  install|start|stop|restart) take_lock ;;
esac

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) cmd_status ;;
  version) version ;;
  *) echo "usage: $0 install|start|stop|restart|status|version" >&2; exit 2 ;;
esac
