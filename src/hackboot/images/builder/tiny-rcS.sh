#!/bin/sh
# hackboot tiny image: boot script (busybox init "::sysinit").
#
# Does, in order, what cloud-init does on a real distro, restricted to the NoCloud subset the
# tiny image supports: root fs check/grow, DHCP, seed disk, hostname, SSH keys, dropbear, then
# runcmd / user-data scripts in the background (like cloud-init's final stage, after SSH is up).
# Every step prints a "hackboot-tiny:" marker on the console (ttyS0) for debugging.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

STATE=/var/lib/hackboot          # persistent, per-disk state
RUN=/run/hackboot                # per-boot scratch
SEED="$RUN/seed"
PARSED="$RUN/parsed"

say() { echo "hackboot-tiny: [$(cut -d" " -f1 /proc/uptime)] $*"; }

say "init started"

# Host keys first, in the background: without a virtio-rng device the kernel only seeds its RNG
# (~1 s of jitter entropy under emulation) once something blocks in getrandom(), so start that
# now and let it overlap with the rest of the boot. Keys are per instance: see the seed section.
generate_host_keys() {
    mkdir -p /etc/dropbear
    for type in ed25519 ecdsa; do   # no RSA: generating it takes seconds under emulation
        keyfile=/etc/dropbear/dropbear_${type}_host_key
        [ -s "$keyfile" ] || dropbearkey -t "$type" -f "$keyfile" >/dev/null 2>&1
    done
}

# --- filesystems --------------------------------------------------------------------------
# The initrd moved /dev, /proc and /sys over; mount them here only when booted without it.
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev run /run
mkdir -p "$RUN" "$SEED" "$PARSED" "$STATE" /var/log

rootdev=$(awk '$2 == "/" && $1 != "rootfs" { dev = $1 } END { print dev }' /proc/mounts)
if [ -b "$rootdev" ]; then
    # Root is still read-only here (mounted "ro" by the initrd), the only safe time to fsck it.
    e2fsck -p "$rootdev" >/dev/null 2>&1
    rc=$?
    [ "$rc" -ge 4 ] && say "WARNING: e2fsck $rootdev exited $rc, continuing"
fi
mount -o remount,rw / || say "WARNING: cannot remount / read-write"
if [ -b "$rootdev" ]; then
    # Grow the filesystem to the disk (online) when the instance disk is larger than the image.
    resize2fs "$rootdev" >"$RUN/resize2fs.log" 2>&1 || say "WARNING: resize2fs failed, see $RUN/resize2fs.log"
fi

say "root filesystem ready"
generate_host_keys &
keygen_pid=$!

hostname -F /etc/hostname 2>/dev/null
ip link set lo up
syslogd -C256    # in-memory log, read with `logread`; dropbear logs there
# ACPI power button (what QMP system_powerdown, i.e. a graceful stop, sends) -> clean poweroff.
modprobe -q button 2>/dev/null && modprobe -q evdev 2>/dev/null && acpid

# --- network ------------------------------------------------------------------------------
# udhcpc only backgrounds itself once it has a lease (or gave up after -t*-T seconds), so the
# first NIC is configured when this returns; other NICs are brought up fully in the background.
first=1
for path in /sys/class/net/*; do
    iface=${path##*/}
    [ -e "$path/device" ] || continue          # skip lo and virtual devices
    ip link set "$iface" up
    if [ "$first" = 1 ]; then
        udhcpc -i "$iface" -s /usr/share/udhcpc/default.script -p "/run/udhcpc.$iface.pid" \
            -t 5 -T 1 -b -S >/dev/null 2>&1
        first=0
    else
        udhcpc -i "$iface" -s /usr/share/udhcpc/default.script -p "/run/udhcpc.$iface.pid" \
            -b -S >/dev/null 2>&1 &
    fi
    say "$iface: $(ip -o -4 addr show dev "$iface" | awk '{ print $4 }' | tr '\n' ' ')"
done

# --- NoCloud seed -------------------------------------------------------------------------
seeddev=$(findfs LABEL=cidata 2>/dev/null || findfs LABEL=CIDATA 2>/dev/null)
instance_id=
if [ -n "$seeddev" ] && mount -o ro "$seeddev" "$SEED" 2>/dev/null; then
    say "seed found on $seeddev"
    if [ -f "$SEED/meta-data" ]; then
        awk -v mode=meta -v out="$PARSED" -f /usr/lib/hackboot/cloudconfig.awk "$SEED/meta-data"
    fi
    if [ -f "$SEED/user-data" ]; then
        first_line=$(head -n 1 "$SEED/user-data" | tr -d '\r')
        case "$first_line" in
            "#cloud-config"*)
                awk -v mode=user -v out="$PARSED" -f /usr/lib/hackboot/cloudconfig.awk "$SEED/user-data" ;;
            "#!"*)
                cp "$SEED/user-data" "$RUN/user-data-script" && chmod 700 "$RUN/user-data-script" ;;
            "")
                ;;
            *)
                say "WARNING: user-data format '$first_line' is not supported by the tiny image" ;;
        esac
    fi
    [ -s "$PARSED/instance-id" ] && instance_id=$(cat "$PARSED/instance-id")
else
    say "no NoCloud seed (LABEL=cidata) found"
fi

