#!/usr/bin/env bash
# The whole test suite: unit tests, then end-to-end tests that start the real
# edgehub binary, a real Mosquitto and real MQTT clients on loopback.
# Installs what it needs when missing (mosquitto from Debian's packages, the
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
if ! python3 -c 'import paho.mqtt, pytest' 2>/dev/null; then
  python3 -m pip install -q -r tests/requirements.txt
fi

cargo build --release --workspace --locked
cargo test --release --workspace --locked
# The example plugins, from source (installs each language's toolchain).
bash plugins/build.sh ${EDGEHUB_PLUGIN_LANGS:-rust}
EDGEHUB_BIN="$PWD/target/release/edgehub" EDGEHUB_PLUGINS="$PWD/plugins/dist" \
  python3 -m pytest tests -q -ra "$@"
