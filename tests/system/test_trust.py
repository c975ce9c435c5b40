"""Trust: only known parties reach duplexd, each only for what its role
allows, and no stranger can take a worker's place (issue 14).

Each test replays an attack that worked before duplexd had keys, against a
keyed cluster (CURVE + ZAP, the default of conftest's Cluster), and shows it
refused with the cluster still whole. The last tests show the same attacks
succeed against --insecure, as documented in docs/OPERATIONS.md.
"""

import json
import os
import signal

import pytest
import zmq

from conftest import (
    CTL, DEADLINE, DUPLEXD, WORKER, Cluster, ErrorCode, MsgType, base_env, bytes_field,
    decode_envelope, decode_error, describe, envelope, finish_cluster, free_port, read_cert,
    register_body, run_binary, varint_field,
)

REPLY_TIMEOUT = 5.0
MSG_SUBMIT, MSG_JOB_DONE, MSG_CANCEL, MSG_DRAIN = 8, 13, 17, 18

SIM_JOB = {"name": "trusted", "backend": "sim", "model": {"layers": 4, "experts": 4},
           "train": {"steps": 2000},
           "parallel": {"schedule": "1f1b", "pp": 2, "ep": 1, "microbatches": 2},
           "sim": {"f": 1, "b": 1, "w": 1, "fb": 2}}


class Raw:
    """A raw DEALER to duplexd, with a key of the cluster (or none)."""

    def __init__(self, cluster, key_name=None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # a DEALER whose handshake fails has no pipe to send on: never block
        self.sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT * 1000))
        if key_name:
            cluster.curve_socket(self.sock, key_name)
        self.sock.connect(cluster.addr)
        self.next_id = 100

    def request(self, msg_type, body=b"", timeout=REPLY_TIMEOUT):
        """The decoded reply Envelope, or None when nothing came in time."""
        self.next_id += 1
        try:
            self.sock.send(envelope(msg_type, body, request_id=self.next_id))
        except zmq.Again:
            return None
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return decode_envelope(self.sock.recv())

    def close(self):
        self.sock.close(linger=0)


def expect_forbidden(reply, *words):
    assert reply is not None, "no reply"
    assert reply.type == MsgType.ERROR, reply
    err = decode_error(reply.body)
    assert err.code == ErrorCode.FORBIDDEN, err
    for w in words:
        assert w in err.text, err
    return err.text


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """duplexd with keys and two sim workers (w0, w1) sharing the cluster's
    worker key; extra keys: a stranger's (not listed), a second operator,
    and a worker key that may only be "m*" ids."""
    c = Cluster(tmp_path_factory.mktemp("trust"), heartbeat_ms=200, dead_after_ms=2000)
    c.keys.gen("stranger", "operator", authorize=False)
    c.keys.gen("op2", "operator")
    c.keys.gen("mallory", "worker", "--ids", "m*")
    try:
        c.start_duplexd()
        c.start_worker("w0", 0)
        c.start_worker("w1", 1)
        yield c
    finally:
        finish_cluster(c)


def assert_whole(c):
    """duplexd serves; w0 and w1 are the same processes, alive, undrained."""
    assert c.duplexd.running(), c.duplexd.log_tail()
    workers = c.workers()
    for wid in ("w0", "w1"):
        assert c.worker_procs[wid].running(), c.worker_procs[wid].log_tail()
        assert workers[wid]["state"] == "alive", workers[wid]
        assert workers[wid]["pid"] == c.worker_procs[wid].pid, workers[wid]
        assert not workers[wid].get("drained"), workers[wid]


def test_a_client_in_clear_gets_nothing(keyed):
    """Attack 1: any process reaching the port could drain every worker."""
    raw = Raw(keyed)
    try:
        assert raw.request(MsgType.LIST_WORKERS, timeout=2) is None
        assert raw.request(MSG_DRAIN, bytes_field(1, "w0"), timeout=1) is None
    finally:
        raw.close()
    result = run_binary(CTL, "--coordinator", keyed.addr, "--insecure", "--timeout", "3",
                        "workers", env=base_env())
    assert result.returncode == 1, describe(result)
    assert "speaks CURVE" in result.stderr, describe(result)
    assert_whole(keyed)


