#!/bin/sh
# Add ingestd to an existing Prometheus configuration (made for Debian's stock
# /etc/prometheus/prometheus.yml): the alert rules, the `ingestd` scrape job and the runbook base.
# Debian's prometheus is 2.42, which cannot include scrape jobs from another file
# (`scrape_config_files` came with Prometheus 2.43), so the job is appended to prometheus.yml itself.
#
# Usage, as root, from the repository:
#   sh packaging/prometheus/debian-setup.sh RUNBOOK_BASE
#   systemctl reload prometheus
# RUNBOOK_BASE: the URL under which this repository's files are served, e.g.
# https://github.com/<org>/ingestd/blob/main; alerts link to RUNBOOK_BASE/docs/runbook.md#<alert>.
# CONFDIR (default /etc/prometheus): where prometheus.yml is; the rules are installed there too.
#
# Steps: install ingestd-alerts.yml into CONFDIR; append ingestd-scrape.yml to `scrape_configs:`
# (which must be the file's last section, as in Debian's); add the rules under `rule_files:`; add
# `runbook_base: RUNBOOK_BASE` under `global: external_labels:`. A step already done is
# skipped, so running it again changes nothing. The original is kept as prometheus.yml.before-ingestd;
# the result replaces prometheus.yml only if `promtool check config` accepts it.
set -eu
base=${1:?usage: debian-setup.sh RUNBOOK_BASE (e.g. https://github.com/<org>/ingestd/blob/main)}
base=${base%/}
here=$(cd "$(dirname "$0")" && pwd)
confdir=${CONFDIR:-/etc/prometheus}
config=$confdir/prometheus.yml
rules=$confdir/ingestd-alerts.yml

fail() { echo "debian-setup: $*; merge $here/ingestd-scrape.yml by hand (see grafana/README.md)" >&2; exit 1; }
# indent_after PATTERN [ITEM]: the indentation of the first non-comment line after the line matching
# PATTERN; with ITEM, that of the list item there, or two spaces when no list item follows.
indent_after() {
    awk -v pat="$1" -v item="${2:-}" '
        found && /^[ ]*[^ #]/ {
            match($0, /^ */); ind = substr($0, 1, RLENGTH)
            if (item != "" && substr($0, RLENGTH + 1, 1) != "-") ind = "  "
            print ind; printed = 1; exit
        }
        $0 ~ pat { found = 1 }
        END { if (item != "" && !printed) print "  " }' "$work"
}

test -f "$config" || fail "no $config"
install -m 0644 "$here/ingestd-alerts.yml" "$rules"
# Edit a copy (same owner and mode), so that prometheus.yml is never half-edited.
work=$config.ingestd-new
cp -p "$config" "$work"
trap 'rm -f "$work"' EXIT

# First the job, while scrape_configs: may still be the last section; the other steps may append one.
if ! grep -q "^ *- *job_name: *['\"]\{0,1\}ingestd['\"]\{0,1\} *$" "$work"; then
    last=$(awk '/^[A-Za-z_]+:/ { key = $1 } END { print key }' "$work")
    test "$last" = "scrape_configs:" || fail "scrape_configs: is not the last section of $config"
    # The job's items take the indentation of the jobs already there (two spaces in Debian's file;
    # none when there is no job yet, which YAML allows under a key).
    ind=$(grep -m1 -o '^ *- *job_name' "$work" | sed 's/- *job_name$//')
    test -z "$(tail -c1 "$work")" || echo >> "$work"
    sed "s/^  /$ind/" "$here/ingestd-scrape.yml" >> "$work"
fi

if ! grep -q "^[ ]*- *['\"]\{0,1\}$rules" "$work"; then
    if grep -q '^rule_files: *\(#.*\)\{0,1\}$' "$work"; then
        ind=$(indent_after '^rule_files:' item)
        sed -i "/^rule_files:/a\\
$ind- $rules" "$work"
    elif grep -q '^rule_files:' "$work"; then
        fail "rule_files: is written inline"
    else
        printf '\nrule_files:\n  - %s\n' "$rules" >> "$work"
    fi
fi

if ! grep -q '^ *runbook_base:' "$work"; then
    if grep -q '^  *external_labels: *\(#.*\)\{0,1\}$' "$work"; then
        ind=$(indent_after '^ *external_labels:')
        sed -i "/^ *external_labels:/a\\
${ind}runbook_base: \"$base\"" "$work"
    elif grep -q '^  *external_labels:' "$work"; then
        fail "external_labels: is written inline"
    elif grep -q '^global: *\(#.*\)\{0,1\}$' "$work"; then
        ind=$(indent_after '^global:')
        case "$ind" in "") ind="  " ;; esac
        sed -i "/^global:/a\\
${ind}external_labels:\\
${ind}${ind}runbook_base: \"$base\"" "$work"
    else
        printf '\nglobal:\n  external_labels:\n    runbook_base: "%s"\n' "$base" >> "$work"
    fi
fi

# A configuration Prometheus would refuse never replaces the working one.
promtool check config "$work" >&2 || fail "promtool rejects the edited configuration, $config is unchanged"
test -e "$config.before-ingestd" || cp -p "$config" "$config.before-ingestd"
mv "$work" "$config"
trap - EXIT
echo "debian-setup: $config has the ingestd rules, job and runbook_base; now: systemctl reload prometheus" >&2