previous_instance=$(cat "$STATE/instance-id" 2>/dev/null)
new_instance=0
[ -n "$instance_id" ] && [ "$instance_id" != "$previous_instance" ] && new_instance=1

# --- hostname: user-data "hostname" wins over meta-data "local-hostname" (cloud-init order) --
name=
[ -s "$PARSED/local-hostname" ] && name=$(cat "$PARSED/local-hostname")
[ -s "$PARSED/hostname" ] && name=$(cat "$PARSED/hostname")
name=$(printf '%s' "$name" | tr -cd 'A-Za-z0-9.-' | cut -c1-253)
if [ -n "$name" ]; then
    short=${name%%.*}
    echo "$short" > /etc/hostname
    hostname "$short"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s %s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$name" "$short" > /etc/hosts
fi
say "hostname $(hostname)"

# --- users and SSH keys -------------------------------------------------------------------
home_of() { awk -F: -v u="$1" '$1 == u { print $6 }' /etc/passwd; }

valid_user() {     # keep odd names from corrupting /etc/passwd
    case "$1" in ""|*[!a-z0-9_-]*|[0-9-]*) return 1 ;; esac
}

ensure_user() {    # busybox here has no adduser: edit the databases directly
    user=$1
    valid_user "$user" || { say "WARNING: ignoring invalid user name '$user'"; return 1; }
    grep -q "^$user:" /etc/passwd && return 0
    uid=$(awk -F: '$3 >= 1000 && $3 < 60000 && $3 > max { max = $3 } END { print (max ? max + 1 : 1000) }' /etc/passwd)
    echo "$user:x:$uid:$uid::/home/$user:/bin/sh" >> /etc/passwd
    echo "$user:x:$uid:" >> /etc/group
    echo "$user:*:0:0:99999:7:::" >> /etc/shadow
    mkdir -p "/home/$user"
    chown "$uid:$uid" "/home/$user"
    say "created user $user"
}

add_key() {        # add_key USER KEY: append KEY to USER's authorized_keys unless present
    user=$1 key=$2
    valid_user "$user" || return 0
    home=$(home_of "$user")
    [ -n "$home" ] || return 0
    mkdir -p "$home/.ssh"
    touch "$home/.ssh/authorized_keys"
    grep -qxF "$key" "$home/.ssh/authorized_keys" || echo "$key" >> "$home/.ssh/authorized_keys"
    chmod 700 "$home/.ssh"
    chmod 600 "$home/.ssh/authorized_keys"
    owner=$(awk -F: -v u="$user" '$1 == u { print $3 ":" $4 }' /etc/passwd)
    chown -R "$owner" "$home/.ssh"
}

if [ -s "$PARSED/users" ]; then
    while read -r user; do
        case "$user" in ""|default|root) ;; *) ensure_user "$user" ;; esac
    done < "$PARSED/users"
fi
if [ -s "$PARSED/keys" ]; then
    nkeys=0
    # Each line is "USER:KEY"; an empty USER means the default user, which here is root.
    # (":" and not a tab: read would swallow a leading tab, i.e. an empty USER field.)
    while IFS=: read -r user key; do
        [ -n "$key" ] || continue
        case "$user" in ""|default) user=root ;; esac
        add_key "$user" "$key"
        nkeys=$((nkeys + 1))
    done < "$PARSED/keys"
    say "installed $nkeys ssh key(s)"
fi

# --- dropbear -----------------------------------------------------------------------------
wait "$keygen_pid"
if [ "$new_instance" = 1 ] && [ -n "$previous_instance" ]; then
    # This disk was cloned from another instance: it must not keep that instance's host keys.
    rm -f /etc/dropbear/dropbear_*_host_key
    generate_host_keys
fi
echo "-----BEGIN SSH HOST KEY KEYS-----"
for type in ed25519 ecdsa; do
    dropbearkey -y -f /etc/dropbear/dropbear_${type}_host_key 2>/dev/null | grep -E '^(ssh-|ecdsa-)'
done
echo "-----END SSH HOST KEY KEYS-----"
# -s: public keys only (root has no usable password anyway); root login allowed.
dropbear -s -p 22 -P /run/dropbear.pid \
    -r /etc/dropbear/dropbear_ed25519_host_key -r /etc/dropbear/dropbear_ecdsa_host_key
say "ssh ready"

# --- per-instance user code, in the background like cloud-init's final stage ---------------
if [ "$new_instance" = 1 ]; then
    echo "$instance_id" > "$STATE/instance-id"
    scripts="$STATE/scripts"
    rm -rf "$scripts"
    mkdir -p "$scripts"
    if [ -s "$PARSED/runcmd" ]; then
        { echo '#!/bin/sh'; cat "$PARSED/runcmd"; } > "$scripts/runcmd"
        chmod 700 "$scripts/runcmd"
    fi
    [ -f "$RUN/user-data-script" ] && mv "$RUN/user-data-script" "$scripts/user-data"
    (
        for script in user-data runcmd; do
            [ -x "$scripts/$script" ] || continue
            "$scripts/$script" >> /var/log/hackboot-user.log 2>&1 </dev/null
            say "$script finished with exit code $?"
        done
        : > "$RUN/boot-finished"
        say "boot finished"
    ) &
else
    : > "$RUN/boot-finished"
    say "boot finished"
fi
exit 0