def test_a_key_not_in_the_allow_list_is_refused_at_the_handshake(keyed):
    stranger = keyed.keys.dir / "stranger.key_secret"
    result = keyed.ctl("drain", "w0", key=stranger)
    assert result.returncode == 1, describe(result)
    assert "refused our key" in result.stderr and "allow-list" in result.stderr, describe(result)
    raw = Raw(keyed, "stranger")
    try:
        assert raw.request(MSG_DRAIN, bytes_field(1, "w1"), timeout=1) is None
    finally:
        raw.close()
    public = read_cert(keyed.keys.public("stranger"))["public"]
    keyed.poll_until(lambda: public in keyed.duplexd.log_text(),
                     what="duplexd logging the refused key")
    assert_whole(keyed)


@pytest.mark.parametrize("key,command", [
    ("reader", ["drain", "w0"]),
    ("reader", ["cancel", "1"]),
    ("reader", ["submit", "JOB"]),
    ("workers", ["workers"]),
    ("workers", ["status"]),
    ("workers", ["drain", "w1"]),
    ("mallory", ["events"]),
])
def test_each_role_does_only_its_own(keyed, tmp_path, key, command):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(SIM_JOB))
    command = [str(job) if a == "JOB" else a for a in command]
    result = keyed.ctl(*command, key=keyed.keys.dir / f"{key}.key_secret")
    assert result.returncode == 1, describe(result)
    assert "FORBIDDEN" in result.stderr, describe(result)
    assert ("operator" in result.stderr or "worker keys" in result.stderr), describe(result)
    # the event is committed at the end of duplexd's loop turn, the reply
    # is not held back for it
    keyed.poll_until(lambda: any(f"key {key}" in e["detail"] for e in keyed.events("refused")),
                     what=f"a refused event naming key {key}",
                     progress=lambda: keyed.events("refused"))
    assert_whole(keyed)


def test_readers_read(keyed):
    result = keyed.ctl("workers", "--json", key=keyed.reader_key)
    assert result.returncode == 0, describe(result)
    assert {w["id"] for w in json.loads(result.stdout)["workers"]} == {"w0", "w1"}


def test_jobs_record_their_owner_and_who_stopped_them(keyed, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps(SIM_JOB))
    result = keyed.ctl("submit", job)
    assert result.returncode == 0, describe(result)
    jid = int(result.stdout.split()[1])
    doc = json.loads(keyed.ctl("status", jid, "--json").stdout)
    assert doc["owner"] == "operator", doc
    table = keyed.ctl("status").stdout
    assert "operator" in table, table
    result = keyed.ctl("cancel", jid, key=keyed.keys.dir / "op2.key_secret")
    assert result.returncode == 0, describe(result)
    doc = json.loads(keyed.ctl("status", jid, "--json").stdout)
    assert doc["state"] == "cancelled" and doc["reason"] == "cancelled by op2", doc
    queued = [e for e in keyed.events("job_queued")]
    assert any("by operator" in e["detail"] for e in queued), queued
    keyed.poll_until(lambda: all(w["state"] == "alive" and not w.get("job")
                                 for w in keyed.workers().values()),
                     what="workers free again")


def test_another_key_cannot_take_a_live_worker_id(keyed):
    """Attack 2: a Register with a live worker's id (and pid) made the real
    worker exit for good, and duplexd then believed forged reports."""
    w0 = keyed.workers()["w0"]
    raw = Raw(keyed, "mallory")  # a worker key, but for ids m* only
    try:
        text = expect_forbidden(raw.request(MsgType.REGISTER, register_body("w0", pid=w0["pid"])),
                                "may not speak for worker w0")
        assert "mallory" in text
        # a JobDone claiming 600 steps without a session of the rank's worker
        done = varint_field(1, 1) + varint_field(2, 1) + varint_field(4, 600) + varint_field(5, 1)
        reply = raw.request(MSG_JOB_DONE, done)
        assert reply is not None and reply.type == MsgType.ERROR, reply
        assert decode_error(reply.body).code in (ErrorCode.NOT_REGISTERED, ErrorCode.FORBIDDEN)
    finally:
        raw.close()
    assert_whole(keyed)


