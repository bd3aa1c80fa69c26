#!/usr/bin/env bash
# Installs mesh-node and mesh-api as systemd services on a Debian/Ubuntu host (as root):
# binaries in /usr/local/bin, helper scripts in /usr/local/lib/mesh, units in
# /etc/systemd/system, the mesh user (sysusers.d), /run/mesh (tmpfiles.d), the configuration
# /etc/mesh/mesh.env (from .env.example, only when absent) and the topology profiles in
# /etc/mesh/profiles. It never overwrites /etc/mesh/mesh.env and never starts anything.
#
# Usage: deploy/install.sh [--bin-dir DIR] [--root DIR]
#   --bin-dir DIR  where mesh-node and mesh-api are (default: target/release)
#   --root DIR     install into DIR instead of / (packaging, tests): no user, no systemctl
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
bin_dir="$repo/target/release"
[ -n "${CARGO_TARGET_DIR:-}" ] && bin_dir="$CARGO_TARGET_DIR/release"
root=""

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --root) root="${2%/}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

for bin in mesh-node mesh-api; do
  [ -x "$bin_dir/$bin" ] || {
    echo "install.sh: $bin_dir/$bin not found: cargo build --release -p mesh-node -p mesh-api-bin" >&2
    exit 1
  }
done

live=""
if [ -z "$root" ]; then
  [ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (or use --root DIR)" >&2; exit 1; }
  live=1
fi

install -d "$root/usr/local/bin" "$root/usr/local/lib/mesh" "$root/usr/local/share/doc/mesh" \
  "$root/etc/systemd/system" "$root/etc/sysusers.d" "$root/etc/tmpfiles.d" \
  "$root/etc/mesh/profiles"
install -m 0755 "$bin_dir/mesh-node" "$bin_dir/mesh-api" "$root/usr/local/bin/"
install -m 0755 "$here/check_provider_health.sh" "$here/check_network_health.sh" \
  "$here/mesh-seen-cleanup.sh" "$root/usr/local/lib/mesh/"
install -m 0644 "$here"/systemd/*.service "$here"/systemd/*.timer "$root/etc/systemd/system/"
install -m 0644 "$here/systemd/mesh.sysusers.conf" "$root/etc/sysusers.d/mesh.conf"
install -m 0644 "$here/systemd/mesh.tmpfiles.conf" "$root/etc/tmpfiles.d/mesh.conf"
install -m 0644 "$here"/profiles/*.env "$root/etc/mesh/profiles/"
install -m 0644 "$repo/docs/operations.md" "$root/usr/local/share/doc/mesh/operations.md"

# The configuration holds secrets (BIRDEYE_API_KEY, REDIS_URL, DATABASE_URL, MESH_API_TOKEN):
# root-owned, readable by group mesh only. systemd reads it as root.
if [ ! -e "$root/etc/mesh/mesh.env" ]; then
  install -m 0640 "$here/.env.example" "$root/etc/mesh/mesh.env"
  fresh_env=1
fi

if [ -n "$live" ]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /etc/sysusers.d/mesh.conf
  elif ! getent passwd mesh >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/mesh --shell /usr/sbin/nologin mesh
  fi
  chgrp mesh /etc/mesh/mesh.env
  if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create /etc/tmpfiles.d/mesh.conf
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
fi

cat <<MSG
mesh installed${root:+ under $root}.
Next:
  1. edit /etc/mesh/mesh.env${fresh_env:+ (fresh copy of deploy/.env.example)}: REDIS_URL, DATABASE_URL,
     MESH_BOOTSTRAP_PEERS, MESH_API_TOKEN; for a provider MESH_NODE_ARGS=--provider and BIRDEYE_API_KEY
  2. pick a topology profile: ln -sf profiles/small.env /etc/mesh/profile.env (small, medium, large)
  3. optional (the node applies them at start too): the PostgreSQL migrations of DATABASE_URL,
     sudo -u mesh sh -c 'set -a; . /etc/mesh/mesh.env; cd /tmp; exec /usr/local/bin/mesh-node migrate'
  4. systemctl enable --now mesh-node mesh-api mesh-seen-cleanup.timer
  5. /usr/local/lib/mesh/check_provider_health.sh; /usr/local/lib/mesh/check_network_health.sh
See /usr/local/share/doc/mesh/operations.md.
MSG
