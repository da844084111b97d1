#!/usr/bin/env bash
# Tests provision.sh into a temporary root: runs it twice with fake staged
# binaries (small shell scripts), checks the installed files, modes and the
# enable symlink, and requires the second run to leave exactly the tree the
# first one made (path, type, mode, sha256 or link target of every entry).
# Then checks that a refused input fails: an unverified download, a wrong
# staged checksum, a missing binary.
#
#   sudo bash packer/scripts/test-provision.sh
#
# Needs root (provision.sh installs root-owned files) and systemctl (for
# `systemctl --root enable`). Touches nothing outside its temporary directory.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
provision=$here/provision.sh

fail() {
    echo "test-provision: FAIL: $*" >&2
    exit 1
}
log() { echo "test-provision: $*"; }

[[ $EUID -eq 0 ]] || fail "run as root"
command -v systemctl >/dev/null || fail "systemctl not found (apt-get install systemd)"

tmp=$(mktemp -d /tmp/test-provision.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
stage=$tmp/stage
mkdir -p "$root" "$stage/bin"

# Fake binaries: each prints its name, so a mixed-up install is visible.
for b in machine-agent bin/buildkitd bin/buildctl bin/runc; do
    printf '#!/bin/sh\necho fake-%s "$@"\n' "$(basename "$b")" >"$stage/$b"
    chmod 0755 "$stage/$b"
done
cp "$repo/systemd/machine-agent.service" "$stage/"
cp "$repo/examples/config-control-plane.toml" "$stage/config.toml"
printf 'MACHINE_AGENT_LOG=debug\n' >"$stage/machine-agent.env"

# provision NAME: one run into the temporary root, its log in $tmp/NAME.log.
provision() {
    MA_ROOT=$root MA_STAGE_DIR=$stage MA_ARCH=amd64 MA_SKIP_PACKAGES=1 bash "$provision" 2>"$tmp/$1.log" || {
        cat "$tmp/$1.log" >&2
        fail "$1 failed"
    }
}

# manifest DIR: one line per entry under DIR, sorted: path, type, mode, owner, and the
# sha256 of a file or the target of a symlink. Timestamps are left out: a
# rerun may touch them, and they are not what a builder depends on.
manifest() {
    (cd "$1" && find . -mindepth 1 -printf '%p %y %m %U:%G\n' | sort | while read -r path type mode owner; do
        case $type in
            f) echo "$path f $mode $owner $(sha256sum "$path" | awk '{print $1}')" ;;
            l) echo "$path l $mode $owner -> $(readlink "$path")" ;;
            *) echo "$path $type $mode $owner" ;;
        esac
    done)
}

# --- run 1 and its result --------------------------------------------------------------
log "run 1"
provision run1
manifest "$root" >"$tmp/manifest1"

expect() { # path type mode; every installed entry is owned by root
    local line
    line=$(grep -E "^\./${1#/} " "$tmp/manifest1") || fail "$1 was not installed"
    [[ $(awk '{print $2, $3, $4}' <<<"$line") == "$2 $3 0:0" ]] || fail "$1: expected type $2 mode $3 owner 0:0, got: $line"
}
expect /usr/local/bin/machine-agent f 755
expect /usr/local/bin/buildkitd f 755
expect /usr/local/bin/buildctl f 755
expect /usr/local/bin/runc f 755
expect /etc/machine-agent d 700
expect /etc/machine-agent/config.toml f 600
expect /etc/default/machine-agent f 600
expect /var/lib/machine-agent d 700
expect /etc/systemd/system/machine-agent.service f 644
expect /etc/sysctl.d/90-machine-agent.conf f 644
expect /etc/modules-load.d/machine-agent.conf f 644
expect /etc/systemd/system/multi-user.target.wants/machine-agent.service l 777
[[ $(readlink "$root/etc/systemd/system/multi-user.target.wants/machine-agent.service") == /etc/systemd/system/machine-agent.service ]] ||
    fail "the wants symlink points at $(readlink "$root/etc/systemd/system/multi-user.target.wants/machine-agent.service")"
[[ $("$root/usr/local/bin/buildkitd") == fake-buildkitd ]] || fail "/usr/local/bin/buildkitd is not the staged buildkitd"
cmp -s "$stage/config.toml" "$root/etc/machine-agent/config.toml" || fail "config.toml differs from the staged one"
grep -qx 'overlay' "$root/etc/modules-load.d/machine-agent.conf" || fail "modules-load.d does not load overlay"
grep -q '^net.ipv4.ip_forward = 1$' "$root/etc/sysctl.d/90-machine-agent.conf" || fail "sysctl.d does not enable forwarding"
if find "$root" -name '*.provision.*' | grep -q .; then fail "temporary files left behind"; fi

# --- run 2: nothing changes ---------------------------------------------------------------
log "run 2"
provision run2
manifest "$root" >"$tmp/manifest2"
diff -u "$tmp/manifest1" "$tmp/manifest2" || fail "run 2 changed the tree (diff above)"
grep -q '^provision: installed' "$tmp/run2.log" && fail "run 2 rewrote files: $(grep '^provision: installed' "$tmp/run2.log")"

# A changed mode or owner is repaired, a changed binary replaced.
chmod 0644 "$root/etc/machine-agent/config.toml"
chown 1:1 "$root/usr/local/bin/buildctl"
echo '#changed' >>"$root/usr/local/bin/runc"
provision run3
manifest "$root" >"$tmp/manifest3"
diff -u "$tmp/manifest1" "$tmp/manifest3" || fail "run 3 did not restore the tree (diff above)"

