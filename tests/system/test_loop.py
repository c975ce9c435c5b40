"""duplexd's loop under its own lateness (issue 15): a loop that was late
never declares anyone lost for it, it measures its own latency, and
heartbeats stay out of the database.

The attacks: stop duplexd (SIGSTOP, as a VM pause, a swap storm or a
callback stuck for seconds would) for several dead-after periods while its
workers keep heartbeating; then let it go on. Before the fix its first
sweep, which runs before the heartbeats queued meanwhile are read, declared
every worker lost.
"""
import json
import signal
import time

import zmq

from conftest import (MsgType, bytes_field, decode_envelope, decode_error, envelope,
                      parse_fields, poll_until, varint_field)


def start_fleet(cluster, n):
    cluster.start_duplexd()
    for i in range(n):
        cluster.start_worker(f"w{i}", i)
    cluster.wait_states({f"w{i}": "alive" for i in range(n)})


def test_a_stopped_duplexd_loses_nobody(cluster):
    start_fleet(cluster, 3)
    pause_s = 3 * cluster.dead_after_ms / 1000
    cluster.duplexd.send_signal(signal.SIGSTOP)
    try:
        time.sleep(pause_s)
    finally:
        cluster.duplexd.send_signal(signal.SIGCONT)
    # two dead-after periods after it resumed: a worker it really lost
    # would be declared by now, and the workers are still heartbeating
    time.sleep(2 * cluster.dead_after_ms / 1000)
    assert cluster.events("lost") == [], cluster.log_tails()
    assert {w: v["state"] for w, v in cluster.workers().items()} == \
        {"w0": "alive", "w1": "alive", "w2": "alive"}
    assert "late" in cluster.duplexd.log_text(), "the stall is not logged"


def test_a_killed_worker_is_still_lost_after_a_stall(cluster):
    """The stall's grace does not hide a real death."""
    start_fleet(cluster, 2)
    cluster.duplexd.send_signal(signal.SIGSTOP)
    try:
        cluster.worker_procs["w1"].kill9()
        time.sleep(2 * cluster.dead_after_ms / 1000)
    finally:
        cluster.duplexd.send_signal(signal.SIGCONT)
    cluster.wait_states({"w0": "alive", "w1": "lost"})
    assert [e["worker_id"] for e in cluster.events("lost")] == ["w1"]


def test_status_json_shows_the_loop_latency(cluster):
    start_fleet(cluster, 1)
    cluster.duplexd.send_signal(signal.SIGSTOP)
    time.sleep(1.0)
    cluster.duplexd.send_signal(signal.SIGCONT)

    def loop():
        doc = json.loads(cluster.ctl("status", "--json").stdout)
        stats = doc["duplexd"]["loop"]
        return stats if stats["late_ms_max"] >= 500 else None
    stats = poll_until(loop, what="the pause to show as lateness")
    assert stats["turns"] > 0
    assert sum(b["turns"] for b in stats["busy_histogram"]) == stats["turns"]
    bounds = [b["le_us"] for b in stats["busy_histogram"]]
    assert bounds[-1] is None, "the last bucket is unbounded"
    assert bounds[:-1] == sorted(bounds[:-1]) and bounds[0] > 0
    assert stats["late_count"] >= 1 and stats["late_ms_total"] >= stats["late_ms_max"]
    assert stats["busy_us_max"] >= 0


def test_heartbeats_stay_out_of_the_database(cluster):
    """Liveness lives in memory: idle heartbeats do not rewrite the
    worker's row (a coarse last-seen does, every 30 s)."""
    start_fleet(cluster, 1)
    first = cluster.db_query("SELECT last_heartbeat_ms FROM workers WHERE id = 'w0'")
    time.sleep(10 * cluster.heartbeat_ms / 1000)
    later = cluster.db_query("SELECT last_heartbeat_ms FROM workers WHERE id = 'w0'")
    age = cluster.workers()["w0"]["heartbeat_age_ms"]
    assert 0 <= age < 5 * cluster.heartbeat_ms, "duplexctl workers shows the live heartbeat"
    assert later == first, "every heartbeat still writes the database"


def test_a_huge_dry_run_is_refused_before_it_starts(cluster, tmp_path):
    """`submit --dry-run` of dualpipe pp 128 with 65,536 micro-batches used
    to simulate inside the loop for 9 s: workers were lost, a finished job
    failed. Now the spec is refused, naming the budget, before any work."""
    start_fleet(cluster, 2)
    spec = tmp_path / "huge.json"
    spec.write_text(json.dumps({
        "name": "huge", "backend": "sim", "model": {"layers": 256, "experts": 4},
        "parallel": {"schedule": "dualpipe", "pp": 128, "microbatches": 65536},
        "sim": {"f": 1, "b": 1, "w": 1, "fb": 2}}))
    started = time.monotonic()
    result = cluster.ctl("submit", spec, "--dry-run")
    took = time.monotonic() - started
    assert result.returncode != 0, result.stdout
    assert "simulation budget" in result.stderr and "8388608" in result.stderr, result.stderr
    assert took < 5, f"refusing took {took:.1f} s"
    late = json.loads(cluster.ctl("status", "--json").stdout)["duplexd"]["loop"]
    assert late["late_count"] == 0, late
    assert cluster.events("lost") == []


