#!/usr/bin/env bash
# Runs skysnap on the embedded SQLite store with the default configuration (or
# config/skysnap.yaml when present): installs the build's Debian packages when
# missing, builds in release mode, serves. Extra arguments go to `skysnap serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
exec cargo run --release --locked -- serve "$@"
