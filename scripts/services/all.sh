#!/usr/bin/env bash
# Install / start / stop every server the skysnap integration tests need:
# a private ClickHouse (127.0.0.1:18123 http, :19000 native) and a private
# Kafka 4.x KRaft broker (127.0.0.1:19092). See clickhouse.sh and kafka.sh.
#
#   scripts/services/all.sh install|start|stop|restart|status
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

timed() { # NAME CMD...
  local t0 t1 rc=0
  t0=$EPOCHREALTIME
  "${@:2}" || rc=$?
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" -v n="$1" -v rc="$rc" \
    'BEGIN { printf "[services] %s: %.1fs (rc=%d)\n", n, b - a, rc }' >&2
  return "$rc"
}

case "${1:-}" in
  install)
    timed "clickhouse install" "$DIR/clickhouse.sh" install
    timed "kafka install" "$DIR/kafka.sh" install
    ;;
  start)
    timed "clickhouse start" "$DIR/clickhouse.sh" start
    timed "kafka start" "$DIR/kafka.sh" start
    ;;
  stop)
    rc=0
    "$DIR/kafka.sh" stop || rc=$?
    "$DIR/clickhouse.sh" stop || rc=$?
    exit "$rc"
    ;;
  restart)
    "$0" stop
    "$0" start
    ;;
  status)
    rc=0
    "$DIR/clickhouse.sh" status || rc=$?
    "$DIR/kafka.sh" status || rc=$?
    exit "$rc"
    ;;
  *) echo "usage: $0 install|start|stop|restart|status" >&2; exit 2 ;;
esac
