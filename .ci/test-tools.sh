#!/usr/bin/env bash
# Tools the tests need beyond the Python environment. Idempotent; installs from the machine's apt
# sources when missing:
#   kubectl                      its built-in kustomize renders the k8s/ overlays
#   openssh-server/-client       each emulated host of tests/cluster runs its own sshd
#   iproute2, util-linux         network namespaces, veth, bridge, tc; unshare for host names
#   chromium                     headless, renders TensorBoard's dashboards (tests/tensorboard_test.py)
set -euo pipefail
say() { printf '[test-tools] %s\n' "$*"; }
die() { printf '[test-tools] ERROR: %s\n' "$*" >&2; exit 1; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
apt_install() {
  command -v apt-get >/dev/null || die "missing $* and no apt-get to install them"
  say "installing $*"
  [ -n "${APT_UPDATED:-}" ] || { $SUDO apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
for pkg in openssh-server openssh-client iproute2 util-linux chromium; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  # policy-rc.d keeps the package from starting the machine's own sshd: the tests start theirs.
  if [ ! -e /usr/sbin/policy-rc.d ] && [ "$(id -u)" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install "${missing[@]}"
fi

if ! command -v kubectl >/dev/null || ! kubectl kustomize --help >/dev/null 2>&1; then
  # Debian's own kubernetes-client is older; prefer the upstream kubectl package where an apt
  # source provides it.
  apt_install kubectl || apt_install kubernetes-client
fi
kubectl kustomize --help >/dev/null 2>&1 || die "the installed kubectl has no 'kustomize'"
