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

# Whether HOST is this machine's own server (settings are changed on those only).
on_this_machine() { [ "$1" = 127.0.0.1 ] || [ "$1" = localhost ]; }

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
  on_this_machine "$PG_HOST" || return 0
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
    ensure_rabbitmq_tls_config || true
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

# TLS on both servers, with a CA made here (local servers only): Postgres takes TLS on its
# one port (and refuses the role $PG_TLS_ROLE without it), RabbitMQ gets a TLS listener on
# $AMQPS_PORT beside the plain one. The tests' TLS cases use it (tests/tests/e2e/tls.rs);
# GATEWAY_TLS=1 runs everything over it (verify-full to Postgres, amqps:// to RabbitMQ).
TLS_DIR=${TLS_DIR:-/var/lib/wa-gateway-tls}
AMQPS_PORT=${AMQPS_PORT:-5671}
PG_TLS_ROLE=${PG_TLS_ROLE:-gateway_tls}

make_test_ca() {
  if [ ! -s "$TLS_DIR/server.pem" ]; then
    command -v openssl >/dev/null || apt_install openssl
    log "making a test CA and a server certificate for localhost in $TLS_DIR"
    "$(dirname "${BASH_SOURCE[0]}")/../tls/make-ca" "$TLS_DIR" localhost 127.0.0.1 >/dev/null ||
      die "could not make the test CA"
    chmod 755 "$TLS_DIR"
  fi
  # Each server reads its own copy of the key, owned by its user.
  local who
  for who in postgres rabbitmq; do
    [ -s "$TLS_DIR/$who/server.key" ] && continue
    mkdir -p "$TLS_DIR/$who"
    cp "$TLS_DIR/server.pem" "$TLS_DIR/server.key" "$TLS_DIR/ca.pem" "$TLS_DIR/$who/"
    chmod 600 "$TLS_DIR/$who/server.key"
    if id "$who" >/dev/null 2>&1; then chown -R "$who" "$TLS_DIR/$who"; fi
  done
}

pg_tls_ok() {
  PGPASSWORD=$PG_PASSWORD psql "host=localhost port=$PG_PORT user=$PG_ROLE dbname=$PG_DATABASE \
    sslmode=verify-full sslrootcert=$TLS_DIR/ca.pem" -qtAc 'SELECT 1' >/dev/null 2>&1
}

ensure_postgres_tls() {
  on_this_machine "$PG_HOST" && [ "$(id -u)" = 0 ] || return 0
  make_test_ca
  if ! pg_tls_ok; then
    log "turning TLS on in PostgreSQL (the test CA's certificate)"
    as_postgres psql -p "$PG_PORT" -qtA -c "ALTER SYSTEM SET ssl = on" \
      -c "ALTER SYSTEM SET ssl_cert_file = '$TLS_DIR/postgres/server.pem'" \
      -c "ALTER SYSTEM SET ssl_key_file = '$TLS_DIR/postgres/server.key'" \
      -c "SELECT pg_reload_conf()" >/dev/null || die "could not turn TLS on in PostgreSQL"
    local i
    for ((i = 0; i < 50; i++)); do pg_tls_ok && break; sleep 0.1; done
    pg_tls_ok || die "PostgreSQL did not take the test CA's certificate: see /var/log/postgresql/"
  fi
  # A role that may only connect over TLS: what a server that requires TLS does to everyone.
  local hba
  hba=$(as_postgres psql -p "$PG_PORT" -qtAc 'SHOW hba_file')
  if ! grep -q "^hostnossl all $PG_TLS_ROLE " "$hba"; then
    log "PostgreSQL: role $PG_TLS_ROLE only over TLS"
    sed -i "1i hostnossl all $PG_TLS_ROLE 0.0.0.0/0 reject\nhostnossl all $PG_TLS_ROLE ::/0 reject" "$hba"
    as_postgres psql -p "$PG_PORT" -qtAc "SELECT pg_reload_conf()" >/dev/null
  fi
  as_postgres psql -p "$PG_PORT" -qtAc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_TLS_ROLE') THEN
        CREATE ROLE $PG_TLS_ROLE LOGIN PASSWORD '$PG_PASSWORD';
      END IF; END \$\$;" >/dev/null || die "could not create role $PG_TLS_ROLE"
}

# Written before the broker starts (a running one without the listener is restarted).
RABBITMQ_TLS_CONF=/etc/rabbitmq/conf.d/20-wa-gateway-tls.conf
ensure_rabbitmq_tls_config() {
  on_this_machine "$AMQP_HOST" && [ "$(id -u)" = 0 ] || return 1
  make_test_ca
  id rabbitmq >/dev/null 2>&1 && chown -R rabbitmq "$TLS_DIR/rabbitmq"
  local want
  want="listeners.ssl.default = $AMQPS_PORT
ssl_options.cacertfile = $TLS_DIR/rabbitmq/ca.pem
ssl_options.certfile = $TLS_DIR/rabbitmq/server.pem
ssl_options.keyfile = $TLS_DIR/rabbitmq/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false"
  [ "$(cat "$RABBITMQ_TLS_CONF" 2>/dev/null)" = "$want" ] && return 1
  mkdir -p "$(dirname "$RABBITMQ_TLS_CONF")"
  printf '%s\n' "$want" >"$RABBITMQ_TLS_CONF"
  return 0
}

