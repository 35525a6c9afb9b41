# syntax=docker/dockerfile:1
#
# skysnap container image: `docker build -t skysnap:0.1.0 .`
#
# NOTE: this file has not been built here - the development machine has no Docker
# engine. It is kept correct by reading; build it in CI or on a machine with Docker or
# BuildKit before relying on it.
#
# Stage 1 builds the release binary; librdkafka is compiled from source by the rdkafka
# crate (feature cmake-build), hence cmake and the C headers below (the same list as
# scripts/build-deps.sh). Stage 2 is a slim Debian with only the shared libraries the
# binary links against, a non-root user and the default configuration path used by the
# Helm chart (helm/skysnap), which mounts its ConfigMap at /etc/skysnap/skysnap.yaml.

FROM rust:1-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cmake libcurl4-openssl-dev libssl-dev libsasl2-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the crates index and the target dir between builds (BuildKit);
# the binary is copied out of the cached target dir so that the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/skysnap /usr/local/bin/skysnap

FROM debian:bookworm-slim AS runtime
# Runtime libraries. With the current crate features (rdkafka: ssl, libz) the binary
# links only libssl3/libcrypto and zlib (checked with ldd on a local build); libcurl4,
# libsasl2-2 and libzstd1 match the build headers above so that enabling the rdkafka
# features curl, gssapi or zstd needs no change here. ca-certificates for TLS to Kafka.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libssl3 libcurl4 libsasl2-2 libzstd1 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 skysnap \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/skysnap \
      --no-create-home --shell /usr/sbin/nologin skysnap \
 && mkdir -p /var/lib/skysnap/data /etc/skysnap \
 && chown -R 10001:10001 /var/lib/skysnap
COPY --from=builder /usr/local/bin/skysnap /usr/local/bin/skysnap
# The repository's documented defaults; the chart replaces this file with its ConfigMap.
COPY config/skysnap.yaml /etc/skysnap/skysnap.yaml
USER 10001:10001
# The SQLite default path ./data/skysnap.db resolves to /var/lib/skysnap/data/skysnap.db.
WORKDIR /var/lib/skysnap
VOLUME ["/var/lib/skysnap/data"]
# 11800 gRPC (agents), 12800 HTTP API + /healthz + /readyz, 1234 Prometheus /metrics.
EXPOSE 11800 12800 1234
# SIGTERM (docker stop, Kubernetes) stops skysnap gracefully within shutdown.grace_ms
# (20 s by default): give `docker stop` a longer timeout, e.g. `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["skysnap"]
CMD ["serve", "--config", "/etc/skysnap/skysnap.yaml"]
