#!/usr/bin/python3
"""bench_recovery.py BUILD - how fast duplexd recovers a job from a killed worker.

A local cluster of 9 cpu workers (duplexctl local up --backend cpu): 8 for
one job like examples/dualpipe.json (pp 4 x ep 2) with STEPS steps,
checkpoint.every 4, restart.backoff_ms 1000 (the default) and enough
restart.max_restarts, plus 1 spare. REPS times: wait until the job has run
a few steps on its current attempt, note the wall clock, SIGKILL one of the
job's workers (`duplexctl workers --json`, assigned_job == job), and start a
replacement worker the way `duplexctl local up` does (ctl/local.c: same
program and flags, a new --gpu index, its pid file in DIR/run so `local
down` stops it), so a spare is there for the next kill. From duplexd's event
log (`duplexctl events --json`):

  detection latency     = ts of the "lost" event of the killed worker - kill time
                          (target < 1.5 s)
  failure-to-first-step = ts of the next "job_recovered" event - kill time
                          (target < 5 s plus the checkpoint load; includes the
                          backoff)
  steps lost            = from the "job_recovered" detail

plus the stages in between (lost -> job_recovering -> job_placing ->
job_recovered). Prints medians, all samples and verdicts. The cluster is
stopped at the end, also on failure. Numbers go in docs/BENCHMARKS.md.
"""
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time

from localcluster import LocalCluster

WORKERS = 9            # 8 for the job + 1 spare
JOB_WORKERS = 8
STEPS = 400
CKPT_EVERY = 4
BACKOFF_MS = 1000      # the spec default, set explicitly
MAX_RESTARTS = 50
REPS = 5
STEPS_BEFORE_KILL = 6  # steps of the current attempt before each kill
DETECT_TARGET_S = 1.5
RECOVER_TARGET_S = 5.0
REP_TIMEOUT_S = 40
TOTAL_BUDGET_S = 170


class Cluster(LocalCluster):
    def __init__(self, build):
        super().__init__(build, "cpu", WORKERS, "bench_recovery")
        self.next_gpu = WORKERS

    def start_worker(self):
        """One more cpu worker, as ctl/local.c starts them (detached, output
        to DIR/logs/worker-K.log, pid in DIR/run/worker-K.pid)."""
        k = self.next_gpu
        self.next_gpu += 1
        name = "worker-%d" % k
        log = open(os.path.join(self.dir, "logs", name + ".log"), "ab")
        try:
            # the key local up gives its workers, and duplexd's public key
            p = subprocess.Popen([os.path.join(self.bindir, "duplex-worker"),
                                  "--coordinator", self.addr, "--backend", "cpu",
                                  "--gpu", str(k), "--node", socket.gethostname(),
                                  "--key", os.path.join(self.dir, "keys", "workers.key_secret"),
                                  "--server-key", self.env["DUPLEX_SERVER_KEY"]],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 cwd=self.dir, env=self.env, start_new_session=True)
        finally:
            log.close()
        pidfile = os.path.join(self.dir, "run", name + ".pid")
        with open(pidfile + ".tmp", "w") as f:
            f.write("%d\n" % p.pid)
        os.rename(pidfile + ".tmp", pidfile)
        self.children = getattr(self, "children", []) + [p]
        return p.pid


def job_spec(repo, ckpt_dir):
    with open(os.path.join(repo, "examples", "dualpipe.json")) as f:
        spec = json.load(f)
    spec["name"] = "bench-recovery"
    spec["train"]["steps"] = STEPS
    spec["checkpoint"] = {"every": CKPT_EVERY, "dir": ckpt_dir}
    spec["restart"] = {"max_restarts": MAX_RESTARTS, "backoff_ms": BACKOFF_MS}
    return spec


