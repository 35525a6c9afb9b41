#!/usr/bin/env bash
# Installs the Debian packages skysnap's build needs when they are missing: librdkafka
# (built from source by the rdkafka crate) wants cmake and these headers.
set -euo pipefail
packages=(cmake libcurl4-openssl-dev libssl-dev libsasl2-dev libzstd-dev zlib1g-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing build dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