def test_workers_come_in_pages(cluster):
    """20,000 workers made a 41.6 MB reply, over duplexctl's 4 MiB limit:
    `workers` never answered. Replies are pages now; duplexctl asks for
    every page."""
    start_fleet(cluster, 3)
    sock = cluster.curve_socket(zmq.Context.instance().socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.addr)
    try:
        def page(after, limit):
            sock.send(envelope(MsgType.LIST_WORKERS,
                               bytes_field(1, after.encode()) + varint_field(2, limit),
                               request_id=7))
            assert sock.poll(10000, zmq.POLLIN), "no reply"
            reply = decode_envelope(sock.recv())
            assert reply.type == MsgType.LIST_WORKERS_REPLY, reply
            f = parse_fields(reply.body)
            ids = [parse_fields(w)[1][-1].decode() for w in f.get(1, [])]
            return ids, f.get(2, [b""])[-1].decode(), f.get(3, [0])[-1]
        assert page("", 2) == (["w0", "w1"], "w1", 3)
        assert page("w1", 2) == (["w2"], "", 3)
        assert page("w2", 2) == ([], "", 3)
        assert page("", 0) == (["w0", "w1", "w2"], "", 3)
        # a bad bound is refused, naming the field
        sock.send(envelope(MsgType.LIST_WORKERS, bytes_field(1, b"w\n1"), request_id=8))
        assert sock.poll(10000, zmq.POLLIN)
        reply = decode_envelope(sock.recv())
        assert reply.type == MsgType.ERROR and "after_id" in decode_error(reply.body).text
    finally:
        sock.close(linger=0)
    listed = json.loads(cluster.ctl("workers", "--json", "--page", "1").stdout)["workers"]
    assert [w["id"] for w in listed] == ["w0", "w1", "w2"]


def test_gone_workers_can_be_forgotten(cluster):
    """Registered workers were kept forever. An operator forgets a gone one
    (a live one is refused); its events stay; it may come back as new."""
    start_fleet(cluster, 2)
    alive = cluster.ctl("workers", "forget", "w0")
    assert alive.returncode == 1 and "alive" in alive.stderr, alive.stderr
    cluster.worker_procs["w1"].terminate()
    cluster.wait_states({"w1": "left"})
    result = cluster.ctl("workers", "forget", "w1")
    assert result.returncode == 0 and "w1 forgotten" in result.stdout, result.stderr
    assert set(cluster.workers()) == {"w0"}
    assert cluster.db_query("SELECT count(*) FROM workers WHERE id = 'w1'") == [(0,)]
    assert [e["kind"] for e in cluster.events(worker_id="w1")][-1] == "forgotten"
    assert cluster.ctl("workers", "forget", "w1").returncode == 1  # no such worker now
    reader = cluster.ctl("workers", "forget", "w0", key=cluster.reader_key)
    assert reader.returncode == 1 and "FORBIDDEN" in reader.stderr, reader.stderr
    cluster.start_worker("w1", 1)
    assert [e["kind"] for e in cluster.events(worker_id="w1")][-1] == "registered"


# Submit and its reply (proto/duplex.proto), not in conftest's MsgType
SUBMIT, SUBMIT_REPLY = 8, 9

# A spec at the simulation budget (JOB_SPEC_SIM_BUDGET): pp 2 x
# 65,536 micro-batches, a plan that takes tens of ms to simulate (seconds
# under ASan), on two sim workers.
AT_BUDGET = {
    "name": "at-budget", "backend": "sim", "model": {"layers": 4, "experts": 4},
    "parallel": {"schedule": "dualpipe", "pp": 2, "microbatches": 65536},
    "sim": {"f": 1, "b": 1, "w": 1, "fb": 2}}


def dry_run(request_id):
    return envelope(SUBMIT, bytes_field(1, json.dumps(AT_BUDGET)) + varint_field(3, 1),
                    request_id=request_id)


def operator_socket(cluster):
    sock = cluster.curve_socket(zmq.Context.instance().socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.addr)
    return sock


def replies(sock, n):
    """The next n replies, in the order they came."""
    out = []
    for _ in range(n):
        assert sock.poll(60000, zmq.POLLIN), f"no reply after {len(out)} of {n}"
        out.append(decode_envelope(sock.recv()))
    return out


