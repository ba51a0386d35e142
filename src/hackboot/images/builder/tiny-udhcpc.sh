#!/bin/sh
# hackboot tiny image: busybox udhcpc event script (installed as /usr/share/udhcpc/default.script).
# udhcpc only negotiates the lease; applying it to the interface is this script's job.
# Environment from udhcpc: interface ip mask router dns domain mtu (see busybox udhcpc docs).
RESOLV_CONF=/etc/resolv.conf

case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        if [ -n "$router" ]; then
            while ip route del default dev "$interface" 2>/dev/null; do :; done
            for gw in $router; do
                ip route add default via "$gw" dev "$interface" && break
            done
        fi
        if [ -n "$dns" ]; then
            {
                [ -n "$domain" ] && echo "search $domain"
                for server in $dns; do echo "nameserver $server"; done
            } > "$RESOLV_CONF.tmp" && mv "$RESOLV_CONF.tmp" "$RESOLV_CONF"
        fi
        ;;
esac
exit 0
