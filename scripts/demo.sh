#!/bin/sh
# demo.sh - what `make run` does: a local cluster of 8 cpu workers trains
# examples/demo.json (DualPipe, pp 4 x ep 2) while `duplexctl status --watch`
# follows it, then the trained model (from the job's last checkpoint)
# continues a prompt, and the cluster stops.
#
# usage: scripts/demo.sh BUILD_DIR
set -eu

BIN=${1:-build}/bin
DIR=var/local
SPEC=examples/demo.json
PY=/usr/bin/python3

"$BIN/duplexctl" local up --workers 8 --backend cpu --dir "$DIR"
trap '"$BIN/duplexctl" local down --dir "$DIR"' EXIT INT TERM
"$BIN/duplexctl" workers

job=$("$BIN/duplexctl" submit "$SPEC" | awk '/submitted/ { print $2 }')
echo "job $job submitted; following it (duplexctl status $job --watch):"
"$BIN/duplexctl" status "$job" --watch

ckpt=$("$BIN/duplexctl" status "$job" --json |
       $PY -c 'import json, sys; c = json.load(sys.stdin)["checkpoint"]; print(c["dir"] if c else "")')
if [ -z "$ckpt" ]; then
    echo "demo: job $job left no checkpoint to sample from" >&2
    exit 1
fi
echo
echo "text from the trained model (checkpoint $ckpt):"
echo "----"
"$BIN/duplex-worker" --standalone "$SPEC" --from "$ckpt" --generate 240 \
    --prompt "This program is free software; you can "
echo "----"