def test_a_host_key_speaks_only_for_that_hosts_ids(keyed):
    """host= alone binds the ids too (HOST-...): the host a Register names is
    the sender's own say, so it cannot widen what the key may be."""
    keyed.keys.gen("hostkey", "worker", "--host", "testhost")
    keyed.duplexd.send_signal(signal.SIGHUP)
    keyed.duplexd.expected_running = True
    keyed.poll_until(lambda: keyed.events("keys_reloaded"), what="the allow-list reloaded")
    raw = Raw(keyed, "hostkey")
    try:
        expect_forbidden(raw.request(MsgType.REGISTER, register_body("w0", host="testhost")),
                         "may not speak for worker w0")
        reply = raw.request(MsgType.REGISTER, register_body("testhost-gpu5", host="testhost"))
        assert reply is not None and reply.type == MsgType.REGISTER_ACK, reply
        reply = raw.request(MsgType.REGISTER, register_body("testhost-gpu6", host="elsewhere"))
        expect_forbidden(reply, "may not speak for worker testhost-gpu6")
    finally:
        raw.close()
    assert_whole(keyed)


def test_a_second_key_allowed_the_same_id_cannot_replace_the_live_session(tmp_path):
    """Even a key the allow-list lets register as w0 (a copy-paste slip, a
    second machine) cannot take w0 while its first key's session lives."""
    c = Cluster(tmp_path)
    try:
        twin = c.keys.gen("twin", "worker", "--ids", "w0")
        c.start_duplexd()
        c.start_worker("w0", 0)
        pid = c.worker_procs["w0"].pid
        raw = Raw(c, "twin")
        try:
            expect_forbidden(raw.request(MsgType.REGISTER, register_body("w0", pid=pid)),
                             "session belongs to key", "workers")
        finally:
            raw.close()
        assert twin.exists()
        assert c.workers()["w0"]["state"] == "alive"
        assert c.worker_procs["w0"].running()
        assert "registering again" not in c.worker_procs["w0"].log_text()
    finally:
        finish_cluster(c)


def test_removing_a_key_ends_its_sessions(tmp_path):
    """duplexd rereads --authorized on SIGHUP: a removed worker key's
    session ends (the worker is lost and cannot come back), a removed
    operator is refused from then on, everyone else goes on."""
    c = Cluster(tmp_path)
    try:
        w9_key = c.keys.gen("w9key", "worker", "--ids", "w9")
        op2 = c.keys.gen("op2", "operator")
        c.start_duplexd()
        c.start_worker("w0", 0)
        c.start_worker("w9", 1, "--key", w9_key)
        assert c.ctl("workers", key=op2).returncode == 0
        c.keys.rewrite(["operator", "reader", "workers"])
        c.duplexd.send_signal(signal.SIGHUP)
        c.duplexd.expected_running = True  # SIGHUP reloads, it does not stop
        c.poll_until(lambda: c.workers()["w9"]["state"] == "lost",
                     what="w9 lost after its key was removed")
        lost = c.events("lost", worker_id="w9")
        assert lost and "may no longer speak for it" in lost[-1]["detail"], lost
        reloaded = c.events("keys_reloaded")
        assert reloaded and "1 worker sessions ended" in reloaded[-1]["detail"], reloaded
        result = c.ctl("workers", key=op2)
        assert result.returncode == 1 and "refused our key" in result.stderr, describe(result)
        # w9 keeps knocking; it stays out
        c.poll_until(lambda: "refused our CURVE handshake" in c.worker_procs["w9"].log_text(),
                     what="w9 told its key is refused")
        assert c.workers()["w9"]["state"] == "lost"
        assert c.workers()["w0"]["state"] == "alive"
        assert c.duplexd.running()
    finally:
        finish_cluster(c)


