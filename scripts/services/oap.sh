#!/usr/bin/env bash
# Private Apache SkyWalking OAP server (10.1.0, standalone, H2 in memory) for skysnap's
# integration tests: a real backend that SkyWalking agents can report to directly, queried
# through its GraphQL API (tests/oap/oap_graphql.py). Jars come from Maven Central via
# scripts/oap/pom.xml; the configuration is scripts/oap/config/ (copied to $OAP_DIR/config).
#
#   scripts/services/oap.sh install|start|stop|restart|status|version
#
# install : mvn dependency:copy-dependencies into $OAP_LIBS when missing or when
#           scripts/oap/pom.xml changed since the last install.
# start   : copy the config, start the OAP in the background, wait until the gRPC port
#           accepts connections and the GraphQL endpoint answers. Idempotent.
# stop    : TERM, then KILL after a timeout. Idempotent. Data is in memory: a restart
#           starts empty.
#
# Several instances can run at once, each with its own directory and ports, e.g.
#   OAP_DIR=/tmp/skysnap-services/oap2 OAP_GRPC_PORT=21801 OAP_HTTP_PORT=22801 scripts/services/oap.sh start
# Instances share the jars of the first one ($SKYSNAP_SERVICES_DIR/oap/libs) unless
# OAP_LIBS says otherwise; each has its own config, logs and pid file in $OAP_DIR.
#
# Env: SKYSNAP_SERVICES_DIR (default /tmp/skysnap-services)
#      OAP_DIR              (default $SKYSNAP_SERVICES_DIR/oap)
#      OAP_LIBS             (default $SKYSNAP_SERVICES_DIR/oap/libs)
#      OAP_GRPC_PORT (21800; agents' collector address), OAP_HTTP_PORT (22800; REST + /graphql)
#      OAP_HOST (127.0.0.1; address both ports bind to)
#      OAP_HEAP_OPTS ("-Xms256m -Xmx768m"), OAP_JAVA_OPTS (extra JVM flags, last on the line)
#      OAP_START_TIMEOUT (s, 180), OAP_STOP_TIMEOUT (s, 30)
#      Read by scripts/oap/config/application.yml itself (passed through the environment):
#      OAP_AUTHENTICATION (token the agents must send; empty = none),
#      OAP_PERSISTENT_PERIOD (s between metric flushes to storage, 3), OAP_H2_URL
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/../oap/pom.xml"
CONF_SRC="$SCRIPT_DIR/../oap/config"
SERVICES_DIR="${SKYSNAP_SERVICES_DIR:-/tmp/skysnap-services}"
OAP_DIR="${OAP_DIR:-$SERVICES_DIR/oap}"
LIBS="${OAP_LIBS:-$SERVICES_DIR/oap/libs}"
CONF_DIR="$OAP_DIR/config"
LOG_DIR="$OAP_DIR/logs"
PID_FILE="$OAP_DIR/oap.pid"
HOST="${OAP_HOST:-127.0.0.1}"
GRPC_PORT="${OAP_GRPC_PORT:-21800}"
HTTP_PORT="${OAP_HTTP_PORT:-22800}"
HEAP_OPTS="${OAP_HEAP_OPTS:--Xms256m -Xmx768m}"
EXTRA_OPTS="${OAP_JAVA_OPTS:-}"
START_TIMEOUT="${OAP_START_TIMEOUT:-180}"
STOP_TIMEOUT="${OAP_STOP_TIMEOUT:-30}"
MAIN_CLASS=org.apache.skywalking.oap.server.starter.OAPServerStartUp

if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi

log() { echo "[oap:$GRPC_PORT] $*" >&2; }

pom_version() { sed -n 's:.*<skywalking.version>\(.*\)</skywalking.version>.*:\1:p' "$POM" | head -n1; }

# The jars are up to date when .complete holds the checksum of the pom they came from.
pom_sum() { sha256sum "$POM" | cut -d' ' -f1; }

libs_ok() {
  [ -f "$LIBS/.complete" ] && [ "$(cat "$LIBS/.complete")" = "$(pom_sum)" ] &&
    ls "$LIBS"/server-starter-*.jar >/dev/null 2>&1
}

cmd_install() {
  command -v "$JAVA" >/dev/null 2>&1 || { log "java not found"; exit 1; }
  if libs_ok; then
    log "already installed: SkyWalking OAP $(pom_version) jars in $LIBS"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || { log "mvn not found"; exit 1; }
  log "resolving SkyWalking OAP $(pom_version) jars with maven into $LIBS"
  mkdir -p "$(dirname "$LIBS")"
  rm -rf "$LIBS.tmp"
  # (sed: Debian's maven prints stray colour codes even with -q -B)
  mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$LIBS.tmp" 2>&1 | sed -e 's/\x1b\[[0-9;]*m//g' -e '/^$/d' >&2
  rm -rf "$LIBS"
  mv "$LIBS.tmp" "$LIBS"
  pom_sum >"$LIBS/.complete"
  log "installed SkyWalking OAP $(pom_version): $(ls "$LIBS"/*.jar | wc -l) jars"
}

write_config() {
  rm -rf "$CONF_DIR.tmp"
  cp -r "$CONF_SRC" "$CONF_DIR.tmp"
  rm -rf "$CONF_DIR"
  mv "$CONF_DIR.tmp" "$CONF_DIR"
}

alive() { # PID: exists and is not a zombie
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ "$st" != Z ] && [ "$st" != X ]
}

is_running() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [ -n "$pid" ] && alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$MAIN_CLASS"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

