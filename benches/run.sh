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
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

analysis=false
for arg in "$@"; do
  if [[ "$arg" == "--analysis" ]]; then analysis=true; fi
done

./scripts/build-deps.sh
if $analysis; then
  cargo build --release --bin skysnap
else
  cargo build --release --bin skysnap --examples
fi

started=()
if ! ./scripts/services/clickhouse.sh status >/dev/null 2>&1; then
  ./scripts/services/clickhouse.sh install
  ./scripts/services/clickhouse.sh start
  started+=(clickhouse)
fi
if ! $analysis && ! ./scripts/services/kafka.sh status >/dev/null 2>&1; then
  ./scripts/services/kafka.sh install
  ./scripts/services/kafka.sh start
  started+=(kafka)
fi
stop_started() {
  for service in "${started[@]}"; do
    "./scripts/services/$service.sh" stop || true
  done
}
trap stop_started EXIT

python3 benches/run.py "$@"
