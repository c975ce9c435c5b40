"""Reports must prove themselves (issue 14, "Trust").

A real duplexd, and fake workers speaking the protocol through raw DEALER
sockets: two of them hold the ranks of a sim job (pp 2), a third holds none.
Forged StepReports, JobDones and checkpoint paths are each answered with an
Error; the job does not move (no step, no metrics row, no checkpoint), does
not succeed, duplexd keeps running, and no MANIFEST.json is written outside
the job's checkpoint.dir. Honest reports, and the very same report sent again,
are acknowledged (Ok), and the job then runs to success.
"""

import itertools
import json
import struct
import time

import pytest
import zmq

from conftest import (
    DEADLINE, Cluster, MsgType, bytes_field, decode_envelope, decode_error, describe,
    encode_varint, envelope, finish_cluster, heartbeat_body, parse_fields, register_body,
    varint_field,
)

REPLY_TIMEOUT = 10.0

# proto/duplex.proto numbers conftest does not name
ASSIGNMENT, ASSIGNMENT_ACK, STEP_REPORT, JOB_DONE, ABORT_JOB, OK = 10, 11, 12, 13, 14, 21
ERROR_INVALID, ERROR_FORBIDDEN = 6, 13
NAMES = {STEP_REPORT: "StepReport", JOB_DONE: "JobDone"}
ACTIVITY_BUSY = 2


def raw_dealer(cluster, worker_id):
    """A raw DEALER connected to the cluster's duplexd, for worker_id: the
    one place that knows how a worker's socket is keyed (the cluster's
    worker key, which may speak for any worker id, when it has keys)."""
    del worker_id  # one worker key for every id
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT * 1000))
    if hasattr(cluster, "curve_socket"):
        cluster.curve_socket(sock, "workers")
    sock.connect(cluster.addr)
    return sock


def double_field(number, value):
    """A double (wire type 1); omitted when 0, as proto3 does."""
    return encode_varint(number << 3 | 1) + struct.pack("<d", value) if value else b""


def step_report(job_id, attempt, step, loss=1.0, step_ms=5.0, ckpt_dir="", ckpt_file="",
                ckpt_bytes=0, ckpt_crc=0):
    return (varint_field(1, job_id) + varint_field(2, step) + double_field(3, loss)
            + double_field(4, step_ms) + double_field(6, step_ms / 2) + varint_field(17, 256)
            + bytes_field(18, ckpt_dir) + bytes_field(19, ckpt_file)
            + varint_field(20, ckpt_bytes) + varint_field(21, ckpt_crc)
            + varint_field(22, attempt))


def job_done(job_id, attempt, ok, steps, error=""):
    return (varint_field(1, job_id) + varint_field(2, 1 if ok else 0) + bytes_field(3, error)
            + varint_field(4, steps) + varint_field(5, attempt))


def assignment_ack(job_id, attempt, ok=True, error=""):
    return (varint_field(1, job_id) + varint_field(2, 1 if ok else 0) + bytes_field(3, error)
            + varint_field(4, attempt))


class FakeWorker:
    """A worker that is only a DEALER: it registers, heartbeats when it
    speaks, and sends whatever the test makes it send."""

    _pids = itertools.count(900000)

    def __init__(self, cluster, worker_id, node, gpu):
        self.id = worker_id
        self.sock = raw_dealer(cluster, worker_id)
        self.rids = itertools.count(1)
        self.inbox = []  # unsolicited messages: Assignment, AbortJob
        self.session = None
        self.job = 0
        rid = next(self.rids)
        self.sock.send(envelope(MsgType.REGISTER,
                                register_body(worker_id, node=node, gpu=gpu, backend="sim",
                                              pid=next(self._pids)),
                                request_id=rid))
        ack = self.reply_to(rid)
        assert ack.type == MsgType.REGISTER_ACK, ack
        self.session = parse_fields(ack.body)[1][0].decode()

    def close(self):
        self.sock.close(linger=0)

    def recv(self, timeout):
        if self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            frames = self.sock.recv_multipart()
            assert len(frames) == 1, frames
            return decode_envelope(frames[0])
        return None

    def reply_to(self, rid, timeout=REPLY_TIMEOUT):
        """duplexd's answer to request rid; anything else is kept."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            env = self.recv(deadline - time.monotonic())
            if env is None:
                break
            if env.request_id == rid and env.type in (OK, MsgType.ERROR, MsgType.REGISTER_ACK):
                return env
            self.inbox.append(env)
        raise AssertionError(f"{self.id}: no answer to request {rid} within {timeout}s")

    def heartbeat(self):
        self.sock.send(envelope(MsgType.HEARTBEAT,
                                heartbeat_body(self.id, self.session,
                                               activity=ACTIVITY_BUSY if self.job else 1,
                                               job_id=self.job)))

    def request(self, msg_type, body):
        """Send one job message; return duplexd's answer (Ok or Error)."""
        self.heartbeat()
        rid = next(self.rids)
        self.sock.send(envelope(msg_type, body, request_id=rid))
        return self.reply_to(rid)

    def send(self, msg_type, body):
        """Send one job message that gets no answer (AssignmentAck)."""
        self.heartbeat()
        self.sock.send(envelope(msg_type, body, request_id=next(self.rids)))

    def assignment(self, timeout=DEADLINE):
        """The Assignment duplexd sent, or None."""
        deadline = time.monotonic() + timeout
        while True:
            for env in self.inbox:
                if env.type == ASSIGNMENT:
                    self.inbox.remove(env)
                    f = parse_fields(env.body)
                    return {"job": f[1][-1], "attempt": f.get(2, [0])[-1],
                            "pp_rank": f.get(9, [0])[-1]}
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            env = self.recv(min(left, 0.2))
            if env is not None:
                self.inbox.append(env)
            else:
                self.heartbeat()


