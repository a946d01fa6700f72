#!/usr/bin/env bash
# Builds the example plugins from source into plugins/dist/ (or $OUT).
#   bash plugins/build.sh              # every language
#   bash plugins/build.sh rust c       # some of them
# Each language's script installs its toolchain when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
export OUT="${OUT:-$PWD/dist}"
mkdir -p "$OUT"
langs=("$@")
[ ${#langs[@]} -eq 0 ] && langs=(rust c python js)

build_rust() {
  rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
  cargo build --release --locked --target wasm32-wasip2 --manifest-path Cargo.toml
  for p in field-filter dedup content-router hostile hostile-view passthrough; do
    cp "target/wasm32-wasip2/release/${p//-/_}.wasm" "$OUT/$p.wasm"
  done
  cp target/wasm32-wasip2/release/wrong-world.wasm "$OUT/wrong-world.wasm"
}

for lang in "${langs[@]}"; do
  started=$(date +%s)
  case "$lang" in
    rust) build_rust ;;
    c|python|js) bash "$lang/field-filter/build.sh" ;;
    *) echo "unknown language $lang (rust, c, python, js)" >&2; exit 2 ;;
  esac
  echo "plugins: $lang built in $(( $(date +%s) - started )) s" >&2
done
ls -l "$OUT" >&2
