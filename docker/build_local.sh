#!/usr/bin/env bash
# Build and run the CPU and runtime images with podman/buildah on a machine that reaches no
# container registry: the base image is a Debian root file system made here with debootstrap
# (python3 + venv) and imported, in place of python:3.11-slim-bookworm.
#
#   sudo bash docker/build_local.sh [--only runtime]       (root: debootstrap, podman storage)
#
# Needs podman, buildah and debootstrap (Debian packages). The machine's CA bundle and pip
# configuration (its package-registry mirrors) are copied into the base, and the folders that
# configuration names are mounted into the builds, so pip inside the build resolves exactly
# as it does on this machine. RUN steps use chroot isolation and the images are run with
# `buildah run --isolation chroot` as user dm: machines without cgroup delegation or
# setrlimit permission (sandboxes) cannot start OCI containers.
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY=${2:-}
[ "${1:-}" = --only ] || ONLY=""
for tool in podman buildah debootstrap; do
    command -v $tool >/dev/null || { echo "error: $tool not found (apt-get install podman buildah debootstrap)" >&2; exit 2; }
done
WORK=build/docker-local
BASE=localhost/dmcompile-debian-python:bookworm
mkdir -p "$WORK"
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

if ! podman image exists "$BASE"; then
    MIRROR=$(bash scripts/debian_mirror.sh)
    [ -n "$MIRROR" ] || { echo "error: no Debian mirror in /etc/apt/sources.list(.d)" >&2; exit 2; }
    step "base: debootstrap bookworm (python3, python3-venv) from the machine's mirror"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    # pip's effective global settings on this machine (all its config files), as one /etc/pip.conf
    { echo "[global]"; python3 -m pip config list 2>/dev/null | sed -n "s/^global\.\([a-z-]*\)='\(.*\)'$/\1 = \2/p"; } \
        > "$WORK/rootfs/etc/pip.conf"
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
fi
# The local folders the machine's pip configuration points at (find-links, file:// indexes).
MOUNTS=()
PIPCONF=$(python3 -m pip config list 2>/dev/null | grep '^global\.' || true)
for d in $(echo "$PIPCONF" | grep -oE "(file://)?/[^[:space:]']+" | sed 's|^file://||' | grep -v '^/etc/' || true); do
    d=${d%/simple}; d=${d%/}
    [ -d "$d" ] && MOUNTS+=(-v "$d:$d:ro")
done
INDEXES=$(echo "$PIPCONF" | grep -oE "file://[^[:space:]']+" | tr '\n' ' ' || true)
BUILD=(podman build --isolation chroot --network host --build-arg "BASE=$BASE" "${MOUNTS[@]}")

step "build docker/Dockerfile.runtime"
"${BUILD[@]}" -f docker/Dockerfile.runtime -t localhost/dmruntime . >"$WORK/runtime.log" 2>&1 \
    || { tail -20 "$WORK/runtime.log"; exit 1; }
if [ "$ONLY" != runtime ]; then
    step "build docker/Dockerfile.cpu (torch from this machine's package indexes)"
    "${BUILD[@]}" --build-arg "TORCH_INDEX=${INDEXES:-https://download.pytorch.org/whl/cpu}" \
        -f docker/Dockerfile.cpu -t localhost/dmcompile-cpu . >"$WORK/cpu.log" 2>&1 || { tail -20 "$WORK/cpu.log"; exit 1; }
fi
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'dmruntime|dmcompile' || true

# Run: the runtime image samples a committed fixture bundle mounted read-only, as user dm.
OUT=$WORK/out
rm -rf "$OUT" && mkdir -p "$OUT" && chmod 777 "$OUT"
run_image() {  # run_image IMAGE ARGS... (its entry point, as its user, with the mounts below)
    local ctr
    ctr=$(buildah from "$1") && shift
    local rc=0
    buildah run --isolation chroot --user dm --workingdir /work \
        -v "$PWD/runtimes/python/tests/data/tiny-w4:/bundle:ro" -v "$PWD/$OUT:/out" "$ctr" -- "$@" || rc=$?
    buildah rm "$ctr" >/dev/null
    return $rc
}
step "run the runtime image: python -m dmruntime /bundle (read-only) -o /out/tiny.png, as user dm"
run_image localhost/dmruntime sh -c 'id -un; python -m dmruntime /bundle -n 16 --steps 10 -o /out/tiny.png; touch /bundle/x 2>/dev/null && echo "bundle is writable!" || echo "bundle is read-only"; python -c "import torch" 2>/dev/null && echo "torch present!" || echo "no torch"'
ls -la "$OUT"
if [ "$ONLY" != runtime ]; then
    step "run the CPU image: dmcompile build of the embedded default model, then sample it with the runtime"
    run_image localhost/dmcompile-cpu sh -c 'id -un; dmcompile --version; dmcompile build --groups 2 --calib-size 8 --calib-steps 10 --eval-samples 0 --rounding rtn -o /out/digits16-w8a8 && dmcompile sample /out/digits16-w8a8 -n 16 --steps 20 -o /out/digits16.png'
    ls -la "$OUT"
fi
step "done"
