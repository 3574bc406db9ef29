#!/usr/bin/env bash
# Print the first Debian archive address in this machine's apt configuration that is not the
# security archive (deb822 `URIs:` lines and one-line `deb` entries; comments ignored).
# Used by scripts/check_arm64.sh and docker/build_local.sh, so no host name lives in the repository.
set -euo pipefail
{ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
    | grep -oE '^[[:space:]]*(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]+' \
    | grep -oE '[a-z]+://[^[:space:]]+' | grep -v security | head -1 || true
