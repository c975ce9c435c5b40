"""Faults around jobs (issue 15): a network cut longer than dead-after.

The cut is a worker stopped with SIGSTOP for 6 s (dead-after 2 s): duplexd
declares it lost and the job recovers while the worker, once continued, is
still running attempt 1. With exactly as many workers as the job needs, the
next attempt needs that very worker: it must be told to stop its old
attempt when it is back (AbortJob), the next attempt must wait until it
confirmed, and nobody may be blamed for being busy with what duplexd gave
up. The job must end bitwise equal to a run that never failed, with the
same losses, and no worker blocklisted.

(Durations are measured on the monotonic clock: a wall-clock step is
covered by tests/unit/test_jobs.c, Suite clock, since stepping the clock
of the machine running the tests is not an option.)"""

import signal
import time

from test_recovery import (events, final_shards, finished, job_workers, start, status,
                           submit, wait_for)

CUT_S = 6.0


def losses(st):
    return [(e["step"], e["loss"]) for e in st["losses"]]


def test_a_network_cut_blocklists_nobody_and_the_result_is_bitwise_the_same(cluster, tmp_path):
    c = cluster
    start(c, 8, dead_after_ms=2000)  # exactly the job's 8 ranks: no spare
    ref = finished(c, submit(c, tmp_path, "reference"))
    jid = submit(c, tmp_path, "cut")
    wait_for(c, jid, lambda s: s["state"] == "running" and s["step"] >= 8, "step 8")
    victim = job_workers(c, jid)[3]["id"]
    proc = c.worker_procs[victim].proc
    proc.send_signal(signal.SIGSTOP)
    cut = time.monotonic()
    try:
        c.poll_until(lambda: c.workers()[victim]["state"] == "lost", timeout=CUT_S,
                     what=f"{victim} lost")
        wait_for(c, jid, lambda s: s["state"] == "recovering", "recovering")
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut)))
    finally:
        proc.send_signal(signal.SIGCONT)
    st = finished(c, jid)
    assert st["attempt"] >= 2, st
    assert final_shards(st) == final_shards(ref)
    assert losses(st) == losses(ref)
    workers = c.workers()
    blocked = {w: info["blocklisted"] for w, info in workers.items() if info.get("blocklisted")}
    assert not blocked, (blocked, c.ctl("events", jid).stdout)
    assert not events(c, 0, "blocklisted")
    # the worker that was cut off was told to stop attempt 1 once back
    assert "aborted: duplexd gave up attempt 1 of job" in c.worker_procs[victim].log_text() or \
        any(e["worker_id"] == victim for e in events(c, jid, "rank_abandoned")), \
        c.worker_procs[victim].log_tail()
    # it was never blamed for being busy with attempt 1
    for e in events(c, jid, "job_recovering") + events(c, jid, "job_failure"):
        assert "refused its assignment: busy" not in e["detail"], e
    assert status(c, jid)["state"] == "succeeded"
