#!/bin/sh
# hackboot tiny image: initramfs /init.
#
# The Debian cloud kernel builds virtio_pci/virtio_blk as modules, so with direct kernel boot
# something has to load them before the root disk exists. This is that something: load the
# modules listed at build time (already in dependency order), mount root, switch_root.
PATH=/bin
export PATH

say() { echo "hackboot-tiny: initrd: $*"; }

fail() {
    say "FATAL: $*"
    say "dropping to a shell on the console"
    exec sh
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# insmod (not modprobe): the order is resolved at build time, no depmod data needed here.
while read -r module; do
    [ -n "$module" ] && insmod "/lib/modules/$module" 2>/dev/null
done < /etc/modules.order

root=/dev/vda
rootfstype=ext4
rootflags=
mode=ro
init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
        rootflags=*) rootflags="${arg#rootflags=}" ;;
        init=*) init="${arg#init=}" ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
    esac
done

# Driver probing is synchronous for virtio-pci, but give slow hosts a few seconds anyway.
tries=0
while :; do
    case "$root" in
        LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
        *) dev="$root" ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    tries=$((tries + 1))
    [ "$tries" -gt 100 ] && fail "root device $root did not appear"
    usleep 100000
done

mount -t "$rootfstype" -o "$mode${rootflags:+,$rootflags}" "$dev" /newroot \
    || fail "cannot mount $dev on /newroot"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "$init not found on the root filesystem"

# Hand the already-populated /dev, /proc and /sys over instead of remounting them.
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot "$init"
