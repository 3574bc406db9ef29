#!/usr/bin/env bash
# Check dmruntime on ARM64 (aarch64) on an x86-64 Linux machine, under qemu user-mode emulation.
#
#   bash scripts/check_arm64.sh [--fast] [--cpu cortex-a76] [--samples 32] [--work build/arm64]
#
# Builds an aarch64 Python from Debian's arm64 packages (downloaded with apt into a private
# state folder, unpacked with dpkg-deb: no root-only kernel features, no binfmt_misc, nothing
# installed on the host), installs the aarch64 wheels of numpy, onnxruntime and pytest with only
# runtimes/python into it, and runs there:
#   1. the runtime's own tests (runtimes/python/tests: committed fixture bundles, x86 references);
#   2. (not with --fast) digits16 bundles built here on x86-64, W8A8 and 4-bit packed weights
#      with 8-bit first/last conv, sampled on both sides and compared (scripts/arm64_compare.py:
#      one call, and paired PSNR of 50-step samples against each other and against fp32);
#   3. (not with --fast) benchmarks/bench_runtime.py: its times under emulation mean nothing.
# qemu comes from Debian's next release (bookworm's qemu 7.2 crashes importing onnxruntime 1.31).
# Mirrors are read from this machine's apt configuration at run time. Downloads are cached in
# the work folder; delete it to start over. Needs apt-get, dpkg-deb, python3 with pip, and for
# step 2 the project's .venv (bash scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=build/arm64
CPU=cortex-a76          # Raspberry Pi 5's core: NEON dot-product, no i8mm; try neoverse-v1 for i8mm
FAST=0
N=32                    # samples per bundle in the comparison
QEMU_SUITE=${QEMU_SUITE:-trixie}
while [ $# -gt 0 ]; do
    case $1 in
        --fast) FAST=1 ;;
        --cpu) CPU=$2; shift ;;
        --work) WORK=$2; shift ;;
        --samples) N=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for tool in apt-get dpkg-deb python3; do
    command -v $tool >/dev/null || { echo "error: $tool not found; this script needs a Debian-like x86-64 host" >&2; exit 2; }
done
[ "$(uname -m)" = x86_64 ] || { echo "error: run this on x86-64 (on an aarch64 machine, run the tests directly)" >&2; exit 2; }
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
logged() {  # logged LOG CMD...: run quietly; on failure show the log's end and stop
    local log=$1; shift
    "$@" >"$log" 2>&1 || { echo "error: $* failed; the end of $log:" >&2; tail -20 "$log" >&2; exit 1; }
}

# --- apt with private state: the host's sources as they are, plus the qemu suite -------------
apt_private() {  # apt_private DIR ARCH [ARCH...] -- apt-get ARGS...
    local dir=$1; shift
    local archs=()
    while [ "$1" != -- ]; do archs+=(-o "APT::Architectures::=$1"); shift; done
    shift
    apt-get -q -o Dir::Etc::SourceList="$dir/etc/sources.list" -o Dir::Etc::SourceParts="$dir/etc/sources.list.d" \
        -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null \
        -o Dir::State="$dir/state" -o Dir::State::status="$dir/state/status" -o Dir::Cache="$dir/cache" \
        -o APT::Architecture="${archs[1]#APT::Architectures::=}" "${archs[@]}" \
        -o pkgCacheGen::Essential=none -o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1 "$@"
}
apt_dir() {
    mkdir -p "$1/etc/sources.list.d" "$1/state/lists/partial" "$1/cache/archives/partial"
    touch "$1/state/status"
}

