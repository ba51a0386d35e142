#!/bin/sh
# hackboot tiny image: shutdown script (busybox init "::shutdown", before it kills everything).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "hackboot-tiny: shutting down"
[ -f /run/dropbear.pid ] && kill "$(cat /run/dropbear.pid)" 2>/dev/null
for pidfile in /run/udhcpc.*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
done
umount /run/hackboot/seed 2>/dev/null
sync
# Leave the root filesystem clean so the next boot's e2fsck has nothing to do.
mount -o remount,ro / 2>/dev/null || sync
exit 0
