"""Finished jobs leave duplexd's memory (issue 15, "Bounded memory").

Every job ever submitted stayed in duplexd's memory (~7 KB each; 12,000
finished jobs made listing them take 1.1 s of loop time). Now a finished job
(succeeded, failed, cancelled) is forgotten from memory once it has been
finished for --forget-jobs-after-h hours, or when more than --keep-jobs
finished jobs are held; everything about it stays in the database, where
`duplexctl status JOB` and `status --all` (page by page) still find it. A
restarted duplexd does not load finished jobs past retention, and never
reuses their ids.
"""
import json
import sqlite3
import time

from conftest import describe

FAST = {"name": "fast", "backend": "sim", "model": {"layers": 4, "experts": 8},
        "train": {"steps": 3},
        "parallel": {"schedule": "dualpipe", "pp": 2, "ep": 2, "microbatches": 4},
        "sim": {"f": 1, "b": 2, "w": 1, "fb": 3}}


def start(c, *duplexd_args):
    c.start_duplexd(*duplexd_args)
    for gpu, wid in enumerate(("w0", "w1", "w2", "w3")):
        c.start_worker(wid, gpu, wait=False)
    for wid in ("w0", "w1", "w2", "w3"):
        c.wait_worker_alive(wid)


def run_job(c, tmp_path, name, wait=True):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dict(FAST, name=name)))
    result = c.ctl("submit", path, *(["--wait"] if wait else []))
    assert result.returncode == 0, describe(result)
    if wait:
        assert "succeeded" in result.stdout, describe(result)
    return int(result.stdout.split()[1])


