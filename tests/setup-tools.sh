#!/usr/bin/env bash
# Installs the real image tools the tests use as oracles and image makers
# (Debian packages). Idempotent: does nothing when every tool is present.
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
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
