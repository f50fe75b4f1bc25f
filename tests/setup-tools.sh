#!/usr/bin/env bash
# Installs the real image tools the tests use as oracles and image makers
# (Debian packages), and starts libvirtd (as root) so the volume-XML tests can
# compare with virsh. Idempotent: does nothing when all is in place.
set -euo pipefail
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v bximage >/dev/null || need+=(bochs)
command -v create_compressed_fs >/dev/null || need+=(cloop-utils)
PATH="$PATH:/usr/sbin:/sbin"
command -v cryptsetup >/dev/null || need+=(cryptsetup-bin)
command -v mkfs.fat >/dev/null || need+=(dosfstools)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v xorriso >/dev/null || need+=(xorriso)
command -v dmg2img >/dev/null || need+=(dmg2img)
command -v virsh >/dev/null || need+=(libvirt-clients)
command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "$(id -u)" -eq 0 ] && ! virsh -c qemu:///system version >/dev/null 2>&1; then
    libvirtd -d
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
