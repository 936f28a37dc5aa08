#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis the tests use answer on loopback, and that Chromium is there
# for the browser tests: use them when they do,
# start them from installed binaries when they don't, install them (Debian packages, as root)
# when they are missing. Never skips: if a service cannot be had, this fails the run.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {
  local name=$1 host=$2 port=$3
  for _ in $(seq 1 60); do
    answers "$host" "$port" && return 0
    sleep 0.5
  done
  echo "ensure_services: $name does not answer on $host:$port" >&2
  return 1
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "ensure_services: $* missing and not root: install it or set CRM_TEST_* URLs" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

# The screens are tested in a real browser: Debian's Chromium, driven by Playwright (which may not
# download a browser of its own here).
command -v chromium >/dev/null || apt_install chromium

# Explicit URLs mean someone else runs the services: only check that they answer.
if [ -n "${CRM_TEST_DATABASE_URL:-}" ] || [ -n "${CRM_TEST_REDIS_URL:-}" ]; then
  echo "ensure_services: using CRM_TEST_DATABASE_URL / CRM_TEST_REDIS_URL as given"
  exit 0
fi

if ! answers "$PG_HOST" "$PG_PORT"; then
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  # Loopback connections from the tests authenticate as postgres without a password.
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if [ -f "$hba" ] && ! grep -q "crm-events tests" "$hba"; then
    sed -i '1i # crm-events tests: trust on loopback\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL "$PG_HOST" "$PG_PORT"
fi

if ! answers "$REDIS_HOST" "$REDIS_PORT"; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /var/lib/redis-crm-tests
  # AOF on, as production requires (docs/operations.md); noeviction keeps queued messages.
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
    --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
    --dir /var/lib/redis-crm-tests --logfile /var/lib/redis-crm-tests/redis.log
  wait_for Redis "$REDIS_HOST" "$REDIS_PORT"
fi

# A Redis that was already running keeps its own configuration: give it what production requires
# (docs/operations.md), so the tests run against the broker configuration we document. Plain
# inline commands over bash's /dev/tcp: no redis-cli needed.
redis_command() {
  local reply
  exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT" || return 1
  printf '%s\r\n' "$*" >&3
  IFS= read -r -t 5 reply <&3 || reply="(no reply)"
  exec 3>&-
  printf '%s\n' "${reply%$'\r'}"
}

for setting in "appendonly yes" "appendfsync everysec" "maxmemory-policy noeviction"; do
  reply=$(redis_command CONFIG SET $setting)
  if [ "$reply" != "+OK" ]; then
    echo "ensure_services: Redis refused CONFIG SET $setting: $reply" >&2
  fi
done

# The fault tests (tests/faults) run private servers of their own, which they restart: they need
# the server programs on this machine even when the shared services run elsewhere.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi
command -v redis-server >/dev/null || apt_install redis-server

echo "ensure_services: PostgreSQL $PG_HOST:$PG_PORT and Redis $REDIS_HOST:$REDIS_PORT answer"
