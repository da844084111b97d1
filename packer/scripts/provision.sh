#!/usr/bin/env bash
# Provisions a builder VM for machine-agent: the agent binary, the BuildKit
# engine (buildkitd, buildctl, runc), the runtime packages the agent calls, the
# kernel settings a builder needs, the config, and the systemd unit, enabled.
#
# Two ways to run it, as root:
#
#   On the target itself (Packer, or inside `chroot <rootfs>`):
#     MA_STAGE_DIR=/tmp/machine-agent-stage bash provision.sh
#
#   From a host, into a root directory (a debootstrap'd rootfs, an image mount):
#     MA_ROOT=<rootfs> MA_STAGE_DIR=<dir> bash packer/scripts/provision.sh
#
# Every installed path is prefixed with MA_ROOT. Running it twice gives the
# same tree: a file whose content and mode already match is left alone, and
# everything else is written to a temporary file and renamed into place.
#
# MA_STAGE_DIR (default /tmp/machine-agent-stage) holds:
#   machine-agent           the agent binary for the target architecture (required)
#   machine-agent.service   the systemd unit (required)
#   config.toml             -> /etc/machine-agent/config.toml, 0600. When absent,
#                           config.example.toml is installed instead (loudly),
#                           unless a config is already installed; with neither,
#                           provisioning fails.
#   machine-agent.env       optional -> /etc/default/machine-agent, 0600 (the
#                           unit's EnvironmentFile: MACHINE_AGENT__... overrides)
#   bin/buildkitd, bin/buildctl, bin/runc
#                           optional engine binaries; when absent the pinned
#                           releases below are downloaded and verified.
#
# Environment:
#   MA_ROOT            root of the target system (default /)
#   MA_STAGE_DIR       see above
#   MA_ARCH            amd64 | arm64 (default: the target's dpkg architecture,
#                      else uname -m)
#   BUILDKIT_VERSION   BuildKit release to download (default v0.34.2, the
#                      version scripts/install-buildkit.sh builds)
#   BUILDKIT_SHA256    sha256 of buildkit-$BUILDKIT_VERSION.linux-$arch.tar.gz;
#                      required when downloading
#   RUNC_VERSION       runc release to download (default v1.3.3)
#   RUNC_SHA256        sha256 of runc.$arch; required when downloading
#   BUILDKITD_SHA256, BUILDCTL_SHA256
#                      when set, staged bin/buildkitd and bin/buildctl must match
#                      (RUNC_SHA256 checks a staged bin/runc the same way)
#   MA_SKIP_PACKAGES=1 for tests only: skip the runtime package check (a
#                      temporary MA_ROOT has no dpkg database)
#
# GPU images (not done here; see packer/README.md, "GPU builders"): add the
# NVIDIA driver (Debian non-free nvidia-driver or nvidia-tesla-<branch>-driver,
# with linux-headers for DKMS) and nvidia-container-toolkit-base from NVIDIA's
# apt repository (/usr/bin/nvidia-ctk, /usr/bin/nvidia-cdi-hook). The agent
# generates /var/run/cdi/nvidia.yaml with nvidia-ctk at every start when
# /proc/driver/nvidia or /dev/nvidia0 exists; tasks then list
# devices = ["nvidia.com/gpu=all"] and steps use RUN --device=nvidia.com/gpu=all.
set -euo pipefail

MA_ROOT=${MA_ROOT:-/}
MA_STAGE_DIR=${MA_STAGE_DIR:-/tmp/machine-agent-stage}
BUILDKIT_VERSION=${BUILDKIT_VERSION:-v0.34.2}
RUNC_VERSION=${RUNC_VERSION:-v1.3.3}
MA_SKIP_PACKAGES=${MA_SKIP_PACKAGES:-0}

# Packages whose tools the agent or the engine runs: mkfs.ext4/resize2fs
# (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs), losetup/blkid/wipefs/fstrim
# (util-linux), mount/umount (mount), the system CA roots for the control
# plane (ca-certificates), and ip for the engine's CNI networking (iproute2).
RUNTIME_PACKAGES=(e2fsprogs xfsprogs util-linux mount ca-certificates iproute2)

UNIT=machine-agent.service

log() { echo "provision: $*" >&2; }
die() {
    echo "provision: error: $*" >&2
    exit 1
}