def expect_ok(reply, what):
    assert reply.type == OK, f"{what}: expected Ok, got {reply.type} " \
        f"{decode_error(reply.body) if reply.type == MsgType.ERROR else reply}"


def expect_refused(reply, code, says, what):
    assert reply.type == MsgType.ERROR, f"{what}: expected an Error, got {reply}"
    err = decode_error(reply.body)
    assert err.code == code, f"{what}: error {err.code} ({err.text!r}), expected {code}"
    assert says in err.text, f"{what}: {err.text!r} does not say {says!r}"
    return err


def step_dir(root, job, step):
    return f"{root}/job-{job}/step-{step:08d}"


@pytest.fixture
def target(tmp_path):
    """duplexd (dead-after 30 s: the fake workers heartbeat only when they
    speak) and three fake workers: alice and bob on node0 (placed first),
    mallory on node9."""
    c = Cluster(tmp_path / "cluster", heartbeat_ms=200, dead_after_ms=30000)
    fakes = []
    try:
        c.start_duplexd()
        for wid, node, gpu in (("alice", "node0", 0), ("bob", "node0", 1),
                               ("mallory", "node9", 2)):
            fakes.append(FakeWorker(c, wid, node, gpu))
        yield c, fakes
    finally:
        for f in fakes:
            f.close()
        finish_cluster(c)


