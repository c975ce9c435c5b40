#!/bin/sh
# run.sh - the GPU host's one command, from the bundle `make bundle` builds
# (bin/, lib/, examples/ next to this script): no network, none of the
# project's Debian libraries, only glibc and the NVIDIA driver. Runs
# duplex-gpucheck (every kernel against its CPU reference, pack / combine
# against a device copy) under a time limit, then prints a table of the
# steps last. Exit 0 only when every step passed; 2 when the GPU stack is
# missing.
#
#   tar xzf bundle.tar.gz && bundle/run.sh [duplex-gpucheck options]
#
# RUN_LIMIT_S (default 270) bounds each step; GPUCHECK_ARGS or the
# arguments go to duplex-gpucheck (--seed N, --small, --iters N, --device N).
here=$(cd "$(dirname "$0")" && pwd) || exit 2
limit=${RUN_LIMIT_S:-270}
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH

steps=""
worst=0

# step NAME COMMAND...: runs it under the limit, records rc and seconds
step() {
    name=$1
    shift
    echo "== $name: $*"
    t0=$(date +%s)
    if command -v timeout >/dev/null 2>&1; then
        timeout "$limit" "$@"
    else
        "$@"
    fi
    rc=$?
    t1=$(date +%s)
    case $rc in
    0) res=PASS ;;
    2) res="FAIL (no GPU stack)" ;;
    124) res="FAIL (over ${limit}s)" ;;
    *) res="FAIL (exit $rc)" ;;
    esac
    steps="$steps$(printf '%-16s %-24s %6ss' "$name" "$res" "$((t1 - t0))")
"
    if [ "$rc" -ne 0 ] && { [ "$worst" -eq 0 ] || [ "$rc" -eq 2 ]; }; then
        worst=$rc
    fi
}

# every bundled program must resolve its libraries here
unresolved=""
if command -v ldd >/dev/null 2>&1; then
    unresolved=$(for b in "$here"/bin/*; do
        ldd "$b" 2>&1 | sed -n "s|^\t*\(.*=> not found\)|$(basename "$b"): \1|p"
    done)
fi
if [ -n "$unresolved" ]; then
    echo "run.sh: libraries missing on this host:"
    echo "$unresolved"
    steps="$(printf '%-16s %-24s %6s' libraries "FAIL (unresolved)" -)
"
    worst=1
fi

echo "run.sh: $(uname -n), $(date -u '+%Y-%m-%d %H:%M:%S UTC'), bundle $here"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi

# shellcheck disable=SC2086 # GPUCHECK_ARGS is a list of options
step gpucheck "$here/bin/duplex-gpucheck" ${GPUCHECK_ARGS:-} "$@"

echo
printf '%-16s %-24s %7s\n' step result time
printf '%s' "$steps"
if [ "$worst" -eq 124 ]; then
    worst=1
fi
exit "$worst"
