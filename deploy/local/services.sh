# shellcheck shell=bash
# Sourced by deploy/local/up and deploy/local/test: makes sure PostgreSQL and RabbitMQ are
# reachable on this machine. Use them if they answer; else start them; else install them from
# Debian's packages (needs root and apt-get); else say exactly what is missing. Idempotent.

PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
AMQP_HOST=${AMQP_HOST:-127.0.0.1}
AMQP_PORT=${AMQP_PORT:-5672}
# The role the gateway uses; it creates one database per test, hence CREATEDB.
PG_ROLE=${PG_ROLE:-gateway}
PG_PASSWORD=${PG_PASSWORD:-gateway}
PG_DATABASE=${PG_DATABASE:-gateway}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.1
  done
  die "$4 did not open $1:$2 within $3 s"
}

apt_updated=
apt_install() {
  command -v apt-get >/dev/null || die "$* missing and apt-get is not available: install $* by hand"
  [ "$(id -u)" = 0 ] || die "$* missing: run 'sudo apt-get install -y $*' (installing needs root)"
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt_updated=1
  fi
  log "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

ensure_postgres() {
  if ! port_open "$PG_HOST" "$PG_PORT"; then
    if ! command -v pg_ctlcluster >/dev/null; then
      apt_install postgresql
    fi
    local version
    version=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1}')
    if [ -z "$version" ]; then
      version=$(ls /usr/lib/postgresql | sort -n | tail -1)
      log "creating PostgreSQL $version cluster 'main'"
      pg_createcluster "$version" main >/dev/null || die "pg_createcluster failed"
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster "$version" main start || die "PostgreSQL did not start: see /var/log/postgresql/"
    wait_port "$PG_HOST" "$PG_PORT" 30 PostgreSQL
  fi
  # The role and database, created once. Local development only: a password known to all.
  if ! PGPASSWORD=$PG_PASSWORD psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE" -qtAc 'select 1' >/dev/null 2>&1; then
    command -v runuser >/dev/null || [ "$(id -u)" != 0 ] || die "runuser missing"
    log "creating role '$PG_ROLE' and database '$PG_DATABASE'"
    as_postgres psql -p "$PG_PORT" -qtAc "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
          CREATE ROLE $PG_ROLE LOGIN CREATEDB CREATEROLE PASSWORD '$PG_PASSWORD';
        END IF; END \$\$;" >/dev/null || die "could not create role $PG_ROLE (is this the machine's own PostgreSQL?)"
    as_postgres psql -p "$PG_PORT" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" | grep -q 1 ||
      as_postgres createdb -p "$PG_PORT" -O "$PG_ROLE" "$PG_DATABASE" || die "could not create database $PG_DATABASE"
  fi
  # The tests give each api a role of its own (no access to the WhatsApp key store).
  if [ "$(PGPASSWORD=$PG_PASSWORD psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE" -qtAc \
      "SELECT rolcreaterole FROM pg_roles WHERE rolname = current_user" 2>/dev/null)" = f ]; then
    log "letting role '$PG_ROLE' create roles"
    as_postgres psql -p "$PG_PORT" -qtAc "ALTER ROLE $PG_ROLE CREATEROLE" >/dev/null ||
      die "could not let $PG_ROLE create roles"
  fi
  ensure_pg_connections
  log "PostgreSQL is up on $PG_HOST:$PG_PORT"
}

# Tests run several fleets at once (an api and up to four workers each, every worker with
# its pool, its reaper's connection and the simulator's): more than the default 100
# connections. Raised on the local cluster only (it needs a restart); a server named by
# DATABASE_URL elsewhere is left as it is.
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-500}
ensure_pg_connections() {
  [ "$PG_HOST" = 127.0.0.1 ] || [ "$PG_HOST" = localhost ] || return 0
  command -v pg_lsclusters >/dev/null || return 0
  local have version
  have=$(PGPASSWORD=$PG_PASSWORD psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE" -qtAc 'SHOW max_connections' 2>/dev/null || echo 0)
  [ "${have:-0}" -ge "$PG_MAX_CONNECTIONS" ] && return 0
  version=$(pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p {print $1; exit}')
  [ -n "$version" ] || return 0
  log "raising PostgreSQL max_connections from $have to $PG_MAX_CONNECTIONS (restart)"
  as_postgres psql -p "$PG_PORT" -qtAc "ALTER SYSTEM SET max_connections = $PG_MAX_CONNECTIONS" >/dev/null ||
    die "could not raise max_connections"
  pg_ctlcluster "$version" main restart || die "PostgreSQL did not restart: see /var/log/postgresql/"
  wait_port "$PG_HOST" "$PG_PORT" 30 PostgreSQL
}

ensure_rabbitmq() {
  if ! port_open "$AMQP_HOST" "$AMQP_PORT"; then
    if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
      apt_install rabbitmq-server
    fi
    log "starting RabbitMQ"
    # No init system in containers: start the broker detached, as the rabbitmq user.
    if [ "$(id -u)" = 0 ]; then
      mkdir -p /var/log/rabbitmq /var/lib/rabbitmq && chown rabbitmq:rabbitmq /var/log/rabbitmq /var/lib/rabbitmq
      runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq rabbitmq-server -detached >/dev/null 2>&1 ||
        service rabbitmq-server start >/dev/null 2>&1 || die "RabbitMQ did not start: see /var/log/rabbitmq/"
    else
      rabbitmq-server -detached || die "RabbitMQ did not start"
    fi
    wait_port "$AMQP_HOST" "$AMQP_PORT" 90 RabbitMQ
    # The port opens before the vhost is ready; await_startup waits for the whole boot.
    timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1 || log "rabbitmqctl await_startup did not answer; going on"
  fi
  log "RabbitMQ is up on $AMQP_HOST:$AMQP_PORT"
}

ensure_services() {
  ensure_postgres
  ensure_rabbitmq
  export DATABASE_URL=${DATABASE_URL:-postgres://$PG_ROLE:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE}
  export AMQP_URL=${AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
}
