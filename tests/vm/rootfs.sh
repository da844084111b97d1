#!/usr/bin/env bash
# The VM boot test's base root filesystem: a Debian bookworm made with
# debootstrap from Debian's packages, cached as a tarball.
#
#   bash tests/vm/rootfs.sh [CACHE_DIR]     (default /var/cache/machine-agent-vm)
#
# Prints the tarball's path as its last line. The tarball is keyed by a hash of
# everything that decides its contents (suite, variant, mirror, package list and
# this script's version), so a changed list builds a new one and an unchanged
# one is reused: the expensive part of the test (minutes of debootstrap) runs
# once per machine. Nothing here is the product; provisioning is
# packer/scripts/provision.sh, applied later by the test to an unpacked copy.
set -euo pipefail

cache_dir=${1:-/var/cache/machine-agent-vm}
suite=bookworm
variant=minbase
mirror=${MA_VM_MIRROR:-http://deb.debian.org/debian}
# What a builder VM needs and no more:
# - systemd-sysv: systemd as PID 1; udev: device nodes and /dev/disk links;
# - linux-image-amd64: the kernel and an initramfs (MODULES=most has
#   virtio_blk, virtio_net and ext4) that qemu boots with -kernel/-initrd;
# - the runtime packages provision.sh would otherwise apt-get: e2fsprogs,
#   xfsprogs, util-linux, mount, ca-certificates, iproute2;
# - libseccomp2: Debian's runc (staged from the host) links against it;
# - kmod: systemd-modules-load for the modules provision.sh lists.
packages=(systemd-sysv udev linux-image-amd64 e2fsprogs xfsprogs util-linux mount ca-certificates iproute2 libseccomp2 kmod)
# Bump when the way the tarball is made changes.
recipe_version=1

include=$(IFS=,; echo "${packages[*]}")
key=$(printf '%s\n' "$suite" "$variant" "$mirror" "$include" "$recipe_version" | sha256sum | cut -c1-16)
tarball="$cache_dir/rootfs-$suite-$key.tar.zst"

if [[ -s $tarball ]]; then
    echo "rootfs: cached $tarball" >&2
    echo "$tarball"
    exit 0
fi

command -v debootstrap >/dev/null || { echo "rootfs: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
command -v zstd >/dev/null || { echo "rootfs: zstd is not installed (apt-get install zstd)" >&2; exit 1; }
mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "rootfs: debootstrap $suite ($variant) with $include" >&2
debootstrap --variant="$variant" --include="$include" "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 40 "$work/debootstrap.log" >&2
    echo "rootfs: debootstrap failed (full log above, last 40 lines)" >&2
    exit 1
}
# Downloaded .debs and apt lists are not part of a root filesystem.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
# Numeric owners: the tarball is unpacked on the same kind of machine, but
# names need not map the same way everywhere.
tar --numeric-owner -C "$work/root" -cf - . | zstd -q -T0 -3 -o "$work/rootfs.tar.zst"
mv "$work/rootfs.tar.zst" "$tarball"
echo "rootfs: built $tarball ($(du -h "$tarball" | cut -f1))" >&2
echo "$tarball"
