#!/usr/bin/env bash
# Runs every skysnap test on a fresh machine, installing what the tests need when it is
# missing: builds once, checks formatting and lints, installs and starts ClickHouse
# (Debian's package; one server, and four more as a 2-shard x 2-replica cluster with
# Apache ZooKeeper 3.9 from Maven Central), Apache Kafka (KRaft, jars from Maven Central) and two Apache SkyWalking
# OAP 10.1.0 servers (jars from Maven Central, H2 in memory) on loopback, runs the unit and integration tests (the real
# `skysnap serve` on loopback ports), the DDL test on the current ClickHouse engine
# (chdb-core), and the end-to-end test with the real SkyWalking Python agent
# (apache-skywalking==1.2.0), the browser test of the profiling page (Debian's chromium
# driven by Playwright's Python client), the offline Helm chart checks (helm built with
# `go install`, kubernetes-validate), and a short coverage-guided fuzzing run of each fuzz
# target (cargo-afl, AFL++). Stops the servers it started.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started ))s)"; }

step "toolchain"
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

step "build"
scripts/build-deps.sh
cargo build --locked --all-targets

step "format and lints"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

step "servers: ClickHouse, a ClickHouse cluster (ZooKeeper, 2 shards x 2 replicas), Kafka and two SkyWalking OAPs on loopback"
trap 'scripts/services/all.sh stop >/dev/null 2>&1 || true' EXIT
scripts/services/all.sh install
scripts/services/all.sh start
export SKYSNAP_TEST_CLICKHOUSE_URL="http://127.0.0.1:${CLICKHOUSE_HTTP_PORT:-18123}"
export SKYSNAP_TEST_CLICKHOUSE_CLUSTER="${CLICKHOUSE_CLUSTER_NAME:-skysnap_cluster}"
export SKYSNAP_TEST_CLICKHOUSE_CLUSTER_URLS="$(for node in 1 2 3 4; do
  port_var="CLICKHOUSE_CLUSTER_HTTP_PORT_$node"
  printf 'http://127.0.0.1:%s,' "${!port_var:-1813$node}"
done | sed 's/,$//')"
export SKYSNAP_TEST_KAFKA_BROKERS="127.0.0.1:${KAFKA_PORT:-19092}"
export SKYSNAP_TEST_OAP_GRPC="127.0.0.1:${OAP_GRPC_PORT:-21800}"
export SKYSNAP_TEST_OAP_HTTP="127.0.0.1:${OAP_HTTP_PORT:-22800}"
export SKYSNAP_TEST_OAP2_GRPC="127.0.0.1:${OAP2_GRPC_PORT:-21801}"
export SKYSNAP_TEST_OAP2_HTTP="127.0.0.1:${OAP2_HTTP_PORT:-22801}"

step "unit and integration tests"
cargo test --locked

step "criterion benches, short mode (each benchmark once; no timing asserted)"
cargo test --locked --benches

step "docs/PERFORMANCE.md is what benches/run.py renders from docs/perf/*.json"
python3 benches/run.py --render-only
git diff --exit-code -- docs/PERFORMANCE.md

step "DDL on the current ClickHouse engine (chdb-core)"
chdb_venv=.venv-chdb
if ! "$chdb_venv/bin/python" -c 'import chdb, pytest' 2>/dev/null; then
  python3 -m venv "$chdb_venv"
  "$chdb_venv/bin/pip" install --quiet --disable-pip-version-check -r tests/chdb/requirements.txt
fi
"$chdb_venv/bin/python" -m pytest -p no:cacheprovider tests/chdb -v

step "Helm chart (helm lint/template, kubernetes-validate, rendered-manifest checks)"
SKYSNAP_BIN="$PWD/target/debug/skysnap" scripts/helm-test.sh

step "python agent virtualenv"
venv=.venv
if ! "$venv/bin/python" -c 'import skywalking.protocol.profile.Profile_pb2, pytest' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'apache-skywalking==1.2.0' 'pytest>=7'
fi

step "end-to-end with the SkyWalking Python agent (skysnap alone, and in front of the OAPs)"
# smoke_direct.py first: the agent straight to the OAP, so a broken OAP set-up shows as such.
SKYSNAP_BIN="$PWD/target/debug/skysnap" "$venv/bin/python" -m pytest -p no:cacheprovider \
  tests/oap/smoke_direct.py tests/e2e -v

step "browser test of the profiling page (system Chromium, Playwright)"
if [ ! -x /usr/bin/chromium ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
browser_venv=.venv-browser
if ! "$browser_venv/bin/python" -c 'import skywalking.protocol.profile.Profile_pb2, pytest, playwright.sync_api' 2>/dev/null; then
  python3 -m venv "$browser_venv"
  # Only the Python client: the browser is Debian's chromium, never `playwright install`.
  "$browser_venv/bin/pip" install --quiet --disable-pip-version-check 'apache-skywalking==1.2.0' 'pytest>=7' playwright
fi
SKYSNAP_BIN="$PWD/target/debug/skysnap" "$browser_venv/bin/python" -m pytest -p no:cacheprovider tests/browser -v

step "fuzzing: 45 s of AFL++ on each fuzz target, two at a time (scripts/fuzz.sh, fuzz/README.md)"
# Installs cargo-afl (crates.io, builds its bundled AFL++) when missing and builds the
# targets instrumented in fuzz/target/afl/: about 7 minutes on a fresh machine, 2 after.
scripts/fuzz.sh 45

step "all tests passed"
