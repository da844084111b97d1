#!/usr/bin/env bash
# Installs the real BuildKit engine the agent supervises, on a machine with no
# BuildKit package: builds `buildkitd` and `buildctl` of a pinned release from
# the Go module proxy, installs `runc` and a static busybox from Debian.
#
#   sudo bash scripts/install-buildkit.sh            # pinned version
#   BUILDKIT_VERSION=v0.34.2 sudo -E bash scripts/install-buildkit.sh
#
# Idempotent: when /usr/local/bin/buildkitd already reports the pinned version
# the Go build is skipped. The build happens in a temporary GOPATH outside the
# repository. Called by .ci/run and by scripts/quickstart.sh.
#
# Environment:
#   BUILDKIT_VERSION  release tag to build (default below)
#   PREFIX            install prefix (default /usr/local)
set -euo pipefail

BUILDKIT_VERSION=${BUILDKIT_VERSION:-v0.34.2}
PREFIX=${PREFIX:-/usr/local}
MODULE=github.com/moby/buildkit

log() { echo "install-buildkit: $*" >&2; }

if [[ $EUID -ne 0 ]]; then
    log "run as root"
    exit 1
fi

# --- runc and a static busybox from Debian --------------------------------------
# busybox-static gives build tests a shell in a FROM scratch image without any
# registry; runc is the OCI worker's runtime.
missing=()
command -v runc >/dev/null || missing+=(runc)
[[ -x /bin/busybox && $(file -b /bin/busybox 2>/dev/null) == *static* ]] || missing+=(busybox-static)
command -v file >/dev/null || missing+=(file)
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- buildkitd and buildctl from the Go module proxy ------------------------------
installed_version() {
    # "buildkitd github.com/moby/buildkit v0.34.2 <revision>"
    "$PREFIX/bin/buildkitd" --version 2>/dev/null | awk '{print $3}'
}

if [[ -x $PREFIX/bin/buildkitd && -x $PREFIX/bin/buildctl && $(installed_version) == "$BUILDKIT_VERSION" ]]; then
    log "buildkitd $BUILDKIT_VERSION already installed in $PREFIX/bin"
else
    command -v go >/dev/null || { log "Go is needed to build BuildKit (apt-get install golang-go, or a Go toolchain)"; exit 1; }
    work=$(mktemp -d /tmp/install-buildkit.XXXXXX)
    trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
    export GOPATH="$work/gopath" GOMODCACHE="$work/gopath/pkg/mod" GOCACHE="${GOCACHE:-/var/cache/install-buildkit/go-build}"
    export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
    mkdir -p "$GOCACHE"
    log "downloading $MODULE@$BUILDKIT_VERSION from the Go module proxy"
    dir=$(cd "$work" && go mod download -json "$MODULE@$BUILDKIT_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
    [[ -d $dir ]] || { log "go mod download gave no module directory"; exit 1; }
    log "building buildkitd and buildctl (static, CGO off) in $dir"
    ldflags="-s -w -X $MODULE/version.Version=$BUILDKIT_VERSION -X $MODULE/version.Package=$MODULE"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$work/bin/" ./cmd/buildkitd ./cmd/buildctl)
    install -m 0755 "$work/bin/buildkitd" "$work/bin/buildctl" "$PREFIX/bin/"
fi

got=$(installed_version)
if [[ $got != "$BUILDKIT_VERSION" ]]; then
    log "buildkitd --version reports '$got', expected $BUILDKIT_VERSION"
    exit 1
fi
log "ok: $("$PREFIX/bin/buildkitd" --version), $("$PREFIX/bin/buildctl" --version), $(runc --version | head -1)"
