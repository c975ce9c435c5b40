"""Jobs end to end on the sim backend: submit and run to success, the queue
(two jobs for a cluster that fits one), cancel mid-run, drain, status and
events."""

import json
import sqlite3

from conftest import describe

FAST = {"name": "fast", "backend": "sim", "model": {"layers": 4, "experts": 8},
        "train": {"steps": 3},
        "parallel": {"schedule": "dualpipe", "pp": 2, "ep": 2, "microbatches": 4},
        "sim": {"f": 1, "b": 2, "w": 1, "fb": 3}}


def submit(c, tmp_path, spec, *args, name="job.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return c.ctl("submit", path, *args)


def job_id(result):
    assert result.returncode == 0, describe(result)
    return int(result.stdout.split()[1])


def status(c, jid):
    result = c.ctl("status", jid, "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def wait_state(c, jid, states, timeout=60):
    last = {}

    def reached():
        nonlocal last
        last = status(c, jid)
        return last["state"] in states
    c.poll_until(reached, timeout=timeout, what=f"job {jid} in {states} (last: {last})")
    return last


def test_submit_runs_to_success(sim4, tmp_path):
    c = sim4
    result = submit(c, tmp_path, FAST, "--wait")
    assert result.returncode == 0, describe(result)
    assert "succeeded" in result.stdout
    jid = int(result.stdout.split()[1])
    doc = status(c, jid)
    assert doc["state"] == "succeeded" and doc["step"] == 3, doc
    assert [entry["step"] for entry in doc["losses"]] == [1, 2, 3]
    assert len(doc["ranks"]) == 4 and all(r["done"] for r in doc["ranks"])
    # the measured step is at least the simulated one (sleeps only add)
    assert doc["last_step_ms"] >= doc["bubble"]["simulated_step_ms"] * 0.9, doc
    kinds = [json.loads(line)["kind"]
             for line in c.ctl("events", jid, "--json").stdout.splitlines()]
    assert kinds == ["job_queued", "job_placing", "job_running", "job_succeeded"], kinds
    table = c.ctl("status")
    assert table.returncode == 0 and "succeeded" in table.stdout, describe(table)
    one = c.ctl("status", jid)
    assert "bubble: measured" in one.stdout and "w0" in one.stdout, describe(one)
    # every worker is free again
    c.poll_until(lambda: all(w["activity"] == "idle" for w in c.workers_list()),
                 what="all workers idle")


def test_two_jobs_queue_for_a_cluster_that_fits_one(sim4, tmp_path):
    c = sim4
    first = job_id(submit(c, tmp_path, FAST, name="a.json"))
    second = job_id(submit(c, tmp_path, FAST, name="b.json"))
    doc = status(c, second)
    assert doc["state"] in ("queued", "placing", "running", "succeeded"), doc
    wait_state(c, first, ("succeeded",))
    wait_state(c, second, ("succeeded",))
    events = [json.loads(line) for line in c.ctl("events", "--json").stdout.splitlines()]
    done_first = next(e["id"] for e in events if e["kind"] == "job_succeeded" and e["job_id"] == first)
    placed_second = next(e["id"] for e in events
                         if e["kind"] == "job_placing" and e["job_id"] == second)
    assert placed_second > done_first, "the second job must wait for the first's workers"


def test_cancel_mid_run_frees_the_workers(sim4, tmp_path):
    c = sim4
    slow = dict(FAST, train={"steps": 10000}, name="slow")
    jid = job_id(submit(c, tmp_path, slow))
    wait_state(c, jid, ("running",))
    c.poll_until(lambda: status(c, jid)["step"] >= 1, what="a first step")
    result = c.ctl("cancel", jid)
    assert result.returncode == 0 and "cancelled" in result.stdout, describe(result)
    doc = wait_state(c, jid, ("cancelled",))
    assert doc["reason"] == "cancelled by operator"  # the name of the key that cancelled
    again = c.ctl("cancel", jid)
    assert again.returncode == 1 and "already cancelled" in again.stderr, describe(again)
    # the freed workers run the next job
    nxt = job_id(submit(c, tmp_path, FAST, name="next.json"))
    wait_state(c, nxt, ("succeeded",))


def test_drain_keeps_a_worker_out_of_placement(sim4, tmp_path):
    c = sim4
    result = c.ctl("drain", "w3")
    assert result.returncode == 0 and "w3 drained" in result.stdout, describe(result)
    assert c.workers()["w3"]["drained"] is True
    assert "drained" in c.ctl("workers").stdout
    jid = job_id(submit(c, tmp_path, FAST))
    # a scheduling pass has looked at it (its reason says what it found),
    # and left it queued: the drained worker does not count
    doc = c.poll_until(lambda: (lambda d: d if "free now" in d["reason"] else None)(status(c, jid)),
                       what=f"job {jid} to be considered for placement")
    assert doc["state"] == "queued", doc
    assert "waiting for 4 free sim workers (3 free now)" in doc["reason"], doc
    assert c.ctl("undrain", "w3").returncode == 0
    assert c.workers()["w3"]["drained"] is False
    wait_state(c, jid, ("succeeded",))
    missing = c.ctl("drain", "nobody")
    assert missing.returncode == 1 and "no worker nobody" in missing.stderr, describe(missing)


def test_a_spec_error_names_the_field(sim4, tmp_path):
    result = submit(sim4, tmp_path, dict(FAST, model={"layers": 3}))
    assert result.returncode == 1, describe(result)
    assert "model.layers" in result.stderr, describe(result)
    bad_id = sim4.ctl("status", "abc")
    assert bad_id.returncode == 2 and "not a job id" in bad_id.stderr, describe(bad_id)
    unknown = sim4.ctl("status", "999")
    assert unknown.returncode == 1 and "no job 999" in unknown.stderr, describe(unknown)


def event_lines(c, *args):
    result = c.ctl("events", "--json", *args)
    assert result.returncode == 0, describe(result)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_events_are_read_page_by_page_and_newest_last(cluster):
    """`events` lists every event however long the log (duplexd answers
    1,000 a request), `--limit N` the newest N, `--since ID` those after
    an id: a long-running cluster's log is no longer cut at its oldest
    1,000 entries."""
    c = cluster
    c.start_duplexd()
    c.duplexd.terminate()
    assert c.duplexd.wait() == 0
    conn = sqlite3.connect(c.db_path)
    with conn:
        conn.executemany("INSERT INTO events (ts_ms, kind, worker_id, job_id, detail)"
                         " VALUES (?, 'test_event', NULL, NULL, ?)",
                         [(1700000000000 + i, f"event {i}") for i in range(2500)])
    conn.close()
    c.start_duplexd()
    every = event_lines(c)
    ids = [e["id"] for e in every]
    assert len(ids) > 2500 and ids == sorted(ids) and len(set(ids)) == len(ids), len(ids)
    assert sum(e["kind"] == "test_event" for e in every) == 2500
    newest = event_lines(c, "--limit", "5")
    assert [e["id"] for e in newest] == ids[-5:], newest
    after = event_lines(c, "--since", str(ids[-3]))
    assert [e["id"] for e in after] == ids[-2:], after
    middle = event_lines(c, "--since", str(ids[100]), "--limit", "2")
    assert [e["id"] for e in middle] == ids[-2:], middle
    bad = c.ctl("events", "--since", "yesterday")
    assert bad.returncode != 0 and "is not an event id" in bad.stderr, describe(bad)