def wait_for(cond, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise RuntimeError("timed out after %d s waiting for %s" % (timeout, what))
        time.sleep(interval)


def alive_count(c):
    return sum(w.get("state") == "alive" for w in c.workers())


def one_rep(c, job_id, rep, rng):
    # the job runs (again) and has done some steps on this attempt
    base = {}

    def running_some():
        st = c.status(job_id)
        if st.get("state") in ("failed", "succeeded", "cancelled"):
            raise RuntimeError("job %d ended: %s (%s)" % (job_id, st.get("state"),
                                                          st.get("reason")))
        if st.get("state") != "running":
            base.pop("step", None)
            return False
        base.setdefault("step", st.get("step", 0))
        return st.get("step", 0) >= base["step"] + STEPS_BEFORE_KILL and st
    st = wait_for(running_some, REP_TIMEOUT_S, "job %d to run %d steps" %
                  (job_id, STEPS_BEFORE_KILL))
    # a spare must be there for the restart: all WORKERS alive
    wait_for(lambda: alive_count(c) >= WORKERS, REP_TIMEOUT_S, "%d alive workers" % WORKERS)
    mine = [w for w in c.workers()
            if w.get("assigned_job") == job_id and w.get("state") == "alive" and w.get("pid")]
    if len(mine) != JOB_WORKERS:
        raise RuntimeError("job %d has %d workers, expected %d" % (job_id, len(mine), JOB_WORKERS))
    victim = rng.choice(mine)
    last_id = max((e["id"] for e in c.events()), default=0)
    with open("/proc/%d/comm" % victim["pid"]) as f:
        if "duplex" not in f.read():
            raise RuntimeError("pid %d of worker %s is not a duplex worker" %
                               (victim["pid"], victim["id"]))
    kill_ms = time.time() * 1000.0
    os.kill(victim["pid"], 9)
    step_at_kill = st.get("step", 0)
    c.start_worker()  # the replacement: the next spare

    found = {}

    def recovered():
        for e in c.events():
            if e["id"] <= last_id:
                continue
            if e["kind"] == "lost" and e.get("worker_id") == victim["id"] and "lost" not in found:
                found["lost"] = e
            if e.get("job_id") == job_id and e["kind"] in ("job_recovering", "job_placing",
                                                          "job_recovered"):
                found.setdefault(e["kind"], e)
            if e.get("job_id") == job_id and e["kind"] in ("job_failed", "failed"):
                raise RuntimeError("job %d failed: %s" % (job_id, e.get("detail")))
        return "lost" in found and "job_recovered" in found
    wait_for(recovered, REP_TIMEOUT_S, "job %d to recover" % job_id, interval=0.2)
    rec = found["job_recovered"]
    m = re.search(r"(\d+) steps lost", rec.get("detail") or "")
    r = {
        "worker": victim["id"],
        "step": step_at_kill,
        "detect_s": (found["lost"]["ts_ms"] - kill_ms) / 1e3,
        "recover_s": (rec["ts_ms"] - kill_ms) / 1e3,
        "steps_lost": int(m.group(1)) if m else None,
        "lost_detail": found["lost"].get("detail"),
        "rec_detail": rec.get("detail"),
    }
    t_lost = found["lost"]["ts_ms"]
    for k in ("job_recovering", "job_placing"):
        r[k] = (found[k]["ts_ms"] - t_lost) / 1e3 if k in found else None
    r["placing_to_step"] = ((rec["ts_ms"] - found["job_placing"]["ts_ms"]) / 1e3
                            if "job_placing" in found else None)
    print("  rep %d: killed %s (pid %d) at step ~%d: lost after %.3f s, first step after "
          "%.3f s, %s steps lost" % (rep, victim["id"], victim["pid"], step_at_kill,
                                     r["detect_s"], r["recover_s"], r["steps_lost"]), flush=True)
    print("         lost: %s" % r["lost_detail"])
    print("         job_recovered: %s" % r["rec_detail"], flush=True)
    return r


def fmt(v):
    return "-" if v is None else "%.3f" % v


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench_recovery.py BUILD")
    build = sys.argv[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rng = random.Random(1)
    t0 = time.monotonic()
    results = []
    print("cpu cluster: %d workers (%d for the job + 1 spare), examples/dualpipe.json "
          "(pp 4 x ep 2), %d steps, checkpoint.every %d, restart.backoff_ms %d, "
          "restart.max_restarts %d, duplexd heartbeat default (500 ms); %d kills" %
          (WORKERS, JOB_WORKERS, STEPS, CKPT_EVERY, BACKOFF_MS, MAX_RESTARTS, REPS), flush=True)
    with Cluster(build) as c:
        spec = job_spec(repo, os.path.join(c.dir, "checkpoints"))
        path = os.path.join(c.dir, "bench-recovery.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        out = c.run("submit", path)
        m = re.search(r"job (\d+) submitted", out)
        if not m:
            raise RuntimeError("submit said: %s" % out)
        job_id = int(m.group(1))
        for rep in range(1, REPS + 1):
            if time.monotonic() - t0 > TOTAL_BUDGET_S:
                print("  time budget (%d s) spent; stopping after %d kills" %
                      (TOTAL_BUDGET_S, rep - 1))
                break
            results.append(one_rep(c, job_id, rep, rng))
        st = c.status(job_id)
        print("  job %d after the kills: %s at step %s" % (job_id, st.get("state"),
                                                           st.get("step")))
        try:
            c.run("cancel", str(job_id))
        except Exception as e:
            print("bench_recovery: cancel: %s" % e, file=sys.stderr)
    if not results:
        sys.exit("bench_recovery: no samples")

    print()
    print("%-4s %-22s %6s %9s %11s %11s %11s %10s %6s" %
          ("rep", "worker", "step", "detect_s", "lost->recov", "lost->place",
           "place->step", "recover_s", "lost"))
    for i, r in enumerate(results, 1):
        print("%-4d %-22s %6d %9.3f %11s %11s %11s %10.3f %6s" %
              (i, r["worker"], r["step"], r["detect_s"], fmt(r["job_recovering"]),
               fmt(r["job_placing"]), fmt(r["placing_to_step"]), r["recover_s"],
               r["steps_lost"]))
    det = [r["detect_s"] for r in results]
    rec = [r["recover_s"] for r in results]
    lost = [r["steps_lost"] for r in results if r["steps_lost"] is not None]
    med_det, med_rec = statistics.median(det), statistics.median(rec)
    print("detection latency (kill -> lost event): median %.3f s, samples %s" %
          (med_det, ", ".join("%.3f" % x for x in det)))
    print("failure to first step (kill -> job_recovered): median %.3f s, samples %s "
          "(includes restart.backoff_ms %d)" %
          (med_rec, ", ".join("%.3f" % x for x in rec), BACKOFF_MS))
    if lost:
        print("steps lost: median %g, samples %s (checkpoint.every %d)" %
              (statistics.median(lost), ", ".join(str(x) for x in lost), CKPT_EVERY))
    print("detection: median %.3f s, max %.3f s, target < %.1f s: %s" %
          (med_det, max(det), DETECT_TARGET_S,
           "met" if max(det) < DETECT_TARGET_S else
           ("met at the median, MISSED by the max" if med_det < DETECT_TARGET_S else "MISSED")))
    print("failure to first step: median %.3f s, max %.3f s, target < %.1f s + checkpoint load: %s" %
          (med_rec, max(rec), RECOVER_TARGET_S,
           "met" if max(rec) < RECOVER_TARGET_S else
           ("met at the median, MISSED by the max" if med_rec < RECOVER_TARGET_S else "MISSED")))
    print("total %.1f s" % (time.monotonic() - t0))


if __name__ == "__main__":
    main()