# --- refusals -----------------------------------------------------------------------------
# refused NAME PATTERN ENV...: provision with ENV must fail with PATTERN on stderr.
refused() {
    local name=$1 pattern=$2
    shift 2
    if env MA_ROOT="$root" MA_STAGE_DIR="$stage" MA_ARCH=amd64 MA_SKIP_PACKAGES=1 "$@" bash "$provision" 2>"$tmp/refused.log"; then
        fail "$name: provision succeeded"
    fi
    grep -q "$pattern" "$tmp/refused.log" || {
        cat "$tmp/refused.log" >&2
        fail "$name: expected an error matching '$pattern'"
    }
    log "refused as expected: $name"
}
refused "wrong staged checksum" "sha256 mismatch" RUNC_SHA256=0000
mv "$stage/bin" "$stage/bin.away"
refused "download without BUILDKIT_SHA256" "refusing an unverified download of BuildKit" BUILDKIT_SHA256=
mv "$stage/bin.away" "$stage/bin"
mv "$stage/machine-agent" "$stage/machine-agent.away"
refused "no agent binary" "machine-agent is missing"
mv "$stage/machine-agent.away" "$stage/machine-agent"
# Packages checked against the rootfs's own (here: absent) dpkg database,
# never apt-get into the host.
refused "missing packages in MA_ROOT" "packages missing in" MA_SKIP_PACKAGES=0

# The refusals changed nothing.
manifest "$root" >"$tmp/manifest4"
diff -u "$tmp/manifest1" "$tmp/manifest4" || fail "a refused run changed the tree"

# --- the download path, against a fake release server --------------------------------------
# No bin/ staged: provision.sh downloads the pinned releases. A curl on PATH
# stands in for github.com: it records each URL and serves the file of the
# same name from $releases, shaped like the real assets (a tarball holding
# bin/buildkitd, bin/buildctl and more; a bare runc binary).
log "download path"
releases=$tmp/releases
mkdir -p "$releases/tree/bin" "$tmp/shim" "$tmp/stage-dl"
for b in buildkitd buildctl buildkit-qemu-aarch64; do
    printf '#!/bin/sh\necho downloaded-%s\n' "$b" >"$releases/tree/bin/$b"
    chmod 0755 "$releases/tree/bin/$b"
done
tar -czf "$releases/buildkit-v0.34.2.linux-arm64.tar.gz" -C "$releases/tree" bin
printf '#!/bin/sh\necho downloaded-runc\n' >"$releases/runc.arm64"
# The shim's own variables are escaped; $tmp and $releases are filled in now.
cat >"$tmp/shim/curl" <<SHIM
#!/bin/sh
# The last argument is the URL, the one after -o the destination.
while [ \$# -gt 1 ]; do
    if [ "\$1" = -o ]; then dest=\$2; fi
    shift
done
echo "\$1" >>"$tmp/urls"
cp "$releases/\${1##*/}" "\$dest"
SHIM
chmod 0755 "$tmp/shim/curl"
cp "$stage/machine-agent" "$stage/machine-agent.service" "$stage/config.toml" "$tmp/stage-dl/"
dl_root=$tmp/root-dl
mkdir "$dl_root"
buildkit_sha=$(sha256sum "$releases/buildkit-v0.34.2.linux-arm64.tar.gz" | awk '{print $1}')
runc_sha=$(sha256sum "$releases/runc.arm64" | awk '{print $1}')
download() {
    env PATH="$tmp/shim:$PATH" MA_ROOT="$dl_root" MA_STAGE_DIR="$tmp/stage-dl" MA_ARCH=arm64 MA_SKIP_PACKAGES=1 \
        BUILDKIT_SHA256="$buildkit_sha" RUNC_SHA256="$runc_sha" bash "$provision"
}
download 2>"$tmp/download.log" || {
    cat "$tmp/download.log" >&2
    fail "provisioning with downloads failed"
}
expected_urls="https://github.com/moby/buildkit/releases/download/v0.34.2/buildkit-v0.34.2.linux-arm64.tar.gz
https://github.com/opencontainers/runc/releases/download/v1.3.3/runc.arm64"
[[ $(cat "$tmp/urls") == "$expected_urls" ]] || fail "downloaded $(cat "$tmp/urls"), expected $expected_urls"
for b in buildkitd buildctl runc; do
    [[ $("$dl_root/usr/local/bin/$b") == "downloaded-$b" ]] || fail "/usr/local/bin/$b is not the downloaded one"
done
[[ ! -e $dl_root/usr/local/bin/buildkit-qemu-aarch64 ]] || fail "installed more of the tarball than buildkitd and buildctl"
# A tampered download is refused, and nothing is installed in its place.
echo tampered >>"$releases/runc.arm64"
rm -f "$dl_root/usr/local/bin/runc"
if download 2>"$tmp/download.log"; then fail "a download with the wrong sha256 was installed"; fi
grep -q "sha256 mismatch" "$tmp/download.log" || {
    cat "$tmp/download.log" >&2
    fail "expected a sha256 mismatch"
}
[[ ! -e $dl_root/usr/local/bin/runc ]] || fail "the tampered runc was installed"
log "refused as expected: tampered download"

log "ok: $(wc -l <"$tmp/manifest1") entries installed, identical after a second run, mode, owner and content repaired, 4 refusals; downloads from the pinned URLs verified and extracted, a tampered one refused"
