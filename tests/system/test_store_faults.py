"""The database's disk fills while duplexd runs (issue 15, "Fail-stop store").

A full disk is made without root: duplexd's RLIMIT_FSIZE is lowered to 0
while it runs (prlimit), so every write to its database files fails (EFBIG;
duplexd ignores SIGXFSZ, so the write returns the error instead of killing
it). duplexd's output goes through a pipe, which the limit does not touch,
so its log keeps the cause.

What must hold: duplexd logs the real cause (not "cannot rollback"), answers
nothing as accepted, exits with its own status (74) for systemd to restart it
(Restart=on-failure), and the restarted duplexd, with room again, has every
acknowledged record and nothing else: a refused job is not there and never
runs, a job that succeeded does not run again, a running job goes on.
"""

import json
import re
import resource
import signal
import subprocess
import threading
import time

from conftest import DEADLINE, Daemon, describe, sanitized

EXIT_STORE_FAILED = 74  # COORD_STORE_EXIT_FAILED (coordinator/store.h)

JOB = {"name": "first", "backend": "sim", "model": {"layers": 4, "experts": 8},
       "train": {"steps": 3},
       "parallel": {"schedule": "dualpipe", "pp": 2, "ep": 1, "microbatches": 4},
       "sim": {"f": 1, "b": 2, "w": 1, "fb": 3}}


class PipedDaemon(Daemon):
    """A Daemon whose output reaches its log file through a pipe (a file
    size limit on the process does not apply to pipes)."""

    def start(self):
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the pump
        log.write(f"=== {' '.join(self.argv)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.cwd, env=self.env, start_new_session=True)

        def pump():
            with log:
                for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
                    log.write(chunk)
                    log.flush()
        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        return self

    def wait(self, timeout=DEADLINE):
        rc = super().wait(timeout)
        self.pump.join(timeout=DEADLINE)
        return rc


def start_duplexd(c):
    """Start (or restart) duplexd with its log through a pipe; wait until it
    answers."""
    n = sum(1 for d in c.daemons if d.name == "duplexd")
    log = c.log_dir / ("duplexd.log" if n == 0 else f"duplexd.{n + 1}.log")
    d = PipedDaemon("duplexd", c.duplexd_argv("--log-level", "info"), log, cwd=c.root,
                    env=c.env)
    c.daemons.append(d)
    c.duplexd = d.start()
    c.wait_answering()
    return d


def fill_disk(d):
    """From now on every write of duplexd to a file fails (EFBIG)."""
    _, hard = resource.prlimit(d.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (0, hard))


def submit(c, tmp_path, spec, *args):
    path = tmp_path / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    return c.ctl("submit", path, *args)


def jobs(c):
    """{name: (id, state, step, attempt)} from the database."""
    return {r[1]: (r[0], r[2], r[3], r[4])
            for r in c.db_query("SELECT id, name, state, step, attempt FROM jobs")}


def job_events(c, jid):
    return [r[0] for r in c.db_query("SELECT kind FROM events WHERE job_id = ? ORDER BY id",
                                     (jid,))]


def start_workers(c, n=2):
    for gpu in range(n):
        c.start_worker(f"w{gpu}", gpu, wait=False)
    for gpu in range(n):
        c.wait_worker_alive(f"w{gpu}")


def run_first_job(c, tmp_path):
    """A job run to success (acknowledged, committed) before the disk fills."""
    result = submit(c, tmp_path, JOB, "--wait")
    assert result.returncode == 0 and "succeeded" in result.stdout, describe(result)
    jid = int(result.stdout.split()[1])
    assert jobs(c)["first"][1] == "succeeded"
    return jid


def expect_fail_stop(d):
    """duplexd stops by itself with the store's status and the real cause
    in its log."""
    d.expected_running = False
    rc = d.wait(timeout=DEADLINE * (3 if sanitized() else 1))
    log = d.log_text()
    assert rc == EXIT_STORE_FAILED, f"exit status {rc}\n{d.log_tail()}"
    assert "cannot rollback" not in log, d.log_tail()
    # EFBIG: SQLite's unix VFS calls it a write error, with the errno
    assert re.search(r"disk I/O error \[SQLITE_IOERR_WRITE.*File too large", log), d.log_tail()
    return log


def assert_not_run_again(c, jid, before):
    """The job that succeeded before the fault stays so, placed once."""
    kinds = job_events(c, jid)
    assert kinds == before, (kinds, before)
    assert jobs(c)["first"][1] == "succeeded"


def test_refused_submit_is_not_acknowledged_never_runs_and_duplexd_restarts(
        cluster, tmp_path):
    c = cluster
    c.dead_after_ms = 30000  # the workers are stopped for a while below
    d = start_duplexd(c)
    start_workers(c)
    first = run_first_job(c, tmp_path)
    first_events = job_events(c, first)
    assert first_events == ["job_queued", "job_placing", "job_running", "job_succeeded"]

    # quiet workers (no heartbeats to write), then the disk fills and a job
    # comes: its commit is the one that fails
    workers = [c.worker_procs[w] for w in ("w0", "w1")]
    for w in workers:
        w.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.0)  # heartbeats already sent are committed
        fill_disk(d)
        refused = submit(c, tmp_path, dict(JOB, name="refused"))
        assert refused.returncode != 0, describe(refused)
        out = refused.stdout + refused.stderr
        assert not re.search(r"^job \d+", refused.stdout, re.M), describe(refused)
        assert "disk I/O error" in out and "File too large" in out, describe(refused)
        expect_fail_stop(d)
    finally:
        for w in workers:
            w.proc.send_signal(signal.SIGCONT)

    # only committed state is in the database; the restarted duplexd
    # (systemd's job here) has room again
    assert "refused" not in jobs(c)
    start_duplexd(c)
    for w in ("w0", "w1"):
        c.wait_worker_alive(w)
    time.sleep(2.0)  # a scheduling pass or ten
    assert "refused" not in jobs(c), jobs(c)
    assert_not_run_again(c, first, first_events)
    assert all(w["activity"] == "idle" for w in c.workers_list()), c.workers_list()
    # the refused job had the next id in memory: no worker ever heard of it
    for w in ("w0", "w1"):
        text = c.worker_procs[w].log_text()
        assert not re.search(rf"\bjob {first + 1}\b", text), c.worker_procs[w].log_tail()
    c.ctl("status").check_returncode()


