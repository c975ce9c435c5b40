"""Failures and recovery on the cpu backend, with real processes: a worker
killed with SIGKILL at a random moment (several seeds), two failures in a
row and one during a recovery, a restart budget that runs out, a torn
checkpoint, and a hung worker (SIGSTOP). Every recovered job must end with
final parameters bitwise equal to a run that never failed."""

import json
import random
import re
import signal
import time

from conftest import describe, sanitized

STEPS = 80
EVERY = 4
SPEC = {
    "name": "recover", "backend": "cpu",
    "model": {"vocab": 256, "d_model": 16, "layers": 4, "heads": 2, "experts": 4,
              "top_k": 2, "expert_hidden": 16, "shared_experts": 1, "seq_len": 16},
    "parallel": {"schedule": "dualpipe", "pp": 4, "ep": 2, "dp": 1, "microbatches": 8,
                 "microbatch_size": 2},
    "train": {"steps": STEPS, "lr": 0.002, "seed": 5},
    "checkpoint": {"every": EVERY},
    "restart": {"max_restarts": 3, "backoff_ms": 200},
}


def job_timeout():
    return 600 if sanitized() else 120


def start(c, workers, dead_after_ms=3000):
    # a killed worker's closed connection is noticed within two heartbeats;
    # a long dead-after keeps a loaded CI machine from losing live workers
    c.dead_after_ms = dead_after_ms
    c.start_duplexd()
    for gpu in range(workers):
        c.start_worker(f"w{gpu}", gpu, backend="cpu", wait=False)
    for gpu in range(workers):
        c.wait_worker_alive(f"w{gpu}")