# The installed path of an absolute target path: MA_ROOT + path, without a
# doubled slash when MA_ROOT is /.
target() { printf '%s%s' "${MA_ROOT%/}" "$1"; }

sha256_of() { sha256sum "$1" | awk '{print $1}'; }

# install_file SRC DEST MODE: DEST is a target path (without MA_ROOT). Leaves a
# file with the same content alone (fixing only owner and mode), else writes a
# temporary file next to DEST and renames it, so a reader never sees half a
# binary and a running binary is replaced, not overwritten.
install_file() {
    local src=$1 dest mode=$3
    dest=$(target "$2")
    mkdir -p "$(dirname "$dest")"
    if [[ -f $dest && ! -L $dest && $(sha256_of "$src") == "$(sha256_of "$dest")" ]]; then
        if [[ $(stat -c '%a %u:%g' "$dest") != "${mode#0} 0:0" ]]; then
            chown 0:0 "$dest"
            chmod "$mode" "$dest"
            log "owner and mode of $2 set to root, $mode"
        else
            log "unchanged: $2"
        fi
        return
    fi
    local tmp
    tmp=$(mktemp "$dest.provision.XXXXXX")
    # Remove the temporary file if the copy fails half way.
    if ! install -o 0 -g 0 -m "$mode" "$src" "$tmp"; then
        rm -f "$tmp"
        die "cannot copy $src to $tmp"
    fi
    mv -f "$tmp" "$dest"
    log "installed: $2 ($mode)"
}

# private_dir PATH: a 0700 directory (target path).
private_dir() {
    local dir
    dir=$(target "$1")
    mkdir -p "$dir"
    chown 0:0 "$dir"
    chmod 0700 "$dir"
}

# check_sha256 FILE EXPECTED WHAT: fails unless FILE's sha256 is EXPECTED.
check_sha256() {
    local got
    got=$(sha256_of "$1")
    [[ ${got,,} == "${2,,}" ]] || die "$3: sha256 mismatch: expected $2, got $got ($1)"
    log "verified sha256 of $3"
}

# --- preconditions ------------------------------------------------------------------
[[ $EUID -eq 0 ]] || die "run as root (files are installed root-owned)"
[[ -d $MA_ROOT ]] || die "MA_ROOT=$MA_ROOT is not a directory"
MA_ROOT=$(cd "$MA_ROOT" && pwd -P)
[[ -d $MA_STAGE_DIR ]] || die "stage directory $MA_STAGE_DIR does not exist (see the top of $0)"
for f in machine-agent "$UNIT"; do
    [[ -f $MA_STAGE_DIR/$f ]] || die "$MA_STAGE_DIR/$f is missing: stage the agent binary and the unit first"
done

if [[ -z ${MA_ARCH:-} ]]; then
    # The target's own architecture: that of the dpkg package in its dpkg
    # database (an arm64 rootfs prepared on an amd64 host says arm64).
    if command -v dpkg-query >/dev/null &&
        MA_ARCH=$(dpkg-query --admindir="$(target /var/lib/dpkg)" -W -f='${Architecture}' dpkg 2>/dev/null) && [[ -n $MA_ARCH ]]; then
        :
    else
        case $(uname -m) in
            x86_64) MA_ARCH=amd64 ;;
            aarch64) MA_ARCH=arm64 ;;
            *) die "unknown machine $(uname -m); set MA_ARCH=amd64 or arm64" ;;
        esac
    fi
fi
case $MA_ARCH in
    amd64 | arm64) ;;
    *) die "MA_ARCH=$MA_ARCH: only amd64 and arm64 builder images exist" ;;
esac
log "root $MA_ROOT, stage $MA_STAGE_DIR, architecture $MA_ARCH"

work=$(mktemp -d /tmp/machine-agent-provision.XXXXXX)
trap 'rm -rf "$work"' EXIT