def ctl_json(c, *args):
    result = c.ctl(*args, "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def in_memory(c):
    """The ids `status` lists: the jobs duplexd holds in memory."""
    return [j["id"] for j in ctl_json(c, "status")["jobs"]]


def assert_stored_detail(c, jid):
    """`status JOB` of a job no longer in memory: from the database, with
    its state, steps, ranks and per-step figures."""
    doc = ctl_json(c, "status", jid)
    assert doc["id"] == jid and doc["state"] == "succeeded", doc
    assert doc["in_memory"] is False, doc
    assert doc["step"] == 3 and doc["steps"] == 3, doc
    assert doc["name"].startswith("j"), doc
    assert doc["owner"] == "operator", doc
    assert doc["reason"].startswith("all 4 workers finished"), doc
    assert doc["started_ms"] > 0 and doc["finished_ms"] > 0, doc
    assert [e["step"] for e in doc["losses"]] == [1, 2, 3], doc
    assert doc["last_step_ms"] > 0, doc
    assert (doc["pp"], doc["ep"], doc["dp"], doc["schedule"]) == (2, 2, 1, "dualpipe"), doc
    assert doc["attempt"] == 1, doc
    assert sorted(r["worker"] for r in doc["ranks"]) == ["w0", "w1", "w2", "w3"], doc
    assert all(r["done"] for r in doc["ranks"]), doc
    table = c.ctl("status", jid)
    assert table.returncode == 0 and "succeeded" in table.stdout, describe(table)
    return doc


def test_finished_jobs_leave_memory_and_stay_readable(cluster, tmp_path):
    c = cluster
    start(c, "--forget-jobs-after-h", "0")
    ids = [run_job(c, tmp_path, f"j{i}") for i in range(3)]
    c.poll_until(lambda: in_memory(c) == [], what="finished jobs forgotten from memory",
                 progress=lambda: in_memory(c))
    for jid in ids:
        assert_stored_detail(c, jid)
    # every job, stored ones too, page by page
    every = ctl_json(c, "status", "--all")
    assert [j["id"] for j in every["jobs"]] == ids, every
    assert all(j["state"] == "succeeded" and j["step"] == 3 and j["in_memory"] is False
               for j in every["jobs"]), every
    assert every["next_after_id"] == 0, every
    paged = ctl_json(c, "status", "--all", "--page", "1")
    assert paged["jobs"] == every["jobs"], paged
    # at most --limit jobs, and where to go on from
    first = ctl_json(c, "status", "--all", "--limit", "2")
    assert [j["id"] for j in first["jobs"]] == ids[:2] and first["next_after_id"] == ids[1], first
    rest = ctl_json(c, "status", "--all", "--after", first["next_after_id"])
    assert [j["id"] for j in rest["jobs"]] == ids[2:] and rest["next_after_id"] == 0, rest
    table = c.ctl("status", "--all")
    assert table.returncode == 0, describe(table)
    assert sum("succeeded" in line for line in table.stdout.splitlines()) == 3, table.stdout
    # a job in memory is listed with the rest, as status shows it
    slow = dict(FAST, name="slow", train={"steps": 100000})
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    result = c.ctl("submit", tmp_path / "slow.json")
    assert result.returncode == 0, describe(result)
    running = int(result.stdout.split()[1])
    assert running > ids[-1]
    every = ctl_json(c, "status", "--all")
    assert [j["id"] for j in every["jobs"]] == ids + [running], every
    assert every["jobs"][-1]["in_memory"] is True, every
    assert in_memory(c) == [running]
    # an ended job cannot be cancelled, in memory or not
    again = c.ctl("cancel", ids[0])
    assert again.returncode == 1 and "already succeeded" in again.stderr, describe(again)
    assert c.ctl("cancel", running).returncode == 0
    c.poll_until(lambda: in_memory(c) == [], what="the cancelled job forgotten")
    assert ctl_json(c, "status", running)["state"] == "cancelled"
    missing = c.ctl("status", running + 100)
    assert missing.returncode == 1 and f"no job {running + 100}" in missing.stderr, \
        describe(missing)


def test_a_count_cap_keeps_the_latest_finished_jobs(cluster, tmp_path):
    c = cluster
    start(c, "--keep-jobs", "1")
    ids = [run_job(c, tmp_path, f"j{i}") for i in range(3)]
    c.poll_until(lambda: in_memory(c) == ids[-1:], what="only the last finished job kept",
                 progress=lambda: in_memory(c))
    assert_stored_detail(c, ids[0])
    assert [j["id"] for j in ctl_json(c, "status", "--all")["jobs"]] == ids


def test_a_restart_loads_no_finished_job_past_retention(cluster, tmp_path):
    c = cluster
    start(c)
    ids = [run_job(c, tmp_path, f"j{i}") for i in range(3)]
    # a job that waits: every worker drained
    for wid in ("w0", "w1", "w2", "w3"):
        assert c.ctl("drain", wid).returncode == 0
    queued = run_job(c, tmp_path, "waits", wait=False)
    assert in_memory(c) == ids + [queued]
    c.duplexd.terminate()
    assert c.duplexd.wait() == 0
    # the first job finished two hours ago, the second 50 minutes ago
    hour = 3600 * 1000
    now = int(time.time() * 1000)
    conn = sqlite3.connect(c.db_path)
    with conn:
        conn.execute("UPDATE jobs SET finished_ms = ? WHERE id = ?", (now - 2 * hour, ids[0]))
        conn.execute("UPDATE jobs SET finished_ms = ? WHERE id = ?", (now - hour + 600000, ids[1]))
    conn.close()
    c.start_duplexd("--forget-jobs-after-h", "1")
    assert in_memory(c) == ids[1:] + [queued]
    assert "1 finished job past retention left in the database" in c.duplexd.log_text(), \
        c.duplexd.log_tail()
    assert_stored_detail(c, ids[0])
    assert [j["id"] for j in ctl_json(c, "status", "--all")["jobs"]] == ids + [queued]
    c.duplexd.terminate()
    assert c.duplexd.wait() == 0
    # at most one finished job comes back, the one that finished last
    c.start_duplexd("--keep-jobs", "1")
    assert in_memory(c) == ids[2:] + [queued]
    c.duplexd.terminate()
    assert c.duplexd.wait() == 0
    # none at all; the next job's id is above every stored one
    c.start_duplexd("--forget-jobs-after-h", "0")
    assert in_memory(c) == [queued]
    for wid in ("w0", "w1", "w2", "w3"):
        c.wait_worker_alive(wid)
    fresh = run_job(c, tmp_path, "fresh", wait=False)
    assert fresh > queued, (fresh, queued)
    assert ctl_json(c, "status", fresh)["name"] == "fresh"
    assert ctl_json(c, "status", ids[0])["name"] == "j0"
