"""End-to-end slice: duplexd, sim workers and duplexctl working together."""

import re
import signal
import time

import pytest

from conftest import (
    CTL, DEADLINE, DUPLEXD, WORKER, base_env, ctl, describe, free_port, run_binary,
    timing_slack_s,
)

WORKER_IDS = ("w0", "w1", "w2")
ALL_ALIVE = {wid: "alive" for wid in WORKER_IDS}

# key -> type of each worker in `duplexctl workers --json`
WORKER_JSON_FIELDS = {
    "id": str, "host": str, "node": str, "gpu": int, "backend": str, "state": str,
    "heartbeat_age_ms": int, "pid": int, "capabilities": list, "activity": str,
    "job": int, "step": int,
}


@pytest.fixture
def slice3(cluster):
    """duplexd (heartbeat 200 ms, dead-after 1000 ms) and sim workers w0..w2
    on GPUs 0..2, all alive."""
    cluster.start_duplexd()
    for gpu, wid in enumerate(WORKER_IDS):
        cluster.start_worker(wid, gpu, wait=False)
    for wid in WORKER_IDS:
        cluster.wait_worker_alive(wid)
    return cluster


def count(cluster, sql, params=()):
    return cluster.db_query(sql, params)[0][0]


UNSENT_HEARTBEAT = re.compile(r"Heartbeat to \S+ not sent")


def log_sizes(cluster):
    return {wid: len(cluster.worker_procs[wid].log_text()) for wid in WORKER_IDS}


def wait_unsent_heartbeats(cluster, since, n=3):
    """Until each worker has logged n heartbeats it could not send (duplexd
    gone) after the log sizes in since: n of its ticks without duplexd."""
    def counts():
        got = {wid: len(UNSENT_HEARTBEAT.findall(cluster.worker_procs[wid].log_text()[since[wid]:]))
               for wid in WORKER_IDS}
        return got if min(got.values()) >= n else None
    cluster.poll_until(counts, what=f"{n} unsent heartbeats from every worker")


def test_three_workers_register(slice3):
    c = slice3
    listing = c.workers_list()
    assert [w["id"] for w in listing] == list(WORKER_IDS), \
        f"expected exactly w0..w2 sorted by id, got {listing}"
    for gpu, w in enumerate(listing):
        for key, typ in WORKER_JSON_FIELDS.items():
            assert key in w, f"{w['id']}: key {key!r} missing in {w}"
            # bool is an int subclass; JSON true/false must not pass as a number
            assert type(w[key]) is typ, f"{w['id']}: {key}={w[key]!r} is not {typ.__name__}"
        assert all(isinstance(cap, str) for cap in w["capabilities"]), w
        assert w["state"] == "alive", w
        assert w["gpu"] == gpu, w
        assert w["backend"] == "sim", w
        assert w["host"] == "testhost", w
        assert w["node"] == f"node{gpu // 2}", w
        assert w["pid"] == c.worker_procs[w["id"]].pid, w
        assert 0 <= w["heartbeat_age_ms"] < 2 * c.dead_after_ms, w
        assert w["activity"] in ("idle", "busy", "unknown"), w

    table = c.ctl("workers")
    assert table.returncode == 0, describe(table)
    lines = table.stdout.splitlines()
    columns = {"ID", "HOST", "NODE", "GPU", "BACKEND", "STATE"}
    headers = [ln for ln in lines if columns <= set(ln.split())]
    assert len(headers) == 1, \
        f"no single header line with ID HOST NODE GPU BACKEND STATE:\n{table.stdout}"
    for gpu, wid in enumerate(WORKER_IDS):
        rows = [ln.split() for ln in lines if ln.split()[:1] == [wid]]
        assert len(rows) == 1, f"expected one row for {wid}:\n{table.stdout}"
        assert {"testhost", str(gpu), "sim", "alive"} <= set(rows[0]), \
            f"row for {wid} lacks host/gpu/backend/state: {rows[0]}"

    rows = c.worker_rows()
    assert sorted(rows) == list(WORKER_IDS), rows
    for gpu, wid in enumerate(WORKER_IDS):
        assert rows[wid]["state"] == "alive", rows[wid]
        assert rows[wid]["gpu"] == gpu, rows[wid]
        assert rows[wid]["pid"] == c.worker_procs[wid].pid, rows[wid]
    registered = c.wait_event("registered", count=3)
    assert sorted(e["worker_id"] for e in registered) == list(WORKER_IDS), registered
    assert len(c.events("coordinator_started")) == 1, c.events()


