#!/bin/sh
# Install the real components some tests drive (Prometheus + promtool, Alertmanager + amtool, headless
# Chromium; for the distributed tests redis-server, sshfs, sshd and iproute2), when missing.
# Needs root (CI runs as root); elsewhere the tests that need them skip with a reason.
set -eu
need=""
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v prometheus-alertmanager >/dev/null 2>&1 || need="$need prometheus-alertmanager"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
command -v sshfs >/dev/null 2>&1 || need="$need sshfs"
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || need="$need openssh-server"
command -v ssh-keygen >/dev/null 2>&1 || need="$need openssh-client"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: not root, not installing:$need (tests needing them will skip)" >&2
    exit 0
fi
echo "system-deps: installing:$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $need >/dev/null