def test_a_broken_allow_list_keeps_the_old_one(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start_duplexd()
        c.start_worker("w0", 0)
        c.keys.authorized.write_text("this is not a key line\n")
        c.duplexd.send_signal(signal.SIGHUP)
        c.duplexd.expected_running = True
        c.poll_until(lambda: "keeping the" in c.duplexd.log_text(),
                     what="duplexd refusing the broken allow-list")
        assert "authorized:1:" in c.duplexd.log_text()
        assert c.ctl("workers").returncode == 0
        assert c.workers()["w0"]["state"] == "alive"
    finally:
        finish_cluster(c)


def test_duplexd_refuses_an_open_port_without_keys(tmp_path):
    port = free_port()
    result = run_binary(DUPLEXD, "--listen", f"tcp://0.0.0.0:{port}", "--db",
                        tmp_path / "x.db", timeout=DEADLINE)
    assert result.returncode == 2, describe(result)
    assert "--insecure" in result.stderr and "--key" in result.stderr, describe(result)
    result = run_binary(DUPLEXD, "--listen", f"tcp://127.0.0.1:{port}", "--db",
                        tmp_path / "x.db", "--key", tmp_path / "none", timeout=DEADLINE)
    assert result.returncode != 0 and "--authorized" in result.stderr, describe(result)


def test_workers_refuse_to_talk_in_clear_unless_told(tmp_path):
    env = base_env()
    env.pop("DUPLEX_KEY", None)
    env.pop("DUPLEX_SERVER_KEY", None)
    unused = f"tcp://127.0.0.1:{free_port()}"
    result = run_binary(WORKER, "--coordinator", unused, "--backend", "sim", env=env)
    assert result.returncode == 2, describe(result)
    assert "--key" in result.stderr and "--insecure" in result.stderr, describe(result)


def test_a_secret_key_readable_by_others_is_refused(tmp_path):
    c = Cluster(tmp_path)
    try:
        os.chmod(c.worker_key, 0o644)
        unused = f"tcp://127.0.0.1:{free_port()}"
        result = run_binary(WORKER, "--coordinator", unused, "--backend", "sim", env=c.env)
        assert result.returncode == 2, describe(result)
        assert "chmod 600" in result.stderr, describe(result)
    finally:
        finish_cluster(c)


# -- the same attacks without keys: expected to succeed (documented) -------

def test_without_keys_a_stranger_can_drain_but_not_stop_a_worker(tmp_path):
    c = Cluster(tmp_path, secure=False)
    try:
        c.start_duplexd()
        c.start_worker("w0", 0)
        pid = c.worker_procs["w0"].pid
        raw = Raw(c)
        try:
            reply = raw.request(MSG_DRAIN, bytes_field(1, "w0"))
            assert reply is not None and reply.type == 21, reply  # Ok: drained by anyone
            reply = raw.request(MsgType.REGISTER, register_body("w0", pid=pid))
            assert reply is not None and reply.type == MsgType.REGISTER_ACK, reply
        finally:
            raw.close()
        # the replaced worker stands aside and stays up (systemd would not
        # restart an exit for good)
        w0 = c.worker_procs["w0"]
        c.poll_until(lambda: "registering again in" in w0.log_text(),
                     what="w0 standing aside")
        assert w0.running(), w0.log_tail()
        events = c.events("drained", worker_id="w0")
        assert events and "by anonymous" in events[-1]["detail"], events
    finally:
        finish_cluster(c)


# -- the data planes ---------------------------------------------------------

DATA_JOB = {
    "name": "data", "backend": "cpu",
    "model": {"vocab": 256, "d_model": 32, "layers": 2, "heads": 2, "experts": 2, "top_k": 1,
              "expert_hidden": 32, "shared_experts": 0, "seq_len": 32},
    "parallel": {"schedule": "1f1b", "pp": 2, "ep": 1, "dp": 1, "microbatches": 2,
                 "microbatch_size": 2},
    "train": {"steps": 4, "lr": 0.001, "seed": 5},
    "checkpoint": {"every": 1},
    "restart": {"max_restarts": 2, "backoff_ms": 0},
}
ACTIVATION_BYTES = 2 * 32 * 32 * 4  # [microbatch_size x seq_len][d_model] fp32


def data_frame(job_id, attempt, step, payload, path, mb, stage, layer, src, body):
    """A data-plane frame (docs/PROTOCOL.md, "The data plane")."""
    import struct
    return (b"DXD2" + struct.pack("<QIQiiiiii", job_id, attempt, step, payload, path, mb, stage,
                                  layer, src) + struct.pack("<q", 0) + body)


def forged_frames(job_id=1, attempt=1, steps=2):
    """Zero activations and gradients for every key a pp 2 job of two
    micro-batches could use in its first steps."""
    zeros = bytes(ACTIVATION_BYTES)
    return [data_frame(job_id, attempt, step, payload, 0, mb, stage, 0, src, zeros)
            for step in range(1, steps + 1) for payload in (0, 1) for mb in (0, 1)
            for stage in (0, 1) for src in (0, 1)]


def data_addr(c, wid):
    import re
    m = re.search(r"data plane (tcp://[0-9.]+:[0-9]+)", c.worker_procs[wid].log_text())
    assert m, c.worker_procs[wid].log_tail()
    return m.group(1)


def push_all(c, frames, key_name=None):
    """Push frames at every worker's data plane: in clear, or with one of
    the cluster's keys; returns how many sends ZeroMQ accepted."""
    sent = 0
    for wid in ("w0", "w1"):
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDTIMEO, 1000)
        if key_name:
            own = read_cert(c.keys.dir / f"{key_name}.key_secret")
            sock.curve_secretkey = own["secret"].encode()
            sock.curve_publickey = own["public"].encode()
            sock.curve_serverkey = read_cert(c.keys.public("workers"))["public"].encode()
        sock.connect(data_addr(c, wid))
        for f in frames:
            try:
                sock.send(f)
                sent += 1
            except zmq.Again:
                break
        sock.close()
    return sent


