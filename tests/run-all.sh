#!/usr/bin/env bash
# The whole test suite: unit tests, then end-to-end tests that start the real
# edgehub binary, a real Mosquitto and real MQTT clients on loopback.
# Installs what it needs when missing (mosquitto, tinyproxy, nats-server, libfaketime and chromium from Debian's packages, the
# Python packages of tests/requirements.txt), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# What the tests need from Debian's packages, installed in one apt run:
# Mosquitto (the upstream broker and its clients), tinyproxy (an HTTP
# CONNECT proxy for the upstream-through-a-proxy tests), nats-server (a
# 3-node NATS JetStream cluster with MQTT listeners: the clustered
# upstream), libfaketime (the clock tests move the hub's wall clock) and
# chromium (the status page tests look at the page in a real browser).
missing=()
command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null || missing+=(mosquitto mosquitto-clients)
command -v tinyproxy >/dev/null || missing+=(tinyproxy)
command -v nats-server >/dev/null || missing+=(nats-server)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || missing+=(libfaketime)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import paho.mqtt, pytest' 2>/dev/null; then
  python3 -m pip install -q -r tests/requirements.txt
fi

# One cargo run builds the binaries and every test target: the host crate's
# library and its test build are compiled side by side on two cores.
cargo build --release --workspace --locked --all-targets
cargo test --release --workspace --locked
# The example plugins, from source, in every language (installs each
# language's toolchain when missing); the tests then require all of them.
bash plugins/build.sh
EDGEHUB_BIN="$PWD/target/release/edgehub" EDGEHUB_PLUGINS="$PWD/plugins/dist" \
  EDGEHUB_REQUIRE_ALL_LANGS=1 python3 -m pytest tests -q -ra --durations=25 "$@"