graphql_ok() { # the GraphQL endpoint answers a query with data
  local out
  out="$(curl -sS -m 5 -H 'Content-Type: application/json' \
    -d '{"query":"{ getTimeInfo { timezone currentTimestamp } }"}' \
    "http://$HOST:$HTTP_PORT/graphql" 2>/dev/null)" || return 1
  case "$out" in *currentTimestamp*) return 0 ;; *) return 1 ;; esac
}

ready() { port_open "$GRPC_PORT" && graphql_ok; }

launch() {
  rm -f "$PID_FILE"
  local p
  for p in "$GRPC_PORT" "$HTTP_PORT"; do
    if port_open "$p"; then
      log "port $p is in use by another process; refusing to start"
      exit 1
    fi
  done
  mkdir -p "$LOG_DIR"
  # one run per log file: the previous run's log is kept as *.prev
  local f
  for f in oap.log stdout.log; do
    if [ -s "$LOG_DIR/$f" ]; then mv -f "$LOG_DIR/$f" "$LOG_DIR/$f.prev"; fi
  done
  write_config
  log "starting OAP $(pom_version): gRPC $HOST:$GRPC_PORT, HTTP/GraphQL http://$HOST:$HTTP_PORT/graphql"
  # Fast start on 2 cores: C1 only (the OAL/MAL classes it generates are many but run little
  # in tests), serial GC, no perf data file. The config folder comes first on the classpath:
  # the OAP reads application.yml, oal/, lal/, ... as classpath resources.
  # setsid: own session, so the OAP outlives this script and the caller's process group;
  # 9>&-: do not hand the lock fd to it.
  # shellcheck disable=SC2086
  (cd "$OAP_DIR" && OAP_HOST="$HOST" OAP_GRPC_PORT="$GRPC_PORT" OAP_HTTP_PORT="$HTTP_PORT" \
    exec setsid "$JAVA" $HEAP_OPTS -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \
    -Xss512k -Djava.awt.headless=true -Dfile.encoding=UTF-8 \
    "-Doap.logDir=$LOG_DIR" "-Dlog4j.configurationFile=$CONF_DIR/log4j2.xml" \
    $EXTRA_OPTS -cp "$CONF_DIR:$LIBS/*" "$MAIN_CLASS" \
    >>"$LOG_DIR/stdout.log" 2>&1 </dev/null 9>&-) &
  echo $! >"$PID_FILE"
}

dump_logs() {
  tail -n 40 "$LOG_DIR/stdout.log" >&2 2>/dev/null || true
  grep -E ' (ERROR|WARN) |Exception' "$LOG_DIR/oap.log" 2>/dev/null | tail -n 40 >&2 || true
}

cmd_start() {
  libs_ok || { log "OAP jars missing or outdated; run: $0 install"; exit 1; }
  mkdir -p "$OAP_DIR" "$LOG_DIR"
  local launched=0
  if is_running; then
    if ready; then
      log "already running (pid $(cat "$PID_FILE")): gRPC $HOST:$GRPC_PORT, http://$HOST:$HTTP_PORT/graphql"
      return 0
    fi
    log "pid $(cat "$PID_FILE") alive but not ready yet; waiting for it"
  else
    launch
    launched=1
  fi

  local pid start_ts now
  pid="$(cat "$PID_FILE")"
  start_ts=$(date +%s)
  while :; do
    if ! alive "$pid"; then
      if [ "$launched" = 0 ]; then
        log "previous process $pid is gone; launching a new OAP"
        launch
        launched=1
        pid="$(cat "$PID_FILE")"
        continue
      fi
      log "OAP process $pid exited during startup"
      dump_logs
      rm -f "$PID_FILE"
      exit 1
    fi
    if ready; then break; fi
    now=$(date +%s)
    if [ $((now - start_ts)) -ge "$START_TIMEOUT" ]; then
      log "not ready after ${START_TIMEOUT}s (pid $pid left running; '$0 stop' ends it)"
      dump_logs
      exit 1
    fi
    sleep 0.5
  done
  log "ready after $(($(date +%s) - start_ts))s: pid $pid, gRPC $HOST:$GRPC_PORT, http://$HOST:$HTTP_PORT/graphql"
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
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  if is_running && ready; then
    echo "oap: running (pid $(cat "$PID_FILE")) grpc=$HOST:$GRPC_PORT graphql=http://$HOST:$HTTP_PORT/graphql"
    return 0
  elif is_running; then
    echo "oap: process $(cat "$PID_FILE") alive but not ready (grpc $GRPC_PORT / graphql $HTTP_PORT)"
    return 1
  fi
  echo "oap: stopped"
  return 3
}

# Serialize install/start/stop of one instance (concurrent test processes); install takes
# the lock of the shared jar folder too.
take_lock() {
  mkdir -p "$OAP_DIR"
  exec 9>"$OAP_DIR/.lock"
  flock -w 300 9 || { log "could not take $OAP_DIR/.lock"; exit 1; }
}

take_libs_lock() {
  mkdir -p "$(dirname "$LIBS")"
  exec 8>"$(dirname "$LIBS")/.libs.lock"
  flock -w 600 8 || { log "could not take the lock of $LIBS"; exit 1; }
}

case "${1:-}" in
  install) take_libs_lock; take_lock ;;
  start|stop|restart) take_lock ;;
esac

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) cmd_status ;;
  version) pom_version ;;
  *)
    echo "usage: $0 install|start|stop|restart|status|version" >&2
    exit 2
    ;;
esac