def submit(c, tmp_path, name, **restart):
    spec = json.loads(json.dumps(SPEC))
    spec["name"] = name
    spec["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    spec["restart"].update(restart)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    result = c.ctl("submit", path)
    assert result.returncode == 0, describe(result)
    return int(result.stdout.split()[1])


def status(c, jid):
    result = c.ctl("status", jid, "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def wait_for(c, jid, pred, what):
    seen = {}

    def check():
        seen.update(status(c, jid))
        return pred(seen)
    c.poll_until(check, timeout=job_timeout(), what=f"job {jid}: {what}",
                 progress=lambda: (seen.get("state"), seen.get("step"), seen.get("reason")))
    return seen


def finished(c, jid, state="succeeded"):
    st = wait_for(c, jid, lambda s: s["state"] in ("succeeded", "failed", "cancelled"), "to end")
    assert st["state"] == state, (st["state"], st["reason"], c.ctl("events", jid).stdout,
                                  c.ctl("workers").stdout)
    return st


def final_shards(st):
    """{file: bytes} of the job's last checkpoint."""
    from pathlib import Path
    assert st["checkpoint"] and st["checkpoint"]["step"] == STEPS, st
    d = Path(st["checkpoint"]["dir"])
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.ckpt"))}


def job_workers(c, jid):
    return [w for w in c.workers().values() if w["assigned_job"] == jid]


def kill9(c, worker_id):
    c.worker_procs[worker_id].kill9()


def restart_worker(c, worker_id):
    """What systemd's Restart= does for a worker that died."""
    c.start_worker(worker_id, int(worker_id[1:]), backend="cpu")


def events(c, jid, kind):
    result = c.ctl("events", *([jid] if jid else []), "--json")
    assert result.returncode == 0, describe(result)
    return [e for e in map(json.loads, result.stdout.splitlines()) if e["kind"] == kind]


def reference(c, tmp_path):
    return final_shards(finished(c, submit(c, tmp_path, "reference")))


def test_a_killed_worker_is_replaced_and_the_result_is_bitwise_the_same(cluster, tmp_path):
    c = cluster
    start(c, 9)  # one spare
    want = reference(c, tmp_path)
    killed = set()  # a worker killed twice would be blocklisted, rightly
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        jid = submit(c, tmp_path, f"seed{seed}")
        at = rng.randrange(2, STEPS // 2)
        st = wait_for(c, jid, lambda s: s["state"] != "placing" and s["step"] >= at, f"step {at}")
        assert st["state"] == "running", f"the job ended before step {at} was seen: {st}"
        victim = rng.choice([w["id"] for w in job_workers(c, jid) if w["id"] not in killed])
        killed.add(victim)
        kill9(c, victim)
        st = finished(c, jid)
        assert st["attempt"] >= 2, st
        recovered = events(c, jid, "job_recovered")
        assert recovered, events(c, jid, "job_recovering")
        assert final_shards(st) == want, f"seed {seed}: killed {victim} at step {at}"
        lost = [e for e in events(c, 0, "lost") if e["worker_id"] == victim]
        assert lost and "no heartbeat" in lost[-1]["detail"], lost
        restart_worker(c, victim)


def test_two_failures_in_a_row_and_one_during_recovery(cluster, tmp_path):
    c = cluster
    start(c, 11)  # spares enough even if a loaded machine costs a worker
    want = reference(c, tmp_path)
    jid = submit(c, tmp_path, "thrice", backoff_ms=1000, max_restarts=10)
    wait_for(c, jid, lambda s: s["state"] == "running" and s["step"] >= 8, "step 8")
    first = job_workers(c, jid)[0]["id"]
    kill9(c, first)
    # the next attempt is being started: one of its new workers dies at once
    wait_for(c, jid, lambda s: s["attempt"] >= 2, "attempt 2 placed")
    second = job_workers(c, jid)[-1]["id"]
    kill9(c, second)
    wait_for(c, jid, lambda s: s["attempt"] >= 3 and s["state"] == "running", "attempt 3 runs")
    # the third failure comes a few steps into attempt 3; the killed workers
    # come back only after it (started before, under load, their start-up
    # could outlast attempt 3's 64 steps and leave nothing to kill)
    at = status(c, jid)["step"] + 8
    wait_for(c, jid, lambda s: s["step"] >= at, f"step {at}")
    third = job_workers(c, jid)[0]["id"]
    kill9(c, third)
    for w in (first, second, third):
        restart_worker(c, w)
    st = finished(c, jid)
    assert st["attempt"] >= 4, st
    assert len(events(c, jid, "job_recovered")) >= 2
    assert final_shards(st) == want


def test_a_job_fails_when_its_restart_budget_is_spent(cluster, tmp_path):
    c = cluster
    start(c, 10)
    jid = submit(c, tmp_path, "budget", max_restarts=1)
    wait_for(c, jid, lambda s: s["state"] == "running" and s["step"] >= 4, "step 4")
    kill9(c, job_workers(c, jid)[0]["id"])
    wait_for(c, jid, lambda s: s["state"] == "running" and s["attempt"] >= 2, "attempt 2 runs")
    kill9(c, job_workers(c, jid)[0]["id"])
    st = finished(c, jid, "failed")
    assert "no restarts left (restart.max_restarts 1)" in st["reason"], st


def test_a_torn_checkpoint_falls_back_to_the_previous_one(cluster, tmp_path):
    c = cluster
    start(c, 9)
    want = reference(c, tmp_path)
    jid = submit(c, tmp_path, "torn")
    wait_for(c, jid, lambda s: s["checkpoint"] and s["checkpoint"]["step"] >= 12, "step 12 saved")
    # freeze the job so no newer checkpoint completes, tear the latest, kill the ranks
    ranks = job_workers(c, jid)
    for w in ranks:
        c.worker_procs[w["id"]].proc.send_signal(signal.SIGSTOP)
    # reports sent before the stop may still complete a newer checkpoint:
    # take the latest once it has stayed the same for a second
    latest, since = status(c, jid)["checkpoint"], time.monotonic()
    while time.monotonic() - since < 1.0:
        time.sleep(0.2)
        now = status(c, jid)["checkpoint"]
        if now != latest:
            latest, since = now, time.monotonic()
    from pathlib import Path
    shard = sorted(Path(latest["dir"]).glob("*.ckpt"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    # kill every rank: a rank left running could still complete a newer
    # checkpoint that another rank reported before the stop, and the job would
    # then (rightly) resume from that one; systemd brings the workers back
    for w in ranks:
        kill9(c, w["id"])
    for w in ranks:
        restart_worker(c, w["id"])
    st = finished(c, jid)
    bad = events(c, jid, "checkpoint_bad")
    assert bad and shard.name in bad[0]["detail"], bad
    assert final_shards(st) == want


STALL = re.compile(r"stalled: no step finished for ([\d.]+) s \(limit ([\d.]+) s\); "
                   r"worker (\S+) silent for ([\d.]+) s")


def test_a_hung_worker_is_detected_as_a_stall(cluster, tmp_path):
    """A SIGSTOPped rank stays connected but sends nothing: duplexd's stall
    rule (no step for 10 recent step times, at least 5 s) fails the job,
    naming the silent worker, long before dead-after (a minute) could have
    declared it lost; the job recovers and ends bitwise like the
    reference."""
    c = cluster
    dead_after_s = 60  # heartbeats alone would take a minute
    start(c, 9, dead_after_ms=dead_after_s * 1000)
    want = reference(c, tmp_path)
    jid = submit(c, tmp_path, "hang")
    wait_for(c, jid, lambda s: s["state"] == "running" and s["step"] >= 8, "step 8")
    hung = job_workers(c, jid)[2]["id"]
    proc = c.worker_procs[hung].proc
    proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(c, jid, lambda s: s["state"] == "recovering", "recovering")
        stalled = c.events("job_stalled")
        # duplexd's own clock: the stall rule fired (idle past its limit), on
        # the hung worker, while its silence was still short of dead-after
        assert len(stalled) == 1 and stalled[0]["worker_id"] == hung, stalled
        m = STALL.search(stalled[0]["detail"])
        assert m and m.group(3) == hung, stalled
        idle, limit, silent = float(m.group(1)), float(m.group(2)), float(m.group(4))
        assert limit <= idle and silent < dead_after_s, stalled
        st = finished(c, jid)  # without the hung worker
    finally:
        proc.send_signal(signal.SIGCONT)
    # the stall, not a lost worker, failed the job: if the hung worker was
    # declared lost at all (a slow recovery, past dead-after), only after
    lost = c.events("lost", hung)
    assert all(e["id"] > stalled[0]["id"] for e in lost), (stalled, lost)
    assert st["attempt"] == 2, st
    assert final_shards(st) == want


def test_duplexd_killed_mid_job_loses_nothing(cluster, tmp_path):
    c = cluster
    start(c, 8)
    want = reference(c, tmp_path)
    jid = submit(c, tmp_path, "coordinator")
    wait_for(c, jid, lambda s: s["state"] == "running" and s["step"] >= 10, "step 10")
    c.duplexd.kill9()
    time.sleep(1.0)  # the workers train on, keeping their reports
    c.start_duplexd()
    st = finished(c, jid)
    assert [e["step"] for e in st["losses"]] == list(range(1, STEPS + 1)), st["losses"]
    assert all(e["loss"] > 0 for e in st["losses"]), st["losses"]
    saved = sorted(int(e["detail"].split()[1].rstrip(":")) for e in events(c, jid, "checkpoint"))
    assert saved == list(range(EVERY, STEPS + 1, EVERY)), saved
    assert events(c, jid, "job_resumed"), "the restart is recorded"
    assert final_shards(st) == want