# A broker already running without the TLS listener (an older set-up) is restarted once.
amqps_ok() {
  echo | timeout 5 openssl s_client -connect "$AMQP_HOST:$AMQPS_PORT" -CAfile "$TLS_DIR/ca.pem" \
    -verify_return_error -verify_hostname localhost >/dev/null 2>&1
}

ensure_rabbitmq_tls() {
  on_this_machine "$AMQP_HOST" && [ "$(id -u)" = 0 ] || return 0
  port_open "$AMQP_HOST" "$AMQPS_PORT" && amqps_ok && return 0
  ensure_rabbitmq_tls_config || [ -f "$RABBITMQ_TLS_CONF" ] || return 0
  log "restarting RabbitMQ for its TLS listener on $AMQPS_PORT"
  timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || true
  local i
  for ((i = 0; i < 100; i++)); do port_open "$AMQP_HOST" "$AMQP_PORT" || break; sleep 0.1; done
  ensure_rabbitmq
  wait_port "$AMQP_HOST" "$AMQPS_PORT" 30 "RabbitMQ's TLS listener"
}

# The S3-compatible media store of the tests (and of `MEDIA_STORE=s3 deploy/local/up`):
# Garage, a self-hosted S3 server, built from crates.io (no S3 server is in Debian's packages
# and no registry serves images here; ~9 min on two cores, once per machine). One node, one
# bucket, one key, made by `garage server --single-node --default-bucket` itself.
S3_PORT=${S3_PORT:-3900}
S3_DIR=${S3_DIR:-/var/lib/wa-gateway-s3}
GARAGE_VERSION=2.5.0
export MEDIA_S3_TEST_ENDPOINT=${MEDIA_S3_TEST_ENDPOINT:-http://127.0.0.1:$S3_PORT}
export MEDIA_S3_TEST_BUCKET=${MEDIA_S3_TEST_BUCKET:-gw-media}
# Its configuration, for tests that ask Garage itself (a bucket of their own, its counts).
export MEDIA_S3_TEST_GARAGE_CONFIG=${MEDIA_S3_TEST_GARAGE_CONFIG:-$S3_DIR/garage.toml}
# Test credentials of a store on loopback (Garage's formats: GK + 24 hex, 64 hex).
export MEDIA_S3_TEST_ACCESS_KEY_ID=${MEDIA_S3_TEST_ACCESS_KEY_ID:-GK0a1b2c3d4e5f60718293a4b5}
export MEDIA_S3_TEST_SECRET_ACCESS_KEY=${MEDIA_S3_TEST_SECRET_ACCESS_KEY:-5e1f0c7a9b2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f}

ensure_garage() {
  if ! garage --version 2>/dev/null | grep -q ":$GARAGE_VERSION "; then
    log "building Garage $GARAGE_VERSION from crates.io (the tests' S3 server; minutes, once)"
    cargo install --quiet --locked garage --version "$GARAGE_VERSION" \
      --no-default-features --features lmdb,bundled-libs --root "${GARAGE_ROOT:-/usr/local}" ||
      die "could not build Garage from crates.io"
  fi
}

ensure_s3() {
  if port_open 127.0.0.1 "$S3_PORT"; then return 0; fi
  ensure_garage
  mkdir -p "$S3_DIR/meta" "$S3_DIR/data"
  chmod 700 "$S3_DIR"
  [ -s "$S3_DIR/rpc_secret" ] || (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$S3_DIR/rpc_secret")
  cat >"$S3_DIR/garage.toml" <<CONF
metadata_dir = "$S3_DIR/meta"
data_dir = "$S3_DIR/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((S3_PORT + 1))"
rpc_public_addr = "127.0.0.1:$((S3_PORT + 1))"
rpc_secret_file = "$S3_DIR/rpc_secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.localhost"
CONF
  log "starting Garage on 127.0.0.1:$S3_PORT (bucket $MEDIA_S3_TEST_BUCKET)"
  GARAGE_DEFAULT_ACCESS_KEY=$MEDIA_S3_TEST_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$MEDIA_S3_TEST_SECRET_ACCESS_KEY \
    GARAGE_DEFAULT_BUCKET=$MEDIA_S3_TEST_BUCKET RUST_LOG=warn \
    setsid garage -c "$S3_DIR/garage.toml" server --single-node --default-bucket \
    >>"$S3_DIR/garage.log" 2>&1 </dev/null &
  wait_port 127.0.0.1 "$S3_PORT" 30 "Garage"
}

ensure_services() {
  ensure_postgres
  ensure_postgres_tls
  ensure_rabbitmq
  ensure_rabbitmq_tls
  if [ -s "$TLS_DIR/ca.pem" ]; then export GATEWAY_TEST_CA=$TLS_DIR/ca.pem; fi
  if [ "${GATEWAY_TLS:-0}" = 1 ]; then
    [ -s "$TLS_DIR/ca.pem" ] || die "GATEWAY_TLS=1 needs the local servers' test CA ($TLS_DIR/ca.pem)"
    log "GATEWAY_TLS=1: Postgres with sslmode=verify-full, RabbitMQ over amqps://"
    export DATABASE_URL=${DATABASE_URL:-postgres://$PG_ROLE:$PG_PASSWORD@localhost:$PG_PORT/$PG_DATABASE?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.pem}
    export AMQP_URL=${AMQP_URL:-amqps://guest:guest@localhost:$AMQPS_PORT/%2f?cacertfile=$TLS_DIR/ca.pem}
  fi
  export DATABASE_URL=${DATABASE_URL:-postgres://$PG_ROLE:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE}
  export AMQP_URL=${AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
}