# --- runtime packages -----------------------------------------------------------------
package_installed() {
    dpkg-query --admindir="$(target /var/lib/dpkg)" -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

if [[ $MA_SKIP_PACKAGES == 1 ]]; then
    log "MA_SKIP_PACKAGES=1: runtime package check skipped (tests only)"
else
    command -v dpkg-query >/dev/null || die "dpkg-query not found: cannot check the runtime packages (MA_SKIP_PACKAGES=1 is for tests only)"
    missing=()
    for p in "${RUNTIME_PACKAGES[@]}"; do
        package_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [[ $MA_ROOT != / ]]; then
            # apt-get here would install into the host, not into MA_ROOT.
            die "packages missing in $MA_ROOT: ${missing[*]} (install them in the rootfs, e.g. debootstrap --include=$(
                IFS=,
                echo "${missing[*]}"
            ), or run this script inside chroot $MA_ROOT)"
        fi
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # On a fresh cloud instance unattended-upgrades or cloud-init may hold
        # the dpkg lock for a while: wait for it instead of failing.
        apt-get -o DPkg::Lock::Timeout=300 update -q
        apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
    else
        log "runtime packages present: ${RUNTIME_PACKAGES[*]}"
    fi
fi

# --- engine binaries -------------------------------------------------------------------
# fetch URL DEST: curl or wget, whichever the target has; refuses plain http.
fetch() {
    [[ $1 == https://* ]] || die "refusing to download over plain http: $1"
    if command -v curl >/dev/null; then
        curl --fail --silent --show-error --location --retry 3 --proto '=https' -o "$2" "$1" || die "download failed: $1"
    elif command -v wget >/dev/null; then
        wget -q --https-only -O "$2" "$1" || die "download failed: $1"
    else
        die "neither curl nor wget is installed to download $1 (or stage the binaries in $MA_STAGE_DIR/bin)"
    fi
}

stage_bin=$MA_STAGE_DIR/bin
if [[ -f $stage_bin/buildkitd && -f $stage_bin/buildctl ]]; then
    [[ -z ${BUILDKITD_SHA256:-} ]] || check_sha256 "$stage_bin/buildkitd" "$BUILDKITD_SHA256" "staged buildkitd"
    [[ -z ${BUILDCTL_SHA256:-} ]] || check_sha256 "$stage_bin/buildctl" "$BUILDCTL_SHA256" "staged buildctl"
    buildkit_dir=$stage_bin
    log "using staged buildkitd and buildctl"
else
    [[ -f $stage_bin/buildkitd || -f $stage_bin/buildctl ]] && die "stage both bin/buildkitd and bin/buildctl, or neither"
    [[ -n ${BUILDKIT_SHA256:-} ]] || die "BUILDKIT_SHA256 is not set: refusing an unverified download of BuildKit $BUILDKIT_VERSION (or stage bin/buildkitd and bin/buildctl)"
    tarball=buildkit-$BUILDKIT_VERSION.linux-$MA_ARCH.tar.gz
    log "downloading $tarball"
    fetch "https://github.com/moby/buildkit/releases/download/$BUILDKIT_VERSION/$tarball" "$work/$tarball"
    check_sha256 "$work/$tarball" "$BUILDKIT_SHA256" "$tarball"
    # The release tarball holds bin/<tool> (with or without a leading ./);
    # only the two the agent uses are taken.
    mkdir "$work/buildkit"
    tar -xzf "$work/$tarball" -C "$work/buildkit" --wildcards --no-anchored bin/buildkitd bin/buildctl
    buildkit_dir=$work/buildkit/bin
    [[ -f $buildkit_dir/buildkitd && -f $buildkit_dir/buildctl ]] || die "$tarball has no bin/buildkitd and bin/buildctl"
fi
install_file "$buildkit_dir/buildkitd" /usr/local/bin/buildkitd 0755
install_file "$buildkit_dir/buildctl" /usr/local/bin/buildctl 0755

if [[ -f $stage_bin/runc ]]; then
    [[ -z ${RUNC_SHA256:-} ]] || check_sha256 "$stage_bin/runc" "$RUNC_SHA256" "staged runc"
    runc_src=$stage_bin/runc
    log "using staged runc"
else
    [[ -n ${RUNC_SHA256:-} ]] || die "RUNC_SHA256 is not set: refusing an unverified download of runc $RUNC_VERSION (or stage bin/runc)"
    log "downloading runc.$MA_ARCH $RUNC_VERSION"
    fetch "https://github.com/opencontainers/runc/releases/download/$RUNC_VERSION/runc.$MA_ARCH" "$work/runc"
    check_sha256 "$work/runc" "$RUNC_SHA256" "runc.$MA_ARCH"
    runc_src=$work/runc
fi
install_file "$runc_src" /usr/local/bin/runc 0755

# --- the agent ---------------------------------------------------------------------------
install_file "$MA_STAGE_DIR/machine-agent" /usr/local/bin/machine-agent 0755

# The agent creates its subdirectories 0700 itself; the parents are made
# private here so nothing else on the image can read the state or the config
# (which may name a token file).
private_dir /var/lib/machine-agent
private_dir /etc/machine-agent

if [[ -f $MA_STAGE_DIR/config.toml ]]; then
    install_file "$MA_STAGE_DIR/config.toml" /etc/machine-agent/config.toml 0600
elif [[ -f $(target /etc/machine-agent/config.toml) ]]; then
    # An image rebuilt without a staged config keeps the one it has.
    log "no staged config.toml; keeping the installed /etc/machine-agent/config.toml"
    chown 0:0 "$(target /etc/machine-agent/config.toml)"
    chmod 0600 "$(target /etc/machine-agent/config.toml)"
elif [[ -f $MA_STAGE_DIR/config.example.toml ]]; then
    log "WARNING: no staged config.toml: installing config.example.toml as /etc/machine-agent/config.toml; edit it (control_plane.url, identity) before the agent can register"
    install_file "$MA_STAGE_DIR/config.example.toml" /etc/machine-agent/config.toml 0600
else
    die "neither $MA_STAGE_DIR/config.toml nor config.example.toml is staged, and no config is installed"
fi

if [[ -f $MA_STAGE_DIR/machine-agent.env ]]; then
    install_file "$MA_STAGE_DIR/machine-agent.env" /etc/default/machine-agent 0600
fi

# --- kernel settings ---------------------------------------------------------------------
cat >"$work/sysctl.conf" <<'EOF'
# Installed by machine-agent's provision.sh. Kernel settings of a builder VM.

# buildkitd, every build step's file watchers (webpack, tsc --watch in tests,
# go build's cache) and the agent's own socket watch each take inotify
# instances; the defaults (128 instances, 8192..~60000 watches) run out with a
# few parallel builds and fail with "too many open files".
fs.inotify.max_user_instances = 8192
fs.inotify.max_user_watches = 1048576

# Build steps that run with the CNI network mode get a bridge and NAT; without
# forwarding their traffic never leaves the VM.
net.ipv4.ip_forward = 1

# buildkitd holds many open files (layers, snapshots, sockets), above the
# unit's LimitNOFILE of 1048576 only if this system-wide ceiling allows.
fs.file-max = 2097152

# Each overlay mount, runc container and cgroup of a large parallel build maps
# memory areas; the default of 65530 is hit by big JVM and Node build steps.
vm.max_map_count = 262144
EOF
install_file "$work/sysctl.conf" /etc/sysctl.d/90-machine-agent.conf 0644

cat >"$work/modules.conf" <<'EOF'
# Installed by machine-agent's provision.sh: buildkitd's overlayfs snapshotter
# needs the overlay module loaded before the first build.
overlay
EOF
install_file "$work/modules.conf" /etc/modules-load.d/machine-agent.conf 0644

# Apply now only on a running system booted by systemd, with MA_ROOT=/ and
# not inside a chroot; in a chroot or into another root the settings apply at
# the target's first boot. Never fatal: a kernel without one of the keys still
# boots a working builder.
on_running_system=false
if [[ $MA_ROOT == / && -d /run/systemd/system ]] && ! systemd-detect-virt --quiet --chroot 2>/dev/null; then
    on_running_system=true
fi
if $on_running_system; then
    sysctl --system >/dev/null || log "WARNING: sysctl --system reported errors; the settings apply at next boot"
    modprobe overlay || log "WARNING: modprobe overlay failed; modules-load.d loads it at next boot"
else
    log "not a booted system outside a chroot (MA_ROOT=$MA_ROOT): sysctl settings and modules apply at first boot"
fi

# --- the unit ------------------------------------------------------------------------------
install_file "$MA_STAGE_DIR/$UNIT" "/etc/systemd/system/$UNIT" 0644
# --root works without a running systemd (Packer's first boot, a chroot, a
# rootfs on the host): it only reads the unit's [Install] section and makes the
# symlinks in that tree. daemon-reload below tells a running systemd.
systemctl --root="$MA_ROOT" enable "$UNIT"
wants=$(target "/etc/systemd/system/multi-user.target.wants/$UNIT")
[[ -L $wants ]] || die "systemctl enable made no $wants"
log "enabled: $UNIT ($(readlink "$wants"))"
if $on_running_system; then
    systemctl daemon-reload
fi

log "done"
