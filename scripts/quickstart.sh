#!/usr/bin/env bash
# Runs machine-agent's main job on this machine, in standalone mode: no control
# plane, the task comes from examples/standalone-task.toml.
#
#   sudo bash scripts/quickstart.sh
#
# What it does, in order:
#   0. installs the real engine if missing (scripts/install-buildkit.sh: a
#      pinned buildkitd/buildctl built from the Go module proxy, runc);
#   1. makes a throwaway CA, a server certificate for the engine's mTLS
#      listener and a client certificate for buildctl (ECDSA P-256) in
#      /var/lib/machine-agent/quickstart-tls (kept if already there);
#   2. builds the agent (cargo build --release --locked);
#   3. validates the config and the task file (machine-agent check);
#   4. execs the agent in the foreground: it makes a 10 GiB sparse cache file,
#      formats and mounts it, and supervises buildkitd on it with mTLS on
#      127.0.0.1:1234. Ctrl-C (SIGINT) drains and exits.
#
# Needs root (the agent's state dir is under /var/lib, and later steps mount
# the cache volume), Rust, and openssl (installed with apt-get if missing).
set -euo pipefail

STATE_DIR=/var/lib/machine-agent
TLS_DIR="$STATE_DIR/quickstart-tls"   # must match examples/standalone-task.toml
CONFIG=examples/config.toml
TASK=examples/standalone-task.toml

cd "$(dirname "$0")/.."

if [[ $EUID -ne 0 ]]; then
    echo "quickstart: run as root: sudo bash scripts/quickstart.sh" >&2
    exit 1
fi

if ! command -v openssl >/dev/null; then
    echo "quickstart: installing openssl"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl
fi

# --- 0. the engine ---------------------------------------------------------------
bash scripts/install-buildkit.sh

# --- 1. throwaway TLS material -------------------------------------------------
# The agent creates its state dir 0700 itself; make it the same way here so the
# keys below never sit in a world-readable directory, even for a moment.
install -d -m 0700 "$STATE_DIR"
install -d -m 0700 "$TLS_DIR"
if [[ -s $TLS_DIR/ca.pem && -s $TLS_DIR/server.pem && -s $TLS_DIR/server-key.pem && -s $TLS_DIR/client.pem ]]; then
    echo "quickstart: reusing the TLS material in $TLS_DIR"
else
    echo "quickstart: generating a throwaway CA and server certificate in $TLS_DIR"
    (
        umask 077
        cd "$TLS_DIR"
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca-key.pem
        openssl req -x509 -new -key ca-key.pem -sha256 -days 30 -subj "/CN=machine-agent quickstart CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -out ca.pem
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server-key.pem
        openssl req -new -key server-key.pem -subj "/CN=localhost" -out server.csr
        printf '%s\n' \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 -days 30 \
            -extfile server.ext -out server.pem
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out client-key.pem
        openssl req -new -key client-key.pem -subj "/CN=quickstart buildctl" -out client.csr
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=clientAuth" >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 -days 30 \
            -extfile client.ext -out client.pem
        rm -f server.csr server.ext client.csr client.ext ca.srl
    )
    chmod 0600 "$TLS_DIR"/*-key.pem
    chmod 0644 "$TLS_DIR"/ca.pem "$TLS_DIR"/server.pem "$TLS_DIR"/client.pem
fi

# --- 2. build --------------------------------------------------------------------
# Under sudo, root's PATH often lacks the invoking user's ~/.cargo/bin (rustup);
# then build as that user, with their toolchain.
if command -v cargo >/dev/null; then
    cargo build --release --locked
elif [[ -n ${SUDO_USER:-} ]] && user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6) \
        && [[ -x $user_home/.cargo/bin/cargo ]]; then
    sudo -u "$SUDO_USER" env HOME="$user_home" PATH="$user_home/.cargo/bin:$PATH" \
        cargo build --release --locked
else
    echo "quickstart: cargo not found; install Rust with rustup and retry" >&2
    exit 1
fi

AGENT=./target/release/machine-agent

# --- 3. validate -------------------------------------------------------------------
"$AGENT" check --config "$CONFIG" --task "$TASK"

# --- 4. run ------------------------------------------------------------------------
echo "quickstart: starting the agent. From another terminal:"
echo "quickstart:   curl -s 127.0.0.1:9911/readyz; curl -s 127.0.0.1:9911/metrics"
echo "quickstart:   buildctl --addr tcp://127.0.0.1:1234 --tlsservername localhost \\"
echo "quickstart:     --tlscacert $TLS_DIR/ca.pem --tlscert $TLS_DIR/client.pem --tlskey $TLS_DIR/client-key.pem \\"
echo "quickstart:     debug workers"
echo "quickstart: Ctrl-C drains and exits."
exec "$AGENT" run --config "$CONFIG" --standalone "$TASK"
