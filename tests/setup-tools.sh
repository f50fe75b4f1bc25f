#!/usr/bin/env bash
# Installs what the README's test command needs from Debian's packages (Debian
# 12, Ubuntu 24.04): python3-venv where the system python3 cannot make the
# virtual environment (.venv), and the real image tools the tests use as oracles
# and image makers; then starts libvirtd (as root) so the volume-XML tests can
# compare with virsh. Idempotent: does nothing when all is in place. Another
# apt-get or dpkg at work (unattended-upgrades on a new machine) is waited for,
# up to ten minutes, instead of failing at once on its lock.
set -euo pipefail
need=()
# Debian and Ubuntu leave venv's pip bootstrap out of python3 (PEP 668 machines)
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v bximage >/dev/null || need+=(bochs)
command -v create_compressed_fs >/dev/null || need+=(cloop-utils)
PATH="$PATH:/usr/sbin:/sbin"
command -v cryptsetup >/dev/null || need+=(cryptsetup-bin)
command -v mkfs.fat >/dev/null || need+=(dosfstools)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v xorriso >/dev/null || need+=(xorriso)
# filesystems a guest disk may hold (tests/test_guest.py compares our reading with blkid's)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v mkntfs >/dev/null || need+=(ntfs-3g)
command -v mkfs.exfat >/dev/null || need+=(exfatprogs)
command -v mkfs.f2fs >/dev/null || need+=(f2fs-tools)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v pvcreate >/dev/null || need+=(lvm2)
command -v dmg2img >/dev/null || need+=(dmg2img)
command -v virsh >/dev/null || need+=(libvirt-clients)
command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)
LOCK_WAIT=600  # seconds
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

update_package_lists() {
    # DPkg::Lock::Timeout covers the dpkg lock, not the package lists' lock
    # apt-get update takes: try again while another apt holds that one.
    local err try
    for try in $(seq $((LOCK_WAIT / 5))); do
        err=$($SUDO env LC_ALL=C apt-get -qq update 2>&1) && return 0
        case $err in
            *"Could not get lock"*)
                [ "$try" -gt 1 ] || echo "setup-tools.sh: another apt holds the package lists; waiting" >&2
                sleep 5 ;;
            *) break ;;
        esac
    done
    printf '%s\n' "$err" >&2
    return 1
}

if [ ${#need[@]} -gt 0 ]; then
    update_package_lists
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=$LOCK_WAIT \
        install -y "${need[@]}" >/dev/null
fi
if [ "$(id -u)" -eq 0 ] && ! virsh -c qemu:///system version >/dev/null 2>&1; then
    libvirtd -d
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
# Azure's blob emulator for tests/test_remote.py (Azure takes no suffix range, so its reads
# differ): Microsoft's Azurite from npm, where npm is installed (the test skips, saying so, without it).
if ! command -v azurite-blob >/dev/null && command -v npm >/dev/null; then
    $SUDO npm install -g --silent --no-fund --no-audit azurite >/dev/null 2>&1 \
        || echo "setup-tools.sh: npm could not install azurite; the Azure test will skip" >&2
fi
