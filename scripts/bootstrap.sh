# Sourced by scripts/up and scripts/test: everything a fresh Debian/Ubuntu
# machine needs, installed only when missing. Re-runs take a second.
set -euo pipefail

#: The extras of the checkout's .venv, one for scripts/up and scripts/test alike: the server,
#: the agent (the local run's demo nodes, the tests' agents) and the test tools.
DEV_EXTRAS="server,agent,test"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[setup]\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  if [ -z "${_APT_UPDATED:-}" ]; then as_root apt-get update -qq || return 1; _APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

find_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

ensure_venv() {
  local extras="$1" python stamp want
  python=$(find_python) || die "Python 3.11 or newer is needed (Debian/Ubuntu: apt-get install python3)"
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $python"
    if ! "$python" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv || die "cannot create a venv: install python3-venv (apt-get install python3-venv)"
      "$python" -m venv .venv
    fi
  fi
  stamp=.venv/.installed
  want="$extras $(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing the project and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
  fi
}

ensure_redis_server() {
  command -v redis-server >/dev/null && return 0
  say "redis-server is not installed; installing Debian's package"
  apt_install redis-server || die "redis-server is needed: install it (apt-get install redis-server) or set REDIS_URL"
  command -v redis-server >/dev/null || die "redis-server still not on PATH after installing it"
}

ensure_chromium() {
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null && return 0
  say "Chromium is not installed (the page's browser test needs it); installing Debian's package"
  apt_install chromium || die "Chromium is needed for the browser test: apt-get install chromium"
  command -v chromium >/dev/null || die "chromium still not on PATH after installing it"
}
