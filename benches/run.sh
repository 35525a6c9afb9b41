#!/usr/bin/env bash
# skysnap's end-to-end benchmark (docs/PERFORMANCE.md): builds the release binaries,
# starts the loopback ClickHouse and Kafka of scripts/services when they are not
# running (and stops them again at the end), then runs benches/run.py with the
# arguments given, e.g.
#
#   benches/run.sh                     # every scenario, 3 runs of 10 s (~15 min)
#   benches/run.sh --runs 5 --seconds 20
#   benches/run.sh --soak-minutes 10   # the long half-rate memory run, once
#   benches/run.sh --analysis          # the reading side only (~3 min): no Kafka needed
#   benches/run.sh --forwarding        # trace segments straight to OAP vs through skysnap
#   benches/run.sh --cluster           # skysnap and raw INSERTs, single server vs the 2x2 cluster
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

analysis=false
forwarding=false
cluster=false
for arg in "$@"; do
  if [[ "$arg" == "--analysis" ]]; then analysis=true; fi
  if [[ "$arg" == "--forwarding" ]]; then forwarding=true; analysis=true; fi
  if [[ "$arg" == "--cluster" ]]; then cluster=true; fi
done

./scripts/build-deps.sh
if $analysis; then
  cargo build --release --bin skysnap
else
  cargo build --release --bin skysnap --examples
fi

started=()
if ! $forwarding && ! ./scripts/services/clickhouse.sh status >/dev/null 2>&1; then
  ./scripts/services/clickhouse.sh install
  ./scripts/services/clickhouse.sh start
  started+=(clickhouse)
fi
if $cluster && ! ./scripts/services/clickhouse-cluster.sh status >/dev/null 2>&1; then
  ./scripts/services/clickhouse-cluster.sh install
  ./scripts/services/clickhouse-cluster.sh start
  started+=(clickhouse-cluster)
fi
if ! $analysis && ! ./scripts/services/kafka.sh status >/dev/null 2>&1; then
  ./scripts/services/kafka.sh install
  ./scripts/services/kafka.sh start
  started+=(kafka)
fi
# The forwarding benchmark's own OAP, fresh each run (H2 in memory keeps every segment):
# a 3 GiB heap and the full JIT (the tests' OAP stops at C1 to start fast).
bench_oap() {
  OAP_DIR="${SKYSNAP_SERVICES_DIR:-/tmp/skysnap-services}/oap-bench" \
    OAP_GRPC_PORT=21810 OAP_HTTP_PORT=22810 OAP_HEAP_OPTS="-Xms3g -Xmx3g" \
    OAP_JAVA_OPTS="-XX:TieredStopAtLevel=4" ./scripts/services/oap.sh "$@"
}
if $forwarding; then
  ./scripts/services/oap.sh install
  bench_oap stop >/dev/null 2>&1 || true
  bench_oap start
fi
stop_started() {
  for service in "${started[@]}"; do
    "./scripts/services/$service.sh" stop || true
  done
  if $forwarding; then bench_oap stop || true; fi
}
trap stop_started EXIT

python3 benches/run.py "$@"
