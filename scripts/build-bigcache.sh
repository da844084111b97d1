#!/usr/bin/env bash
# Builds a BuildKit cache of at least RECORDS records with the real buildkitd,
# for benches/gc_bigcache.rs, and keeps it between runs (like the VM image):
#
#   sudo bash scripts/build-bigcache.sh 40000
#
# The cache lands in $BIGCACHE_DIR/<records>/root (default
# /var/cache/machine-agent-bigcache); a `done` file beside it marks it complete,
# and a complete cache is never built again. A build is a Dockerfile of
# STAGES independent `FROM scratch` stages of COPY_PER_STAGE `COPY` steps each
# (no RUN: a COPY is a file operation inside buildkitd, no container), and a
# last stage copying one file from each: about STAGES * COPY_PER_STAGE + STAGES
# records per build. Every build's files carry a fresh salt, so nothing is a
# cache hit. Chains stay short (overlayfs mounts every parent as a lower dir).
# Destination paths are long (about 120 characters), so each record's
# description is about as long as a short RUN line's.
#
# The engine runs with its own GC off, so nothing it built is pruned behind
# the count's back. Takes about a minute per 5,000 records on 2 cores.
set -euo pipefail

RECORDS=${1:?usage: build-bigcache.sh RECORDS}
BIGCACHE_DIR=${BIGCACHE_DIR:-/var/cache/machine-agent-bigcache}
STAGES=${STAGES:-20}
COPY_PER_STAGE=${COPY_PER_STAGE:-50}
BUILDKITD=${BUILDKITD:-/usr/local/bin/buildkitd}
BUILDCTL=${BUILDCTL:-/usr/local/bin/buildctl}

log() { echo "build-bigcache: $*" >&2; }

dir="$BIGCACHE_DIR/$RECORDS"
if [[ -f "$dir/done" ]]; then
    log "$dir is complete ($(cat "$dir/done") records)"
    exit 0
fi
mkdir -p "$dir/root"
work=$(mktemp -d)
socket="$work/buildkitd.sock"
cat > "$work/buildkitd.toml" <<TOML
root = "$dir/root"
[grpc]
address = ["unix://$socket"]
[worker.oci]
enabled = true
gc = false
[worker.containerd]
enabled = false
TOML

"$BUILDKITD" --config "$work/buildkitd.toml" >"$work/buildkitd.log" 2>&1 &
engine=$!
cleanup() {
    kill "$engine" 2>/dev/null || true
    wait "$engine" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
    "$BUILDCTL" --addr "unix://$socket" debug workers >/dev/null 2>&1 && break
    sleep 0.1
done

long=$(printf 'p%.0s' $(seq 1 100))
per_build=$(( STAGES * COPY_PER_STAGE + STAGES ))
builds=$(( (RECORDS + per_build - 1) / per_build ))
# Builds already kept from an interrupted run count.
first=$(ls "$dir" | grep -c '^build-' || true)
for b in $(seq "$first" $(( builds - 1 ))); do
    ctx="$work/ctx-$b"
    mkdir -p "$ctx"
    salt="$b-$RANDOM-$RANDOM-$(date +%s%N)"
    {
        for s in $(seq 1 "$STAGES"); do
            echo "FROM scratch AS s$s"
            for c in $(seq 1 "$COPY_PER_STAGE"); do
                f="f-$s-$c"
                echo "$salt $f" > "$ctx/$f"
                echo "COPY $f /$long/$f"
            done
        done
        echo "FROM scratch"
        for s in $(seq 1 "$STAGES"); do
            echo "COPY --from=s$s /$long/f-$s-1 /out-$s"
        done
    } > "$ctx/Dockerfile"
    started=$(date +%s)
    "$BUILDCTL" --addr "unix://$socket" build --frontend dockerfile.v0 \
        --local context="$ctx" --local dockerfile="$ctx" >"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; exit 1; }
    touch "$dir/build-$b"
    rm -rf "$ctx"
    log "build $((b + 1))/$builds done in $(( $(date +%s) - started )) s"
done
echo $(( builds * per_build )) > "$dir/done"
log "$dir complete: $(cat "$dir/done") records (planned; the bench counts them)"