def test_killed_worker_becomes_lost_then_returns(slice3):
    c = slice3
    hb, dead = c.heartbeat_ms, c.dead_after_ms
    victim = c.worker_procs["w1"]
    victim.kill9()

    def w1_lost():
        states = c.states()
        assert states["w0"] == "alive" and states["w2"] == "alive", \
            f"a worker that was not killed changed state: {states}"
        return states["w1"] == "lost"
    c.poll_until(w1_lost, timeout=2 * dead / 1000 + 5 * timing_slack_s() + 2,
                 what="w1 to be reported lost", progress=c.states)

    lost = c.wait_event("lost", "w1")
    assert len(lost) == 1, lost
    print(f"w1 lost: {lost[0]['detail']} (heartbeat {hb} ms, dead-after {dead} ms)")
    # A killed process's connection closes at once; duplexd's socket monitor
    # sees that it was w1's and declares it lost when nothing came for two
    # heartbeat intervals since: the closed-connection rule, not dead-after's
    # silence. The detail gives duplexd's own (monotonic) measures of both.
    m = re.fullmatch(r"its connection closed and nothing came for (\d+) ms "
                     r"\(no heartbeat for (\d+) ms\)", lost[0]["detail"])
    assert m, lost
    since_close, since_heartbeat = int(m.group(1)), int(m.group(2))
    hint = 2 * hb
    assert since_close >= hint, lost  # it waited the two intervals for a reconnect
    assert since_heartbeat >= since_close, lost  # the heartbeat came before the close
    assert since_heartbeat < dead, lost  # so dead-after's rule had not fired yet

    w1 = c.workers()["w1"]
    assert w1["heartbeat_age_ms"] >= hint, f"lost worker with a fresh heartbeat age: {w1}"
    assert c.states() == {"w0": "alive", "w1": "lost", "w2": "alive"}
    assert c.events("lost", "w0") == [] and c.events("lost", "w2") == []

    again = c.start_worker("w1", 1)  # waits for alive with the new pid
    assert again.pid != victim.pid
    c.wait_event("returned", "w1")
    assert c.states() == ALL_ALIVE
    assert count(c, "SELECT count(*) FROM workers") == 3
    assert len(c.events("registered")) == 3, "a returning worker is not a new registration"


def test_duplexd_restart_workers_reregister(slice3):
    c = slice3
    worker_pids = {wid: c.worker_procs[wid].pid for wid in WORKER_IDS}
    since = log_sizes(c)
    c.duplexd.kill9()
    # Workers must ride out a missing coordinator rather than exit: each is
    # still there after three heartbeats it could not send.
    wait_unsent_heartbeats(c, since)
    for wid in WORKER_IDS:
        assert c.worker_procs[wid].running(), \
            f"{wid} exited while duplexd was down\n{c.worker_procs[wid].log_tail()}"

    c.start_duplexd()  # same db, same port
    ws = c.wait_states(ALL_ALIVE)
    assert {wid: w["pid"] for wid, w in ws.items()} == worker_pids, \
        "the same worker processes should be listed after the restart"

    def reregistered_all():
        events = c.events("reregistered")
        return events if {e["worker_id"] for e in events} >= set(WORKER_IDS) else None
    rereg = c.poll_until(reregistered_all, what="'reregistered' events for w0, w1 and w2",
                         progress=c.events)
    assert {e["worker_id"] for e in rereg} == set(WORKER_IDS), rereg
    assert count(c, "SELECT count(*) FROM workers") == 3, c.worker_rows()
    assert sorted(c.worker_rows()) == list(WORKER_IDS)
    assert len(c.events("registered")) == 3, "re-registration must not count as new"
    assert len(c.events("coordinator_started")) == 2, c.events()


