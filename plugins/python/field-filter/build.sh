#!/usr/bin/env bash
# Builds the Python field-filter plugin into a WebAssembly component:
#   ${OUT:-<repo>/plugins/dist}/field-filter-python.wasm
# The toolchain (componentize-py, pinned) goes into ./.venv, once.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

source "$(dirname "${BASH_SOURCE[0]}")/../../lib.sh"
venv="$here/.venv"

if ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
  echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $venv" >&2
  make_venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

mkdir -p "$out_dir"
rm -rf build
# Typed bindings (the `wit_world` package) for editors and type checkers;
# `componentize` below generates its own, so they stay out of the import path.
"$venv/bin/componentize-py" -d "$wit" -w filter bindings build/bindings
# --stub-wasi: the plugin needs no WASI, so the component imports none (its
# WASI calls become traps); the host then needs no WASI grant to load it.
"$venv/bin/componentize-py" -d "$wit" -w filter componentize --stub-wasi app -o "$out_dir/field-filter-python.wasm"
echo "wrote $out_dir/field-filter-python.wasm ($(stat -c %s "$out_dir/field-filter-python.wasm") bytes)" >&2
