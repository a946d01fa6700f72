# Shared by the language build scripts: source it from plugins/<lang>/<name>/build.sh.
# Sets `here` (the plugin's folder, also the working directory), `repo`,
# `out_dir` (where the component goes) and `wit` (the WIT folder), and defines
# make_venv.
here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
out_dir="${OUT:-$repo/plugins/dist}"
cd "$here"
# The contract: the repository's wit/ folder (WIT_DIR overrides, e.g. to try a draft).
wit="${WIT_DIR:-../../../wit}"

# python3 -m venv, installing Debian's python3-venv first if that is what it lacks.
make_venv() {
  python3 -m venv "$1" 2>/dev/null && return
  local sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends python3-venv
  python3 -m venv "$1"
}
