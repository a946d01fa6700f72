#!/usr/bin/env bash
# The whole test suite: unit tests, then end-to-end tests that start the real
# edgehub binary, a real Mosquitto and real MQTT clients on loopback.
# Installs what it needs when missing (mosquitto, tinyproxy, nats-server and libfaketime from Debian's packages, the
# Python packages of tests/requirements.txt), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
  echo "installing mosquitto and mosquitto-clients" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
# An HTTP CONNECT proxy for the upstream-through-a-proxy tests.
if ! command -v tinyproxy >/dev/null; then
  echo "installing tinyproxy" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq tinyproxy >/dev/null
fi
# A 3-node NATS JetStream cluster with MQTT listeners: the clustered upstream.
if ! command -v nats-server >/dev/null; then
  echo "installing nats-server" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >/dev/null
fi
# libfaketime: the clock tests move the hub's wall clock.
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ]; then
  echo "installing libfaketime" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libfaketime >/dev/null
fi
# A headless chromium: the status page tests look at the page in a real browser.
if ! command -v chromium >/dev/null; then
  echo "installing chromium" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
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
