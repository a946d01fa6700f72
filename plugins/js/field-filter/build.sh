#!/usr/bin/env bash
# Builds the JavaScript field-filter plugin into a WebAssembly component:
#   ${OUT:-<repo>/plugins/dist}/field-filter-js.wasm
# The toolchain (@bytecodealliance/componentize-js, pinned by package.json and
# package-lock.json) goes into ./node_modules with `npm ci`, once.
set -euo pipefail

COMPONENTIZE_JS_VERSION=0.23.0 # as pinned in package.json (for messages)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
out_dir="${OUT:-$repo/plugins/dist}"
cd "$here"
# The contract: the repository's wit/ folder (WIT_DIR overrides, e.g. to try a draft).
wit="${WIT_DIR:-../../../wit}"

node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
if ((node_major < 20)); then
  echo "error: Node.js 20 or newer (and npm) is needed; Debian bookworm's own nodejs is 18" >&2
  exit 1
fi
# npm ci when node_modules was not installed from this very package-lock.json.
lock_sum="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [[ "$(cat node_modules/.installed-from-lock 2>/dev/null || true)" != "$lock_sum" ]]; then
  echo "installing @bytecodealliance/componentize-js $COMPONENTIZE_JS_VERSION and its tree (npm ci)" >&2
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_sum" > node_modules/.installed-from-lock
fi

mkdir -p "$out_dir"
# The plugin needs no WASI at all: with every optional feature disabled the
# component imports only edgehub:plugin (and is smaller and faster to start).
node_modules/.bin/componentize-js field-filter.js \
  --wit "$wit" --world-name filter \
  --disable stdio random clocks http fetch-event \
  -o "$out_dir/field-filter-js.wasm"
echo "wrote $out_dir/field-filter-js.wasm ($(stat -c %s "$out_dir/field-filter-js.wasm") bytes)" >&2
