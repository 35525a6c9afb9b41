#!/usr/bin/env bash
# Install / start / stop every server the skysnap integration tests need:
# a private ClickHouse (127.0.0.1:18123 http, :19000 native); a ClickHouse cluster
# `skysnap_cluster` of 2 shards x 2 replicas (four servers, http 127.0.0.1:18131..18134,
# native :19131..19134, interserver :19141..19144; shard 1 = node1+node2, shard 2 =
# node3+node4) with its ZooKeeper 3.9 (127.0.0.1:12181); a private Kafka 4.x KRaft
# broker (127.0.0.1:19092); and two Apache SkyWalking OAP 10.1.0 servers (gRPC
# 127.0.0.1:21800 and :21801, GraphQL :22800 and :22801) for the forwarding tests.
# See clickhouse.sh, clickhouse-cluster.sh, kafka.sh and oap.sh.
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

# The second OAP: its own folder and ports, the first one's jars.
oap2() {
  OAP_DIR="${SKYSNAP_SERVICES_DIR:-/tmp/skysnap-services}/oap2" \
    OAP_GRPC_PORT="${OAP2_GRPC_PORT:-21801}" OAP_HTTP_PORT="${OAP2_HTTP_PORT:-22801}" \
    "$DIR/oap.sh" "$@"
}

case "${1:-}" in
  install)
    timed "clickhouse install" "$DIR/clickhouse.sh" install
    timed "clickhouse cluster install" "$DIR/clickhouse-cluster.sh" install
    timed "kafka install" "$DIR/kafka.sh" install
    timed "oap install" "$DIR/oap.sh" install
    ;;
  start)
    timed "clickhouse start" "$DIR/clickhouse.sh" start
    timed "clickhouse cluster start" "$DIR/clickhouse-cluster.sh" start
    timed "kafka start" "$DIR/kafka.sh" start
    timed "oap start" "$DIR/oap.sh" start
    timed "oap2 start" oap2 start
    ;;
  stop)
    rc=0
    oap2 stop || rc=$?
    "$DIR/oap.sh" stop || rc=$?
    "$DIR/kafka.sh" stop || rc=$?
    "$DIR/clickhouse.sh" stop || rc=$?
    "$DIR/clickhouse-cluster.sh" stop || rc=$?
    exit "$rc"
    ;;
  restart)
    "$0" stop
    "$0" start
    ;;
  status)
    rc=0
    "$DIR/clickhouse.sh" status || rc=$?
    "$DIR/clickhouse-cluster.sh" status || rc=$?
    "$DIR/kafka.sh" status || rc=$?
    "$DIR/oap.sh" status || rc=$?
    oap2 status || rc=$?
    exit "$rc"
    ;;
  *) echo "usage: $0 install|start|stop|restart|status" >&2; exit 2 ;;
esac
