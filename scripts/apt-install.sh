#!/usr/bin/env bash
# Installs the named Debian packages that are not installed yet. The packages'
# own services (the registry on :5000, containerd, prometheus) are kept from
# starting with a temporary policy-rc.d: the tests start their own instances.
set -euo pipefail
missing=()
for package in "$@"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0
echo "installing: ${missing[*]}" >&2
sudo=""
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "missing packages ${missing[*]}: run as root or install them" >&2; exit 1; }
  sudo=sudo
fi
policy=/usr/sbin/policy-rc.d
added=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  added=1
fi
trap '((added)) && $sudo rm -f "$policy"' EXIT
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
