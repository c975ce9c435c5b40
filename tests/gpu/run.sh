#!/bin/sh
# run.sh - the GPU host's one command, from the bundle `make bundle` builds
# (bin/, lib/, examples/ next to this script): no network, none of the
# project's Debian libraries, only glibc and the NVIDIA driver. Runs
# duplex-gpucheck (every kernel against its CPU reference, the libraries,
# the transport, the benchmarks) and train_check.py (a cuda training job
# against the CPU trainer) under a time limit, then prints a table of the
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

# NCCL and cuBLASLt are opened at run time (dlopen), not bundled (hundreds of
# MiB): take the host's, from the loader's path, a CUDA toolkit or the
# nvidia-* Python wheels (PyTorch's environment has both). NCCL_LIB /
# CUBLASLT_LIB override.
find_lib() {
    for d in /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib \
        /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/lib/python3/dist-packages/nvidia/*/lib; do
        for f in "$d"/$1; do
            if [ -e "$f" ]; then
                echo "$f"
                return 0
            fi
        done
    done
    return 1
}
nccl=${NCCL_LIB:-$(find_lib 'libnccl.so.2' || true)}
cublaslt=${CUBLASLT_LIB:-$(find_lib 'libcublasLt.so.1[0-9]' || find_lib 'libcublasLt.so' || true)}
libs=""
if [ -n "$nccl" ]; then libs="--nccl-lib $nccl"; else echo "run.sh: no libnccl.so.2 found (NCCL_LIB=...)"; fi
if [ -n "$cublaslt" ]; then libs="$libs --cublaslt-lib $cublaslt"; else echo "run.sh: no libcublasLt found (CUBLASLT_LIB=...)"; fi
echo "run.sh: NCCL ${nccl:-missing}, cuBLASLt ${cublaslt:-missing}"

# shellcheck disable=SC2086 # GPUCHECK_ARGS and libs are lists of options
step gpucheck "$here/bin/duplex-gpucheck" $libs ${GPUCHECK_ARGS:-} "$@"

# a short cuda training job (4 workers on GPU 0) against the CPU trainer
py=$(command -v python3 || true)
if [ -n "$py" ]; then
    # shellcheck disable=SC2086
    step train "$py" "$here/train_check.py" "$here/bin" $libs
else
    echo "run.sh: no python3 on this host: the training check is skipped"
    steps="$steps$(printf '%-16s %-24s %6s' train "SKIP (no python3)" -)
"
fi

echo
printf '%-16s %-24s %7s\n' step result time
printf '%s' "$steps"
if [ "$worst" -eq 124 ]; then
    worst=1
fi
exit "$worst"