def test_sigterm_worker_leaves(slice3):
    c = slice3
    w1 = c.worker_procs["w1"]
    w1.terminate()
    rc = w1.wait()
    assert rc == 0, f"worker exited with {rc} on SIGTERM\n{w1.log_tail()}"
    c.wait_states({"w0": "alive", "w1": "left", "w2": "alive"})
    left = c.wait_event("left", "w1")
    assert len(left) == 1, left

    # A worker that said goodbye must not later be declared lost. w2, stopped
    # after w1 left (connected, silent), is lost by dead-after's rule; w1's
    # silence is older, so the sweep that lost w2 would have caught w1 too.
    w2 = c.worker_procs["w2"].proc
    w2.send_signal(signal.SIGSTOP)
    try:
        lost = c.wait_event("lost", "w2", timeout=DEADLINE)
    finally:
        w2.send_signal(signal.SIGCONT)
    assert lost[0]["detail"].startswith("no heartbeat for "), lost
    assert [e["worker_id"] for e in c.events("lost")] == ["w2"], c.events()
    assert c.states()["w1"] == "left"
    assert c.worker_rows()["w1"]["state"] == "left"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_duplexd_exits_cleanly_on_signal(slice3, sig):
    c = slice3
    since = log_sizes(c)
    c.duplexd.send_signal(sig)
    rc = c.duplexd.wait()
    assert rc == 0, f"duplexd exited with {rc} on {sig.name}\n{c.duplexd.log_tail()}"
    wait_unsent_heartbeats(c, since)  # three ticks without duplexd
    for wid in WORKER_IDS:
        assert c.worker_procs[wid].running(), f"{wid} exited when duplexd stopped"


@pytest.mark.parametrize("how,timeout_s", [
    ("global-options", 1),
    ("command-options", 1),
    ("env-coordinator", 1),
    ("default-timeout", 3),
])
def test_ctl_without_duplexd_says_no_answer(how, timeout_s):
    addr = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    env = base_env()
    if how == "global-options":
        args = ["--coordinator", addr, "--timeout", timeout_s, "workers", "--json"]
    elif how == "command-options":
        args = ["workers", "--json", "--coordinator", addr, "--timeout", timeout_s]
    elif how == "env-coordinator":
        env["DUPLEX_COORDINATOR"] = addr
        args = ["--timeout", timeout_s, "workers"]
    else:
        args = ["--coordinator", addr, "workers"]
    start = time.monotonic()
    result = ctl("--insecure", *args, env=env, timeout=DEADLINE)  # no keys to find here
    elapsed = time.monotonic() - start
    assert result.returncode != 0, describe(result)
    # it names the timeout it used (the default 3 s, else the one given)
    assert f"no answer from duplexd at {addr} within {timeout_s:.1f} s" in result.stderr, \
        describe(result)
    # a lower bound only: a loaded machine makes it later, never earlier (a
    # hang is caught by ctl()'s DEADLINE)
    assert elapsed >= timeout_s, f"gave up after {elapsed:.2f}s, before the timeout"


@pytest.mark.parametrize("args", [["--help"], ["help"]], ids=["--help", "help"])
def test_ctl_help(args):
    result = ctl(*args)
    assert result.returncode == 0, describe(result)
    text = result.stdout + result.stderr
    for command in ("workers", "local"):
        assert command in text, f"help does not list {command!r}:\n{text}"


def test_ctl_unknown_command():
    result = ctl("frobnicate")
    assert result.returncode != 0, describe(result)
    assert "unknown command" in (result.stderr + result.stdout).lower(), describe(result)