def loop_stats(cluster):
    return json.loads(cluster.ctl("status", "--json").stdout)["duplexd"]["loop"]


def test_dry_runs_are_planned_off_the_loop(cluster):
    """A dry run at the simulation budget used to simulate inside duplexd's
    loop: everything behind it waited (issue 15: 9.3 s frozen, workers
    lost). Plans are built on libuv's thread pool now. Structural checks,
    measured in one run: a `workers` request sent after two dry runs is
    answered before either plan, and no loop turn while a plan was built
    came near the time the plan took."""
    start_fleet(cluster, 2)
    sock = operator_socket(cluster)
    try:
        # one dry run alone, timed by its client: the plan's own duration
        before = loop_stats(cluster)
        started = time.monotonic()
        sock.send(dry_run(1))
        (reply,) = replies(sock, 1)
        took_us = (time.monotonic() - started) * 1e6
        after = loop_stats(cluster)
        assert reply.type == SUBMIT_REPLY, decode_error(reply.body)
        plan = json.loads(parse_fields(reply.body)[2][-1])
        assert plan["schedule"]["microbatches"] == 65536 and len(plan["ranks"]) == 2
        # turns in buckets whose lower bound is at least a quarter of that:
        # the plan built on the loop was one such turn
        lower = [0] + [b["le_us"] for b in after["busy_histogram"][:-1]]
        long_turns = sum(a["turns"] - b["turns"] for lo, a, b in
                         zip(lower, after["busy_histogram"], before["busy_histogram"])
                         if lo >= took_us / 4)
        assert long_turns == 0, (took_us, before, after)

        # two dry runs, then a cheap request: answered first
        sock.send(dry_run(2))
        sock.send(dry_run(3))
        sock.send(envelope(MsgType.LIST_WORKERS, request_id=4))
        got = replies(sock, 3)
        assert [r.request_id for r in got][0] == 4, [(r.request_id, r.type) for r in got]
        assert sorted((r.request_id, r.type) for r in got) == \
            [(2, SUBMIT_REPLY), (3, SUBMIT_REPLY), (4, MsgType.LIST_WORKERS_REPLY)]
    finally:
        sock.close(linger=0)
    assert cluster.events("lost") == []


def test_a_flood_of_dry_runs_is_bounded(cluster, tmp_path):
    """Dry runs in flight are bounded, so a flood cannot queue unbounded
    work and memory: beyond the bound, each is refused at once as busy."""
    start_fleet(cluster, 2)
    sock = operator_socket(cluster)
    try:
        for i in range(8):
            sock.send(dry_run(10 + i))
        got = replies(sock, 8)
    finally:
        sock.close(linger=0)
    plans = [r for r in got if r.type == SUBMIT_REPLY]
    busy = [decode_error(r.body).text for r in got if r.type == MsgType.ERROR]
    assert len(plans) + len(busy) == 8, got
    assert plans and got[0].type == MsgType.ERROR, "the first refusal comes before any plan"
    assert busy and all(t.startswith("busy: ") and "dry runs in progress" in t and "retry" in t
                        for t in busy), busy
    # once the flood is over, dry runs are planned again
    spec = tmp_path / "at-budget.json"
    spec.write_text(json.dumps(AT_BUDGET))
    result = cluster.ctl("submit", spec, "--dry-run")
    assert result.returncode == 0, result.stderr


def test_plans_in_flight_at_shutdown(cluster, tmp_path):
    """A placed job's simulation lands in its status; dry runs still being
    planned when duplexd is stopped are finished or answered before its
    loop and jobs go (ASan: nothing used after it was freed, no leak)."""
    start_fleet(cluster, 2)
    spec = tmp_path / "at-budget.json"
    spec.write_text(json.dumps(dict(AT_BUDGET, train={"steps": 1})))
    result = cluster.ctl("submit", spec)
    assert result.returncode == 0, result.stderr
    job = result.stdout.split()[1]  # "job N queued"

    def simulated():
        doc = json.loads(cluster.ctl("status", job, "--json").stdout)
        return doc["bubble"]["simulated_step_ms"] > 0 or None
    poll_until(simulated, what="the placed job's simulated step time")
    assert cluster.ctl("cancel", job).returncode == 0
    sock = operator_socket(cluster)
    try:
        sock.send(dry_run(1))
        sock.send(dry_run(2))
        sock.send(envelope(MsgType.LIST_WORKERS, request_id=3))
        (listed,) = replies(sock, 1)
        assert listed.request_id == 3, listed  # the dry runs are in flight
        cluster.duplexd.terminate()
        assert cluster.duplexd.wait() == 0, cluster.duplexd.log_tail()
    finally:
        sock.close(linger=0)
