#!/usr/bin/python3
"""bench_cluster.py BUILD - pipeline schedules on a real local cluster.

Part 1: a local cluster of 8 sim workers (duplexctl local up --backend sim).
For each schedule the same job (pp 8, ep 1, dp 1, 16 micro-batches, sim
costs F=10 B=20 W=10 FB=30 ms) runs STEPS steps. Measured step time = median
over steps 2.. of the slowest rank's step_ms (metrics table of duplexd's
database); simulated = duplexd's simulator for the same costs
(`duplexctl status JOB --json` -> bubble.simulated_step_ms). Targets: each
measured/simulated within 5%, and the DualPipe/1F1B ratio within 5% of the
simulator's ratio.

Part 2: a local cluster of 8 cpu workers runs examples/demo.json for
CPU_STEPS steps; per rank and step, overhead = step_ms - compute_ms -
wait_ms - sync_ms (the runtime's own time: executor walk, data-plane sends
and copies; the four times are disjoint: waits inside the gradient sums
count in sync_ms only). Informational: median of overhead / step_ms.

Both clusters are stopped at the end, also on failure. Numbers go in
docs/BENCHMARKS.md.
"""
import json
import os
import sqlite3
import statistics
import sys

from localcluster import LocalCluster

SCHEDULES = ["1f1b", "dualpipe", "zb1p", "dualpipev"]
STEPS = 12
CPU_STEPS = 20
WORKERS = 8
SIM_COSTS = {"f": 10, "b": 20, "w": 10, "fb": 30}
TARGET = 0.05
JOB_TIMEOUT_S = 120


class Cluster(LocalCluster):
    def __init__(self, build, backend):
        super().__init__(build, backend, WORKERS, "bench_cluster")

    def job(self, spec, sets=()):
        path = os.path.join(self.dir, "%s.json" % spec["name"])
        with open(path, "w") as f:
            json.dump(spec, f)
        args = ["submit", path, "--json", "--wait"]
        for s in sets:
            args += ["--set", s]
        out = self.run(*args, timeout=JOB_TIMEOUT_S)
        job_id = json.loads(out.splitlines()[0])["job_id"]
        status = json.loads(self.run("status", str(job_id), "--json"))
        if status.get("state") != "succeeded":
            raise RuntimeError("job %d: %s (%s)" % (job_id, status.get("state"),
                                                     status.get("reason")))
        return job_id, status

    def metrics(self, job_id):
        db = sqlite3.connect("file:%s/duplex.db?mode=ro" % self.dir, uri=True, timeout=10)
        try:
            return db.execute("SELECT step, worker_id, step_ms, compute_ms, wait_ms, sync_ms "
                              "FROM metrics WHERE job_id = ? ORDER BY step", (job_id,)).fetchall()
        finally:
            db.close()


def sim_spec(schedule):
    return {
        "name": "bench-%s" % schedule,
        "backend": "sim",
        "model": {"layers": 16},
        "parallel": {"schedule": schedule, "pp": WORKERS, "ep": 1, "dp": 1, "microbatches": 16},
        "train": {"steps": STEPS},
        "checkpoint": {"every": 0},
        "sim": SIM_COSTS,
    }


def step_time(rows):
    """Median over steps 2.. of the slowest rank's step_ms."""
    per_step = {}
    for step, _, step_ms, *_ in rows:
        per_step[step] = max(per_step.get(step, 0.0), step_ms)
    steps = sorted(per_step)
    return statistics.median(per_step[s] for s in steps[1:]), len(steps)


def within(x, target=TARGET):
    return "met" if abs(x - 1.0) <= target else "MISSED"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench_cluster.py BUILD")
    build = sys.argv[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}

    print("sim cluster: %d workers, pp %d, 16 micro-batches, costs F=%g B=%g W=%g FB=%g ms, "
          "%d steps (step 1 skipped)" % (WORKERS, WORKERS, SIM_COSTS["f"], SIM_COSTS["b"],
                                         SIM_COSTS["w"], SIM_COSTS["fb"], STEPS))
    with Cluster(build, "sim") as c:
        for sched in SCHEDULES:
            job_id, status = c.job(sim_spec(sched))
            measured, nsteps = step_time(c.metrics(job_id))
            simulated = status["bubble"]["simulated_step_ms"]
            results[sched] = (measured, simulated)
            print("  %-10s job %d: %d steps, measured %.1f ms, simulated %.1f ms" %
                  (sched, job_id, nsteps, measured, simulated), flush=True)

    demo = os.path.join(repo, "examples", "demo.json")
    with open(demo) as f:
        spec = json.load(f)
    spec["train"]["steps"] = CPU_STEPS
    spec["checkpoint"]["every"] = 0
    print("cpu cluster: %d workers, examples/demo.json, %d steps" % (WORKERS, CPU_STEPS),
          flush=True)
    with Cluster(build, "cpu") as c:
        job_id, _ = c.job(spec)
        rows = c.metrics(job_id)
    overhead = []
    for step, _, step_ms, compute_ms, wait_ms, sync_ms in rows:
        if step <= 1 or step_ms <= 0:
            continue
        overhead.append((step_ms - compute_ms - wait_ms - sync_ms) / step_ms)
    cpu_step = step_time(rows)[0]

    print()
    print("%-10s %12s %13s %10s  %s" % ("schedule", "measured_ms", "simulated_ms",
                                          "meas/sim", "target +-5%"))
    for sched in SCHEDULES:
        m, s = results[sched]
        print("%-10s %12.1f %13.1f %10.4f  %s" % (sched, m, s, m / s, within(m / s)))
    (m_dp, s_dp), (m_1f, s_1f) = results["dualpipe"], results["1f1b"]
    ratio_m, ratio_s = m_dp / m_1f, s_dp / s_1f
    print("dualpipe/1f1b step time: measured %.4f, simulated %.4f, measured/simulated %.4f: %s" %
          (ratio_m, ratio_s, ratio_m / ratio_s, within(ratio_m / ratio_s)))
    print("cpu demo (pp 4 x ep 2): step %.1f ms, %d rank-steps; runtime overhead outside "
          "compute and waits (includes data-plane sends and copies), median of x / step_ms:" %
          (cpu_step, len(overhead)))
    print("  step - compute - wait - sync: %.2f%%" % (100 * statistics.median(overhead)))


if __name__ == "__main__":
    main()
