#!/bin/sh
# Install the real components some tests drive (Prometheus + promtool, Alertmanager + amtool, headless
# Chromium), when missing.
# Needs root (CI runs as root); elsewhere the tests that need them skip with a reason.
set -eu
need=""
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v prometheus-alertmanager >/dev/null 2>&1 || need="$need prometheus-alertmanager"
command -v chromium >/dev/null 2>&1 || need="$need chromium"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: not root, not installing:$need (tests needing them will skip)" >&2
    exit 0
fi
echo "system-deps: installing:$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $need >/dev/null