@pytest.mark.parametrize("binary,args", [
    (DUPLEXD, ["--help"]), (DUPLEXD, ["--version"]),
    (WORKER, ["--help"]), (CTL, ["--help"]),
], ids=["duplexd --help", "duplexd --version", "worker --help", "duplexctl --help"])
def test_help_and_version_exit_zero(binary, args):
    result = run_binary(binary, *args)
    assert result.returncode == 0, describe(result)
    assert result.stdout.strip(), f"{binary.name} {args[0]} printed nothing on stdout"


@pytest.mark.parametrize("binary,args", [
    (DUPLEXD, ["--no-such-option"]),
    (WORKER, ["--no-such-option"]),
    (WORKER, ["--backend", "quantum"]),
    (DUPLEXD, ["--log-level", "chatty"]),
], ids=["duplexd bad option", "worker bad option", "worker bad backend", "duplexd bad log level"])
def test_bad_arguments_exit_nonzero(binary, args, tmp_path):
    # Pointed at a port nobody listens on, in case the option is ignored.
    unused = f"tcp://127.0.0.1:{free_port()}"
    extra = (["--coordinator", unused, "--insecure"] if binary == WORKER
             else ["--listen", unused, "--db", tmp_path / "x.db"])
    result = run_binary(binary, *extra, *args, timeout=DEADLINE)
    assert result.returncode != 0, describe(result)
    assert result.stderr.strip(), f"no message on stderr:\n{describe(result)}"


def test_worker_cuda_backend_not_available():
    unused = f"tcp://127.0.0.1:{free_port()}"
    result = run_binary(WORKER, "--backend", "cuda", "--coordinator", unused, "--insecure",
                        "--id", "wc",
                        timeout=DEADLINE)
    assert result.returncode != 0, describe(result)
    assert "cuda" in result.stderr.lower(), describe(result)


def test_second_duplexd_on_same_port_fails(cluster):
    c = cluster
    first = c.start_duplexd()
    second = c.spawn("duplexd-second", c.duplexd_argv(db=c.root / "second.db"), expect_exit=True)
    rc = second.wait()
    assert rc != 0, f"second duplexd on a busy port exited {rc}\n{second.log_tail()}"
    log = second.log_text().split("\n", 1)[1]  # drop our "=== argv" line
    assert str(c.port) in log, f"error message does not name the address:\n{log}"
    assert first.running(), "the first duplexd died"
    assert c.workers() == {}  # the first one still answers


def test_second_duplexd_on_same_database_fails(cluster):
    c = cluster
    first = c.start_duplexd()
    other_port = free_port()
    second = c.spawn("duplexd-second",
                     c.duplexd_argv(listen=f"tcp://127.0.0.1:{other_port}"), expect_exit=True)
    rc = second.wait()
    assert rc != 0, f"second duplexd on a database in use exited {rc}\n{second.log_tail()}"
    log = second.log_text().split("\n", 1)[1]
    assert "in use by another duplexd" in log and str(first.pid) in log, \
        f"error message does not say who holds the database:\n{log}"
    assert first.running(), "the first duplexd died"
    assert c.workers() == {}


def test_worker_refused_registration_exits(cluster):
    """A Register duplexd refuses (a host name with a space) is not retried
    forever: the worker exits 4 and says why; duplexd records nothing."""
    c = cluster
    c.start_duplexd()
    argv = [WORKER, "--coordinator", c.addr, "--backend", "sim", "--id", "wbad",
            "--host", "bad host"]
    worker = c.spawn("worker-wbad", argv, expect_exit=True)
    rc = worker.wait()
    assert rc == 4, f"worker exited {rc}\n{worker.log_tail()}"
    log = worker.log_text()
    assert "refused our registration" in log and "host" in log, log
    assert c.workers() == {}
    assert c.db_query("SELECT count(*) FROM workers")[0][0] == 0
