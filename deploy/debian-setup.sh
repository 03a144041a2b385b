#!/usr/bin/env bash
# Installs and starts what mailroute's tests need on a Debian 12 machine (run as root).
#
#   - Dovecot (dovecot-imapd, dovecot-pop3d, and for the forwarding-rule tests Pigeonhole's
#     dovecot-managesieved, dovecot-sieve and dovecot-lmtpd): installed only; the tests start their own
#     instances on free ports, so a system Dovecot that the install started is stopped again.
#   - RabbitMQ: installed and started when nothing listens on 127.0.0.1:5672; the plugins
#     rabbitmq_management and rabbitmq_prometheus are always made sure of, and the management
#     API on 127.0.0.1:15672 is waited for.  deploy/rabbitmq/60-mailroute.conf (a 16 MB
#     quorum-queue WAL) goes into /etc/rabbitmq/conf.d/, and the node is restarted once if it
#     runs with another WAL size.
#   - PostgreSQL: installed and started when nothing listens on 127.0.0.1:5432, with trust
#     authentication for the user postgres from 127.0.0.1.
#   - Prometheus (Debian's prometheus, for promtool and the scrape test): installed only; the
#     tests start their own on free ports, so a system Prometheus the install started (and
#     that would hold port 9090) is stopped and disabled again.
#   - Chromium (Debian's chromium and chromium-driver): installed only, for the browser tests
#     of the operations page (tests/browser/), which drive it headless through
#     /usr/bin/chromedriver; nothing downloads a browser of its own.
#   - Kernel writeback (deploy/sysctl/60-mailroute-writeback.conf): installed into
#     /etc/sysctl.d/ and applied, so that the broker's fsyncs never wait behind a 30-second
#     burst of page cache; where /proc/sys cannot be written (a container), a warning.
#
# Idempotent and quiet when everything is there; prints what it installs or starts.  Every wait
# has a timeout (SETUP_TIMEOUT seconds, default 120) and fails naming the service.
# `make services` runs it; so does `make test`.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
TIMEOUT="${SETUP_TIMEOUT:-120}"
APT_UPDATED=0

log() { echo "debian-setup: $*"; }
die() { echo "debian-setup: ERROR: $*" >&2; exit 1; }

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 needs root; run this script as root (or do it by hand)"
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Installs the packages among "$@" that are missing; apt-get update runs once, only if needed.
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 1
    require_root "installing ${missing[*]}"
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        apt-get update -q -o DPkg::Lock::Timeout="$TIMEOUT" >/dev/null
        APT_UPDATED=1
    fi
    log "installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout="$TIMEOUT" \
        "${missing[@]}"
    return 0
}

