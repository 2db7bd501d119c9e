# Sourced by scripts/demo and scripts/test: a virtualenv with the project
# installed, and Mosquitto from apt-get when it is missing. Idempotent and
# quick on a second run (the install is skipped while pyproject.toml is unchanged).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEFLEET_VENV:-$ROOT/.venv}"
EXTRAS="${1:-dev}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root for: $*" >&2; return 1; fi
}

apt_install() {
  say "installing $* with apt-get"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

find_python() {
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "Python 3.10+ is required (3.11 recommended)" >&2; return 1
}

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto
fi

# The dashboard's browser tests drive Debian's Chromium through playwright (no browser download).
if [ "$EXTRAS" = "dev" ] && ! command -v chromium >/dev/null; then
  apt_install chromium
fi

# The server and end-to-end tests also run on PostgreSQL, started by the tests themselves (initdb/pg_ctl).
if [ "$EXTRAS" = "dev" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  apt_install postgresql
fi

PY="$(find_python)"
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    apt_install "$(basename "$PY")-venv" || apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi

STAMP="$VENV/.edgefleet-$EXTRAS-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  say "installing edgefleet[$EXTRAS] into $VENV (TensorFlow takes a minute or two)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
