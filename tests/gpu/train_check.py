#!/usr/bin/env python3
"""train_check.py - the GPU host's training check (run by tests/gpu/run.sh
from the bundle): a one-machine cluster of duplexd and 4 workers with
--backend cuda on GPU 0 trains the parity job (DualPipe, 8 micro-batches,
20 steps, fp32) three times, as pp 4 x ep 1, as pp 2 x ep 2, and as pp 2
x ep 2 with the fp8 dispatch (e4m3 records), and each job's per-step
losses are compared with the single-process CPU trainer's on the same
spec (`duplex-worker --standalone`): the issue's bound is 1e-4 relative.
With the 4 ranks on one GPU NCCL is not used: the pipeline messages and
the expert rows go through the IPC transport, the step-end sums through
the hosts. Standard library only. Prints one line per job:

    train_check: PASS pp 4 x ep 1: 20 steps, max rel 3.1e-06 (<= 1e-04), loss 5.55 -> 4.91, 12.3 s

and exits 0 on a pass, 1 on a failure (with the daemons' log tails), 2 when
the cluster cannot be started.

    train_check.py BIN_DIR [--nccl-lib PATH] [--cublaslt-lib PATH] [--cuda-lib PATH]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BOUND = 1e-4
STEPS = 20
WORKERS = 4
SPEC = {
    "name": "gpu-parity", "backend": "cuda",
    "model": {"vocab": 256, "d_model": 32, "layers": 8, "heads": 2, "experts": 4,
              "top_k": 2, "expert_hidden": 32, "shared_experts": 1, "seq_len": 32,
              "expert_groups": 2, "group_limit": 2},
    "parallel": {"schedule": "dualpipe", "pp": 4, "ep": 1, "dp": 1, "microbatches": 8,
                 "microbatch_size": 2},
    "train": {"steps": STEPS, "lr": 0.001, "seed": 3},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--nccl-lib")
    ap.add_argument("--cublaslt-lib")
    ap.add_argument("--cuda-lib")
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args()
    bin_dir = os.path.abspath(args.bin_dir)
    binp = lambda name: os.path.join(bin_dir, name)  # noqa: E731
    work = tempfile.mkdtemp(prefix="duplex-train-check-")
    addr = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, DUPLEX_COORDINATOR=addr)
    libs = []
    for flag in ("cuda_lib", "nccl_lib", "cublaslt_lib"):
        if getattr(args, flag):
            libs += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    procs, logs = [], []
    t0 = time.time()

    def spawn(name, argv):
        log = os.path.join(work, name + ".log")
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=work,
                                          env=env, start_new_session=True))

    def ctl(*a, key="operator"):
        keys = {"DUPLEX_KEY": os.path.join(work, "keys", f"{key}.key_secret")}
        return subprocess.run([binp("duplexctl"), *a], capture_output=True, text=True,
                              env=dict(env, **keys), timeout=30)

    def make_keys():
        """CURVE keys as a real cluster has them: duplexd's, an operator's,
        and one the workers share; the allow-list names the last two."""
        keys = os.path.join(work, "keys")
        lines = []
        for name, role, extra in (("duplexd", "server", []), ("operator", "operator", []),
                                  ("workers", "worker", ["--ids", "*"])):
            out = ctl("keys", "gen", "--role", role, "--name", name, "--out", keys, *extra)
            if out.returncode != 0:
                raise RuntimeError("duplexctl keys gen: " + out.stderr)
            lines.append(out.stdout)
        with open(os.path.join(keys, "authorized"), "w") as f:
            f.write("".join(lines))
        env.update(DUPLEX_KEY=os.path.join(keys, "workers.key_secret"),
                   DUPLEX_SERVER_KEY=os.path.join(keys, "duplexd.key"))
        return ["--key", os.path.join(keys, "duplexd.key_secret"), "--authorized",
                os.path.join(keys, "authorized")]

    def fail(code, why):
        print(f"train_check: FAIL {why}")
        for log in logs:
            print(f"--- {os.path.basename(log)}\n{tail(log)}")
        return code

    def run_job(what, spec_path):
        """One job against the standalone run: 0, or fail()'s code."""
        t1 = time.time()
        ref = subprocess.run([binp("duplex-worker"), "--standalone", spec_path, "--json"],
                             capture_output=True, text=True, timeout=args.timeout)
        if ref.returncode != 0:
            return fail(1, f"{what}: the standalone run failed: " + ref.stderr[-500:])
        reference = [json.loads(line)["loss"] for line in ref.stdout.splitlines()]
        sub = ctl("submit", spec_path)
        if sub.returncode != 0:
            return fail(1, f"{what}: submit: " + sub.stdout + sub.stderr)
        jid = sub.stdout.split()[1]
        deadline = time.time() + args.timeout
        while True:
            st = ctl("status", jid, "--json")
            status = json.loads(st.stdout) if st.returncode == 0 else {}
            if status.get("state") not in (None, "queued", "placing", "running"):
                break
            if time.time() > deadline:
                return fail(1, f"{what}: job {jid} still {status.get('state')} after "
                               f"{args.timeout} s")
            time.sleep(0.5)
        if status.get("state") != "succeeded":
            events = ctl("events", jid).stdout
            return fail(1, f"{what}: job {jid} {status.get('state')}: {events[-800:]}")
        losses = [e["loss"] for e in status["losses"]]
        if len(losses) != len(reference):
            return fail(1, f"{what}: {len(losses)} losses, the reference has {len(reference)}")
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        line = (f"{what}: {len(losses)} steps, max rel {worst:.2g} (<= {BOUND:.0e}), loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f}, {time.time() - t1:.1f} s")
        if worst > BOUND:
            return fail(1, line)
        print(f"train_check: PASS {line}")
        return 0

    try:
        keys = make_keys()
        spawn("duplexd", [binp("duplexd"), "--listen", addr, "--db",
                          os.path.join(work, "duplex.db"), *keys,
                          *(["--nccl-lib", args.nccl_lib] if args.nccl_lib else [])])
        for i in range(WORKERS):
            spawn(f"worker-{i}", [binp("duplex-worker"), "--backend", "cuda", "--gpu", "0",
                                  "--id", f"gpu0-{i}", "--node", "node0", *libs])
        deadline = time.time() + 60
        while True:
            out = ctl("workers", "--json")
            if out.returncode == 0 and \
                    sum(w.get("state") == "alive"
                        for w in json.loads(out.stdout)["workers"]) == WORKERS:
                break
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                return fail(2, "the cluster did not come up")
            time.sleep(0.2)
        for pp, ep, dispatch in ((4, 1, "fp32"), (2, 2, "fp32"), (2, 2, "fp8")):
            spec = json.loads(json.dumps(SPEC))
            spec["name"] = f"gpu-parity-pp{pp}-ep{ep}-{dispatch}"
            spec["parallel"].update(pp=pp, ep=ep)
            spec["train"]["dispatch"] = dispatch
            spec_path = os.path.join(work, spec["name"] + ".json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            code = run_job(f"pp {pp} x ep {ep}" + (", fp8 dispatch" if dispatch == "fp8" else ""),
                           spec_path)
            if code:
                return code
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