def test_failed_turn_commit_stops_duplexd_and_the_running_job_goes_on(cluster, tmp_path):
    c = cluster
    c.dead_after_ms = 5000
    d = start_duplexd(c)
    start_workers(c)
    first = run_first_job(c, tmp_path)
    first_events = job_events(c, first)

    steps = 60
    long = dict(JOB, name="long", train={"steps": steps},
                sim={"f": 10, "b": 20, "w": 10, "fb": 30})
    result = submit(c, tmp_path, long)
    assert result.returncode == 0, describe(result)
    jid = int(result.stdout.split()[1])
    c.poll_until(lambda: (jobs(c)["long"][1] == "running" and jobs(c)["long"][2] >= 3),
                 timeout=60, what="the long job to run a few steps")

    # the disk fills while reports and heartbeats come: a turn's commit fails
    fill_disk(d)
    expect_fail_stop(d)
    stored = jobs(c)["long"]
    assert stored[1] == "running" and stored[2] < steps, stored

    start_duplexd(c)
    c.poll_until(lambda: jobs(c)["long"][1] in ("succeeded", "failed", "cancelled"),
                 timeout=300 if sanitized() else 90, what="the long job to end",
                 progress=lambda: jobs(c)["long"])
    assert jobs(c)["long"][1:3] == ("succeeded", steps), (jobs(c)["long"],
                                                          job_events(c, jid))
    assert "job_resumed" in job_events(c, jid)
    steps_stored = [r[0] for r in c.db_query(
        "SELECT DISTINCT step FROM metrics WHERE job_id = ? ORDER BY step", (jid,))]
    assert steps_stored[-1] == steps, steps_stored
    assert_not_run_again(c, first, first_events)
