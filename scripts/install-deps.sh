#!/usr/bin/env bash
# Installs what Hackboot Cloud needs on Debian 12, idempotently: apt packages, then .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils          # hypervisor and disk images
  linux-image-cloud-amd64             # guest kernel for the built-in images
  busybox-static dropbear-bin         # the `tiny` guest
  debootstrap                         # the `debian-12` guest
  genisoimage cpio e2fsprogs kmod     # cloud-init seeds, initramfs, root filesystems
  postgresql                          # multi-host state (tests run against it too)
  openssh-client iproute2 procps curl
  wrk                                 # load generator of the API benchmark
  nftables conntrack                  # VPC security groups, NAT, flow logs (inside hb- namespaces only)
  dnsmasq-base                        # VPC DHCP + DNS (the binary alone, no system service)
  iperf3                              # network benchmark (bench/network.py); never started as a daemon
  haproxy                             # load balancers (one per LB, in its hb- namespace; the system service stays unused)
  bubblewrap nodejs                   # functions: the sandbox, and the Node.js runtime beside python3
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "==> apt-get install ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  # iperf3 asks whether to start a system daemon: answer no before it asks.
  echo "iperf3 iperf3/start_daemon boolean false" | $SUDO debconf-set-selections 2>/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # The haproxy package ships a system service; the cloud runs its own HAProxy per load balancer, so a
  # service this script just installed is switched off again (an operator's existing one is left alone).
  if [[ " ${missing[*]} " == *" haproxy "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now haproxy.service 2>/dev/null || true
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.hackboot-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> pip install -e .[test]"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