if [ ! -x "$WORK/root/usr/bin/python3.11" ] || [ ! -x "$WORK/qemu/usr/bin/qemu-aarch64" ]; then
    step "aarch64 Debian packages (mirrors from this machine's apt configuration)"
    A=$WORK/apt
    rm -rf "$A" "$WORK/root" "$WORK/qemu"
    apt_dir "$A"
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$A/etc/"
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && cp "$f" "$A/etc/sources.list.d/"
    done
    # The first Debian archive URI that is not the security archive serves the qemu suite.
    MIRROR=$(bash scripts/debian_mirror.sh)
    [ -n "$MIRROR" ] || { echo "error: no Debian mirror in /etc/apt/sources.list(.d); add one" >&2; exit 2; }
    KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    logged "$WORK/apt.log" apt_private "$A" arm64 amd64 -- update
    logged "$WORK/apt.log" apt_private "$A" arm64 amd64 -- install --download-only -y --no-install-recommends \
        python3.11 libstdc++6
    Q=$WORK/apt-qemu
    rm -rf "$Q"
    apt_dir "$Q"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' "$MIRROR" "$QEMU_SUITE" "$KEYRING" \
        > "$Q/etc/sources.list.d/qemu.sources"
    logged "$WORK/apt.log" apt_private "$Q" amd64 -- update
    logged "$WORK/apt.log" apt_private "$Q" amd64 -- install --download-only -y --no-install-recommends qemu-user
    mkdir -p "$WORK/root.tmp" "$WORK/qemu.tmp"
    for deb in "$A"/cache/archives/*_arm64.deb "$A"/cache/archives/*_all.deb; do
        [ -e "$deb" ] && dpkg-deb -x "$deb" "$WORK/root.tmp"
    done
    dpkg-deb -x "$Q"/cache/archives/qemu-user_*_amd64.deb "$WORK/qemu.tmp"
    mv "$WORK/root.tmp" "$WORK/root" && mv "$WORK/qemu.tmp" "$WORK/qemu"
fi
QEMU=$WORK/qemu/usr/bin/qemu-aarch64
"$QEMU" --version | head -1

# --- the runtime and its aarch64 wheels, at the host's versions where the host has them -----
step "aarch64 wheels: numpy, onnxruntime, pytest and runtimes/python"
HOSTPY=python3
[ -x .venv/bin/python ] && HOSTPY=.venv/bin/python
PINS=$("$HOSTPY" - <<'EOF'
import importlib.metadata as md
for name in ("numpy", "onnxruntime"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
)
rm -rf "$WORK/site" "$WORK/wheels"
logged "$WORK/pip.log" "$HOSTPY" -m pip wheel -q --no-deps -w "$WORK/wheels" runtimes/python
# shellcheck disable=SC2086
logged "$WORK/pip.log" "$HOSTPY" -m pip install -q --target "$WORK/site" --only-binary=:all: --implementation cp \
    --python-version 3.11 --abi cp311 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 $PINS pytest "$WORK"/wheels/dmruntime-*.whl

# The aarch64 interpreter behind a host shell script, so that sys.executable (and so a test's
# subprocess) starts under qemu too without binfmt_misc.
mkdir -p "$WORK/bin"
cat > "$WORK/bin/python" <<EOF
#!/bin/sh
PYTHONHOME="$WORK/root/usr" PYTHONPATH="$WORK/site" PYTHONDONTWRITEBYTECODE=1 DMRUNTIME_EMULATED="qemu-aarch64 -cpu $CPU" \\
exec "$QEMU" -cpu "$CPU" -L "$WORK/root" -0 "$WORK/bin/python" "$WORK/root/usr/bin/python3.11" "\$@"
EOF
chmod +x "$WORK/bin/python"
PY=$WORK/bin/python
"$PY" -c "import platform, numpy, onnxruntime; print('emulated:', platform.machine(), platform.python_version(), 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
grep -m1 '^Features' <("$PY" -c "print(open('/proc/cpuinfo').read())") | sed "s/^/$CPU /"

step "runtime tests on aarch64 (runtimes/python/tests)"
"$PY" -m pytest -q -p no:cacheprovider --rootdir runtimes/python runtimes/python/tests

if [ "$FAST" = 1 ]; then
    step "done (--fast: digits16 comparison and bench_runtime skipped)"
    exit 0
fi

# --- digits16 bundles built on x86-64, sampled on both sides -------------------------------
[ -x .venv/bin/dmcompile ] || { echo "error: .venv missing: run bash scripts/setup.sh first (or pass --fast)" >&2; exit 2; }
B=$WORK/bundles
mkdir -p "$B"
declare -A RECIPES=(
    [digits16-w8a8]="--format w8a8"
    [digits16-w4]="--format mixed --weight-bits *=4,first_conv=8,last_conv=8"
)
for name in digits16-w8a8 digits16-w4; do
    step "x86-64: dmcompile build digits16 ${RECIPES[$name]} (log: $B/$name.build.log)"
    # shellcheck disable=SC2086
    .venv/bin/dmcompile build digits16 ${RECIPES[$name]} --eval-samples 0 -o "$B/$name" >"$B/$name.build.log" 2>&1 \
        || { tail -20 "$B/$name.build.log"; exit 1; }
done
FP=$(.venv/bin/python -c "from dmcompile import api; print(api.fp_bundle('digits16'))" 2>/dev/null | tail -1)
step "sample $N digits (50 DDIM steps, seed 0) and one call at 10 timesteps: fp32 export and both bundles on x86-64"
.venv/bin/python scripts/arm64_compare.py run "$FP" "$B/fp32.x86_64.npz" -n "$N"
for name in digits16-w8a8 digits16-w4; do
    .venv/bin/python scripts/arm64_compare.py run "$B/$name" "$B/$name.x86_64.npz" -n "$N"
done
step "the same on aarch64, both bundles at once"
PIDS=()
for name in digits16-w8a8 digits16-w4; do
    "$PY" scripts/arm64_compare.py run "$B/$name" "$B/$name.aarch64.npz" -n "$N" &
    PIDS+=($!)
done
for pid in "${PIDS[@]}"; do wait "$pid"; done
.venv/bin/python scripts/arm64_compare.py compare --fp "$B/fp32.x86_64.npz" \
    --x86 "$B/digits16-w8a8.x86_64.npz" "$B/digits16-w4.x86_64.npz" \
    --arm "$B/digits16-w8a8.aarch64.npz" "$B/digits16-w4.aarch64.npz" || STATUS=1

step "benchmarks/bench_runtime.py under emulation"
"$PY" benchmarks/bench_runtime.py "$B/digits16-w8a8" --compare "$B/digits16-w4" --batch 1 --steps 10 --repeats 3 --runs 1
[ "${STATUS:-0}" = 0 ] && step "done: all checks passed" || step "done: the aarch64 samples are further from fp32 than x86-64's (see FAIL above)"
exit "${STATUS:-0}"
