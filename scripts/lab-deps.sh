#!/usr/bin/env bash
# Install what the network-namespace lab tests need (tests/test_lab_dns_scaling.py): dnsmasq
# (Debian's dnsmasq-base: the binary only, no system service) to serve a headless-Service-style
# DNS name, iproute2/util-linux for `ip` and `unshare`/`nsenter`, and nftables (`nft`) for the
# partition lab (tests/test_mesh_partition.py). Idempotent: does nothing when
# everything is there. Needs root (apt-get); prints one line and exits 1 when it cannot install.
set -u

missing=()
command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)  # the partition lab cuts links with it
{ command -v unshare && command -v nsenter; } >/dev/null 2>&1 || missing+=(util-linux)
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "lab-deps: need root and apt-get to install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp /tmp/spawnmesh-lab-deps.XXXXXX)"
echo "lab-deps: installing ${missing[*]} (once per machine)..." >&2
if ! apt-get install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    apt-get update >>"$log" 2>&1
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
        echo "lab-deps: apt-get install ${missing[*]} failed:" >&2
        tail -n 5 "$log" >&2
        rm -f "$log"
        exit 1
    fi
fi
rm -f "$log"
command -v dnsmasq >/dev/null 2>&1
