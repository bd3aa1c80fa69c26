# shellcheck shell=bash
# Helpers shared by scripts/test and scripts/run: find, start or install what the project needs.
# Sourced, not executed. Every wait is bounded.

log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

have_apt() { command -v apt-get >/dev/null 2>&1; }

APT_UPDATED=""
apt_update() {
  have_apt || return 1
  if [ -z "$APT_UPDATED" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
    APT_UPDATED=1
  fi
}

apt_install() {
  apt_update || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# wait_for SECONDS COMMAND...: retries COMMAND every half second until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

ensure_rust() {
  command -v cargo >/dev/null 2>&1 && return 0
  [ -x "$HOME/.cargo/bin/cargo" ] && { export PATH="$HOME/.cargo/bin:$PATH"; return 0; }
  die "Rust is not installed. Install it with rustup (https://rustup.rs): curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy"
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

# Starts the machine's PostgreSQL, installing it with apt when missing. Sets
# MESH_TEST_DATABASE_URL unless the caller did.
ensure_postgres() {
  if ! command -v pg_isready >/dev/null 2>&1 && ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "PostgreSQL is not installed; installing it with apt-get"
    apt_install postgresql postgresql-client ||
      die "cannot install PostgreSQL here: install PostgreSQL 13 or newer, start it on 127.0.0.1:5432 and set MESH_TEST_DATABASE_URL to a role that may create databases"
    FRESH_POSTGRES=1
  fi
  if ! pg_up; then
    log "starting PostgreSQL"
    local dir
    for dir in /etc/postgresql/*/; do
      [ -d "$dir" ] || continue
      dir="${dir%/}"
      as_root pg_ctlcluster --skip-systemctl-redirect "${dir##*/}" main start || true
    done
    wait_for 60 pg_up || die "PostgreSQL did not come up on 127.0.0.1:5432"
  fi
  if [ -n "${FRESH_POSTGRES:-}" ]; then
    # A fresh Debian cluster asks for a password over TCP: give the test role one.
    as_root runuser -u postgres -- psql -q -c "ALTER ROLE postgres PASSWORD 'postgres'" ||
      die "cannot set a password for the postgres role"
  fi
  export MESH_TEST_DATABASE_URL="${MESH_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }

# Starts the machine's Redis, installing it with apt when missing. Sets MESH_TEST_REDIS_URL
# unless the caller did.
ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    log "Redis is not installed; installing it with apt-get"
    apt_install redis-server ||
      die "cannot install Redis here: install Redis 6 or newer, start it on 127.0.0.1:6379 and set MESH_TEST_REDIS_URL"
  fi
  if ! redis_up; then
    log "starting Redis"
    local dir=/var/lib/redis logfile=/var/log/redis/ci.log
    if ! { [ -w "$dir" ] || as_root test -w "$dir"; } 2>/dev/null; then
      dir="${TMPDIR:-/tmp}"; logfile="$dir/mesh-redis.log"
    fi
    as_root mkdir -p "$(dirname "$logfile")" 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir "$dir" --logfile "$logfile" ||
      die "redis-server did not start"
    wait_for 30 redis_up || die "Redis did not come up on 127.0.0.1:6379"
  fi
  export MESH_TEST_REDIS_URL="${MESH_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
}

# Debian's chromium for the web page's browser test (tests/api_browser.rs), unless one is
# already there or MESH_CHROMIUM names a Chromium or Chrome binary.
ensure_chromium() {
  if [ -n "${MESH_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 ||
    command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  log "Chromium is not installed; installing it with apt-get (browser test)"
  apt_install chromium ||
    die "cannot install Chromium here: install Debian's chromium or set MESH_CHROMIUM to a Chromium binary"
}

# What the API tests run besides cargo: curl and jq (the guide's commands and health-check
# scripts) and promtool (`promtool check metrics`, unpacked from Debian's prometheus package
# without starting its server).
# cargo-deny (the supply-chain gate of scripts/test), installed with cargo from crates.io when
# missing: a few minutes once on a 2-core machine.
CARGO_DENY_VERSION=0.20.2
ensure_cargo_deny() {
  if cargo deny --version 2>/dev/null | grep -q "$CARGO_DENY_VERSION"; then
    return 0
  fi
  log "cargo-deny $CARGO_DENY_VERSION is missing; installing it with cargo install (a few minutes, once)"
  cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION" ||
    die "cannot install cargo-deny: install it (cargo install cargo-deny --locked) and run again"
}

ensure_api_test_tools() {
  ensure_tool curl curl
  ensure_tool jq jq
  ensure_unpacked_tool promtool prometheus usr/bin/promtool
}

# Where tools unpacked from Debian packages live (see ensure_unpacked_tool).
MESH_TOOLS_DIR="${MESH_TOOLS_DIR:-/var/tmp/mesh-tools}"

# ensure_tool COMMAND PACKAGE: installs the Debian PACKAGE with apt-get when COMMAND is missing.
ensure_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  log "$1 is missing; installing $2 with apt-get"
  apt_install "$2" || die "cannot install $2 here: install it (it provides $1) and run again"
  command -v "$1" >/dev/null 2>&1 || die "$2 is installed but $1 is still not on PATH"
}

# ensure_unpacked_tool COMMAND PACKAGE PATH: for packages whose installation would start a
# daemon (nginx on port 80, the Prometheus server on 9090): when COMMAND is missing, fetches
# PACKAGE with `apt-get download` and unpacks it under $MESH_TOOLS_DIR without installing it
# (no service, no port), then puts the folder of PATH (a path inside the package) on PATH.
ensure_unpacked_tool() {
  local cmd=$1 pkg=$2 rel=$3
  command -v "$cmd" >/dev/null 2>&1 && return 0
  local root="$MESH_TOOLS_DIR/$pkg"
  if [ ! -x "$root/$rel" ]; then
    log "$cmd is missing; unpacking the Debian package $pkg into $root"
    apt_update || die "cannot fetch $pkg here: install it (it provides $cmd) and run again"
    local dl
    dl="$(mktemp -d)"
    chmod 0755 "$dl"
    (cd "$dl" && apt-get download -qq "$pkg" 2>/dev/null) ||
      { rm -rf "$dl"; die "apt-get download $pkg failed: install $pkg (it provides $cmd)"; }
    mkdir -p "$root"
    dpkg-deb -x "$dl"/*.deb "$root" || { rm -rf "$dl"; die "cannot unpack $pkg"; }
    rm -rf "$dl"
  fi
  export PATH="$root/${rel%/*}:$PATH"
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found in the unpacked $pkg"
}