def run_job(c, tmp_path, name):
    spec = dict(DATA_JOB, name=name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    result = c.ctl("submit", path, "--wait", timeout=300)
    assert result.returncode == 0, describe(result)
    jid = int(result.stdout.split()[1])
    return json.loads(c.ctl("status", jid, "--json").stdout)


def test_forged_activations_never_reach_a_keyed_data_plane(tmp_path):
    """Attack 4: zero activations pushed before the job's real ones used to
    win (the real ones dropped as duplicates: a wrong loss, silently), and
    2^64-1 job ids filled the buffer for good. With keys, a data plane
    admits only the current assignment's peers."""
    c = Cluster(tmp_path)
    try:
        c.keys.gen("stranger", "worker", "--ids", "x", authorize=False)
        c.start_duplexd()
        c.start_worker("w0", 0, backend="cpu")
        c.start_worker("w1", 1, backend="cpu")
        push_all(c, forged_frames())                       # in clear
        push_all(c, forged_frames(), key_name="stranger")  # a key no assignment names
        push_all(c, [data_frame(2**64 - 1, 1, 1, 0, 0, 0, 1, 0, 0, b"")] * 2000)
        attacked = run_job(c, tmp_path, "attacked")
        assert attacked["state"] == "succeeded" and attacked["attempt"] == 1, attacked
        # the single-process trainer's losses, bitwise (pp 2 alone sums in
        # the same order)
        path = tmp_path / "standalone.json"
        path.write_text(json.dumps(DATA_JOB))
        alone = run_binary(WORKER, "--standalone", path, "--json", timeout=300)
        assert alone.returncode == 0, describe(alone)
        reference = [json.loads(line)["loss"] for line in alone.stdout.splitlines()]
        assert [e["loss"] for e in attacked["losses"]] == reference
        for wid in ("w0", "w1"):
            assert c.worker_procs[wid].running()
            log = c.worker_procs[wid].log_text()
            assert "No buffer space" not in log, log
        assert all(w["state"] == "alive" for w in c.workers().values())
    finally:
        finish_cluster(c)


def test_without_keys_a_forged_activation_gets_in_but_not_silently(tmp_path):
    """Without keys the frames get in (expected: docs/OPERATIONS.md,
    "Security"), and a forged frame that arrives first is trained on. But
    the real frame arriving second no longer vanishes as a duplicate: it
    fails the attempt, naming both senders, so the corruption is loud (a
    job_recovering event) rather than a quietly wrong run."""
    c = Cluster(tmp_path, secure=False)
    try:
        c.start_duplexd()
        c.start_worker("w0", 0, backend="cpu")
        c.start_worker("w1", 1, backend="cpu")
        push_all(c, forged_frames())
        attacked = run_job(c, tmp_path, "attacked")
        assert attacked["attempt"] >= 2, attacked  # the forged attempt failed
        recovering = [e for e in c.events("job_recovering")]
        assert any("a second " in e["detail"]
                   for e in recovering), recovering
        assert c.worker_procs["w0"].running() and c.worker_procs["w1"].running()
    finally:
        finish_cluster(c)