port_open() {  # host port
    # shellcheck disable=SC2016  # $0 and $1 are expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# Prints the status line of an HTTP GET (e.g. "HTTP/1.1 401 Unauthorized"), or nothing.
http_status() {  # host port path
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3
        head -n 1 <&3 | tr -d "\r"' "$1" "$2" "$3" 2>/dev/null || true
}

# Polls "$@" (a command) once a second until it succeeds, or dies naming the service.
wait_for() {  # service-description command...
    local what="$1" deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within ${TIMEOUT}s"
        sleep 1
    done
}

http_answers() {  # host port path
    [[ "$(http_status "$@")" == HTTP/* ]]
}

# --- Dovecot ---------------------------------------------------------------------------------

# Stops a Dovecot started from the system configuration (by the package's postinst or an init
# system) and never one of the tests' instances, which use their own -c configuration.
stop_system_dovecot() {
    if command -v systemctl >/dev/null; then
        systemctl disable --now dovecot >/dev/null 2>&1 || true
    fi
    local pid args
    for pid in $(pgrep -x dovecot 2>/dev/null || true); do
        args="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
        if [[ " $args " == *" -c "* && " $args " != *" -c /etc/dovecot/dovecot.conf "* ]]; then
            continue
        fi
        log "stopping the system Dovecot (pid $pid) that the package started"
        kill "$pid" 2>/dev/null || true
    done
}

setup_dovecot() {
    if apt_install dovecot-imapd dovecot-pop3d dovecot-managesieved dovecot-sieve dovecot-lmtpd
    then
        stop_system_dovecot
    fi
}

# --- RabbitMQ --------------------------------------------------------------------------------

RABBITMQ_PLUGINS=(rabbitmq_management rabbitmq_prometheus)

# The local node answers the CLI (it may still be booting).
rabbitmq_node_runs() {
    timeout 20 rabbitmqctl --quiet ping >/dev/null 2>&1
}

# The node has finished booting and accepts AMQP connections.  await_startup fails at once
# while the node has not yet registered with epmd, hence the polling around it.
rabbitmq_started() {
    timeout 40 rabbitmqctl --quiet await_startup --timeout 30 >/dev/null 2>&1 \
        && port_open 127.0.0.1 5672
}

RABBITMQ_SETTINGS="${RABBITMQ_SETTINGS:-$(dirname "${BASH_SOURCE[0]}")/rabbitmq/60-mailroute.conf}"

# The running node's quorum-queue WAL size in bytes (empty if it cannot be asked).
rabbitmq_wal_bytes() {
    timeout 20 rabbitmqctl --quiet eval 'application:get_env(ra, wal_max_size_bytes).' \
        2>/dev/null | grep -o '[0-9]\+' || true
}

restart_rabbitmq() {
    if command -v systemctl >/dev/null && systemctl is-active --quiet rabbitmq-server 2>/dev/null
    then
        systemctl restart rabbitmq-server
    else
        # shutdown returns once the runtime has exited, so the node name is free again
        timeout "$TIMEOUT" rabbitmqctl --quiet shutdown >/dev/null \
            || die "RabbitMQ: could not stop the node to apply $RABBITMQ_SETTINGS"
        rabbitmq-server -detached
    fi
    wait_for "RabbitMQ (AMQP on 127.0.0.1:5672; see /var/log/rabbitmq/)" rabbitmq_started
}

# Applies deploy/rabbitmq/60-mailroute.conf to this machine's node, restarting it when the
# running WAL size differs (a conf.d file is read only when the node starts).
setup_rabbitmq_settings() {
    local want target=/etc/rabbitmq/conf.d/60-mailroute.conf
    want="$(sed -n 's/^raft\.wal_max_size_bytes *= *//p' "$RABBITMQ_SETTINGS")"
    if ! rabbitmq_node_runs; then
        log "WARNING: RabbitMQ on 127.0.0.1:5672 is not this machine's rabbitmq-server node;" \
            "apply $RABBITMQ_SETTINGS to it yourself"
        return 0
    fi
    [ "$(rabbitmq_wal_bytes)" = "$want" ] && cmp -s "$RABBITMQ_SETTINGS" "$target" && return 0
    require_root "configuring RabbitMQ"
    mkdir -p /etc/rabbitmq/conf.d
    cp "$RABBITMQ_SETTINGS" "$target"
    [ "$(rabbitmq_wal_bytes)" = "$want" ] && return 0
    log "restarting RabbitMQ to apply $target (quorum-queue WAL of $want bytes)"
    restart_rabbitmq
    [ "$(rabbitmq_wal_bytes)" = "$want" ] \
        || die "RabbitMQ runs with a WAL of '$(rabbitmq_wal_bytes)' bytes after the restart," \
               "not $want from $target"
}

setup_rabbitmq() {
    if ! port_open 127.0.0.1 5672; then
        apt_install rabbitmq-server || true
        if ! rabbitmq_node_runs; then
            require_root "starting RabbitMQ"
            log "starting RabbitMQ (rabbitmq-server -detached)"
            rabbitmq-server -detached
        fi
        wait_for "RabbitMQ (AMQP on 127.0.0.1:5672; see /var/log/rabbitmq/)" rabbitmq_started
    fi
    setup_rabbitmq_settings

    # Both plugins answering over HTTP proves they are enabled, with no CLI round trip.
    if http_answers 127.0.0.1 15672 /api/overview && http_answers 127.0.0.1 15692 /metrics; then
        return 0
    fi
    if ! command -v rabbitmq-plugins >/dev/null || ! rabbitmq_node_runs; then
        die "RabbitMQ on 127.0.0.1:5672 is not this machine's rabbitmq-server node, and its" \
            "management API (:15672) or Prometheus endpoint (:15692) does not answer: enable" \
            "${RABBITMQ_PLUGINS[*]} on it"
    fi
    if ! timeout 60 rabbitmq-plugins --quiet is_enabled "${RABBITMQ_PLUGINS[@]}" \
        >/dev/null 2>&1; then
        log "enabling the RabbitMQ plugins ${RABBITMQ_PLUGINS[*]}"
        timeout "$TIMEOUT" rabbitmq-plugins --quiet enable "${RABBITMQ_PLUGINS[@]}" >/dev/null \
            || die "RabbitMQ: could not enable ${RABBITMQ_PLUGINS[*]}"
    fi
    wait_for "RabbitMQ management API (http://127.0.0.1:15672)" \
        http_answers 127.0.0.1 15672 /api/overview
    wait_for "RabbitMQ Prometheus endpoint (http://127.0.0.1:15692/metrics)" \
        http_answers 127.0.0.1 15692 /metrics
}

# --- PostgreSQL ------------------------------------------------------------------------------

pg_version() {
    find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null \
        | sort -V | tail -n 1
}

# Lets the user postgres in from 127.0.0.1 without a password (first matching line wins).
pg_trust_local() {  # version
    local hba="/etc/postgresql/$1/main/pg_hba.conf"
    local line="host    all    postgres    127.0.0.1/32    trust"
    [ -f "$hba" ] || die "PostgreSQL $1: no $hba (is the cluster 'main' missing?)"
    if ! grep -Eq '^host[[:space:]]+all[[:space:]]+(all|postgres)[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' \
        "$hba"; then
        log "PostgreSQL $1: trust authentication for postgres from 127.0.0.1 ($hba)"
        { echo "# added by mailroute's deploy/debian-setup.sh for the test suite"
          echo "$line"
          cat "$hba"; } >"$hba.new"
        chown --reference="$hba" "$hba.new"
        chmod --reference="$hba" "$hba.new"
        mv "$hba.new" "$hba"
        return 0
    fi
    return 1
}

pg_online() {  # version
    pg_lsclusters -h "$1" main 2>/dev/null | awk '{print $4}' | grep -qx online
}

pg_answers() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h 127.0.0.1 -p 5432 -t 2
    else
        port_open 127.0.0.1 5432
    fi
}

setup_postgresql() {
    port_open 127.0.0.1 5432 && return 0
    apt_install postgresql || true
    local version hba_changed=0
    version="$(pg_version)"
    [ -n "$version" ] || die "PostgreSQL: installed, but no cluster under /etc/postgresql"
    require_root "configuring PostgreSQL"
    pg_trust_local "$version" && hba_changed=1
    if pg_online "$version"; then
        if [ "$hba_changed" -eq 1 ]; then
            pg_ctlcluster --skip-systemctl-redirect "$version" main reload
        fi
    else
        log "starting PostgreSQL $version (cluster main)"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start \
            || die "PostgreSQL $version did not start (see /var/log/postgresql/)"
    fi
    wait_for "PostgreSQL (127.0.0.1:5432)" pg_answers
    PGCONNECT_TIMEOUT=5 psql -w -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null \
        || die "PostgreSQL runs on 127.0.0.1:5432 but the user postgres cannot log in without a password"
}

# --- Prometheus ------------------------------------------------------------------------------

# Stops a Prometheus started from the system configuration, never one of the tests' instances
# (they run with their own --config.file in a temporary folder).
stop_system_prometheus() {
    if command -v systemctl >/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    local pid args
    for pid in $(pgrep -x prometheus 2>/dev/null || true); do
        args="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
        if [[ " $args " == *"--config.file="* && " $args " != *"--config.file=/etc/prometheus/"* ]]; then
            continue
        fi
        log "stopping the system Prometheus (pid $pid) that the package started"
        kill "$pid" 2>/dev/null || true
    done
}

setup_prometheus() {
    if apt_install prometheus; then
        stop_system_prometheus
    fi
}

# --- Chromium --------------------------------------------------------------------------------

setup_chromium() {
    apt_install chromium chromium-driver || true
}

# --- Kernel writeback -------------------------------------------------------------------------

WRITEBACK_CONF="${WRITEBACK_CONF:-$(dirname "${BASH_SOURCE[0]}")/sysctl/60-mailroute-writeback.conf}"

# Each "key = value" line of the file whose /proc/sys value differs from it.
writeback_differs() {
    local key value
    while IFS=' =' read -r key value; do
        [[ -z "$key" || "$key" == \#* ]] && continue
        [ "$(cat "/proc/sys/${key//.//}" 2>/dev/null)" = "$value" ] || echo "$key"
    done <"$WRITEBACK_CONF"
}

setup_writeback() {
    local target="${WRITEBACK_TARGET:-/etc/sysctl.d/60-mailroute-writeback.conf}"
    if [ -z "$(writeback_differs)" ] && cmp -s "$WRITEBACK_CONF" "$target"; then
        return 0
    fi
    require_root "setting the kernel's writeback"
    cp "$WRITEBACK_CONF" "$target"
    if sysctl -q -p "$target" >/dev/null 2>&1 && [ -z "$(writeback_differs)" ]; then
        log "kernel writeback set from $target"
    else
        log "WARNING: could not apply $target ($(writeback_differs | tr '\n' ' ')left as" \
            "they are; /proc/sys is read-only here?): the broker may stall every 30 s"
    fi
}

main() {
    case "${1:-}" in
        "") ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    setup_dovecot
    setup_prometheus
    setup_chromium
    setup_writeback
    setup_rabbitmq
    setup_postgresql
}

# Sourcing the script (to try one function) defines the functions and runs nothing.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