def status(c, jid):
    result = c.ctl("status", jid, "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def moved(c, jid):
    """What a forged report could move: the job's state and step, its
    metrics, checkpoint shards and checkpoints."""
    doc = status(c, jid)
    return (doc["state"], doc["step"], [r["step"] for r in doc["ranks"]],
            c.db_query("SELECT count(*) FROM metrics WHERE job_id = ?", (jid,)),
            c.db_query("SELECT count(*) FROM checkpoint_shards WHERE job_id = ?", (jid,)),
            c.db_query("SELECT count(*) FROM checkpoints WHERE job_id = ?", (jid,)))


def test_forged_reports_are_refused(target, tmp_path):
    c, fakes = target
    ck = tmp_path / "ck"
    evil = tmp_path / "evil"
    spec = {"name": "trust", "backend": "sim", "train": {"steps": 4},
            "parallel": {"schedule": "dualpipe", "pp": 2, "microbatches": 4},
            "checkpoint": {"every": 2, "dir": str(ck)}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    result = c.ctl("submit", path)
    assert result.returncode == 0, describe(result)
    jid = int(result.stdout.split()[1])

    got = {f.id: f.assignment(timeout=5) for f in fakes}
    holders = sorted((f for f in fakes if got[f.id]), key=lambda f: got[f.id]["pp_rank"])
    outsider = next(f for f in fakes if not got[f.id])
    assert [f.id for f in holders] == ["alice", "bob"], got
    attempt = got["alice"]["attempt"]
    for f in holders:
        f.job = jid
        f.send(ASSIGNMENT_ACK, assignment_ack(jid, attempt))
    c.poll_until(lambda: status(c, jid)["state"] == "running", what=f"job {jid} running")
    before = moved(c, jid)
    assert before[:2] == ("running", 0), before

    own2 = step_dir(ck, jid, 2)
    for d in (own2, step_dir(evil, jid, 2), step_dir(ck, jid + 1, 2), step_dir(ck, jid, 4)):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    shard = ["rank-d0-p0-e0.ckpt", "rank-d0-p1-e0.ckpt"]
    attacks = [
        # (who, type, body, code, what the error says)
        (outsider, STEP_REPORT, step_report(jid, attempt, 1, loss=0.0001), ERROR_FORBIDDEN,
         "holds no rank"),
        (outsider, JOB_DONE, job_done(jid, attempt, True, 4), ERROR_FORBIDDEN, "holds no rank"),
        (outsider, JOB_DONE, job_done(jid, attempt, False, 0, "forged"), ERROR_FORBIDDEN,
         "holds no rank"),
        (holders[0], STEP_REPORT, step_report(jid, attempt + 1, 1), ERROR_FORBIDDEN,
         f"attempt {attempt + 1}"),
        (holders[0], STEP_REPORT, step_report(jid, attempt, 0), ERROR_INVALID, "step 0"),
        (holders[0], STEP_REPORT, step_report(jid, attempt, 600, loss=0.0001), ERROR_INVALID,
         "step 600"),
        (holders[0], JOB_DONE, job_done(jid, attempt, True, 600), ERROR_INVALID, "claims 600"),
        (holders[0], JOB_DONE, job_done(jid, attempt, True, 4), ERROR_INVALID, "is 0"),
    ]
    # checkpoint paths: both ranks name the same foreign place, as the
    # attack that got a MANIFEST.json written there did
    for bad_dir, says in ((step_dir(evil, jid, 2), "not job"),
                          (step_dir(ck, jid + 1, 2), "not job"),
                          (step_dir(ck, jid, 4), "not job"),
                          (f"{ck}/job-{jid}/../job-{jid}/step-00000002", "absolute path without")):
        for k, f in enumerate(holders):
            attacks.append((f, STEP_REPORT,
                            step_report(jid, attempt, 2, ckpt_dir=bad_dir, ckpt_file=shard[k],
                                        ckpt_bytes=10, ckpt_crc=1),
                            ERROR_INVALID, says))
    attacks.append((holders[0], STEP_REPORT,
                    step_report(jid, attempt, 2, ckpt_dir=own2, ckpt_file=shard[1],
                                ckpt_bytes=10), ERROR_INVALID, "is not the shard"))
    attacks.append((holders[0], STEP_REPORT,
                    step_report(jid, attempt, 2, ckpt_dir=own2, ckpt_file="../x.ckpt",
                                ckpt_bytes=10), ERROR_INVALID, "'/'"))
    attacks.append((holders[0], STEP_REPORT,
                    step_report(jid, attempt, 1, ckpt_dir=step_dir(ck, jid, 1),
                                ckpt_file=shard[0], ckpt_bytes=10), ERROR_INVALID,
                    "no checkpoint due"))
    for who, msg_type, body, code, says in attacks:
        what = f"{who.id}: {NAMES[msg_type]} ({says})"
        expect_refused(who.request(msg_type, body), code, says, what)
        assert moved(c, jid) == before, f"{what} moved the job"
    assert list(tmp_path.rglob("MANIFEST.json")) == [], "a forged report got a manifest written"
    assert c.duplexd.running(), c.duplexd.log_tail()

    # honest step 1, the very same report again (a resend), and another
    # report of step 1 (refused)
    for f in holders:
        expect_ok(f.request(STEP_REPORT, step_report(jid, attempt, 1, loss=5.5)), f"{f.id} step 1")
    after1 = moved(c, jid)
    assert after1[1] == 1, after1
    expect_ok(holders[0].request(STEP_REPORT, step_report(jid, attempt, 1, loss=5.5)), "resend")
    assert moved(c, jid) == after1
    expect_refused(holders[0].request(STEP_REPORT, step_report(jid, attempt, 1, loss=0.0001)),
                   ERROR_INVALID, "already", "a different step 1")
    assert moved(c, jid) == after1

    # the rest honestly, checkpoints in the job's own directories: success
    for step in (2, 3, 4):
        for k, f in enumerate(holders):
            extra = {}
            if step % 2 == 0:
                extra = {"ckpt_dir": step_dir(ck, jid, step), "ckpt_file": shard[k],
                         "ckpt_bytes": 10, "ckpt_crc": 7}
            expect_ok(f.request(STEP_REPORT, step_report(jid, attempt, step, loss=5.0 / step,
                                                         **extra)),
                      f"{f.id} step {step}")
    expect_refused(outsider.request(JOB_DONE, job_done(jid, attempt, True, 4)), ERROR_FORBIDDEN,
                   "holds no rank", "outsider's JobDone at the end")
    for f in holders:
        expect_ok(f.request(JOB_DONE, job_done(jid, attempt, True, 4)), f"{f.id} done")
    c.poll_until(lambda: status(c, jid)["state"] == "succeeded", what=f"job {jid} succeeded")
    doc = status(c, jid)
    assert [e["step"] for e in doc["losses"]] == [1, 2, 3, 4], doc["losses"]
    assert doc["losses"][0]["loss"] == pytest.approx(5.5), doc["losses"]
    manifests = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("MANIFEST.json"))
    assert manifests == [f"ck/job-{jid}/step-00000002/MANIFEST.json",
                         f"ck/job-{jid}/step-00000004/MANIFEST.json"], manifests
    assert c.events("checkpoint_failed") == [], c.events("checkpoint_failed")
    assert doc["checkpoint"] == {"step": 4, "dir": step_dir(ck, jid, 4)}, doc["checkpoint"]
    assert c.duplexd.running(), c.duplexd.log_tail()
    assert "refused message from" in c.duplexd.log_text()
