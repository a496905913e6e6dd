#!/usr/bin/env bash
# Tools the tests need beyond the Python environment: kubectl, whose built-in kustomize renders
# the k8s/ overlays. Idempotent; installs from the machine's apt sources when missing.
set -euo pipefail
say() { printf '[test-tools] %s\n' "$*"; }
if command -v kubectl >/dev/null && kubectl kustomize --help 2>/dev/null | grep -q load-restrictor; then
  exit 0
fi
command -v apt-get >/dev/null || { echo "[test-tools] ERROR: kubectl missing and no apt-get to install it" >&2; exit 1; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
say "installing kubectl"
$SUDO apt-get update -qq
# Debian's own kubernetes-client is too old for kustomize's load restrictor; prefer the
# upstream kubectl package where an apt source provides it.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kubectl \
  || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kubernetes-client
kubectl kustomize --help 2>/dev/null | grep -q load-restrictor \
  || { echo "[test-tools] ERROR: the installed kubectl has no 'kustomize --load-restrictor'" >&2; exit 1; }
