"""Inputs checked where they are used (issue 14, "Trust"): duplexd refuses a
train.dataset the workers cannot train (as `duplex-worker --standalone`
does), a checkpoint.dir that climbs out with "..", and job names with
control characters, each naming the field; a worker refuses an assignment
whose checkpoint.dir leads outside its --checkpoint-root, writing nothing
there; and `duplexctl status` prints control characters in stored names and
reasons escaped."""

import json
import sqlite3
import time

import pytest

from conftest import WORKER, describe, run_binary, sanitized

# the smallest job the cpu backend trains: one rank, one micro-batch
TINY = {
    "name": "tiny", "backend": "cpu",
    "model": {"vocab": 256, "d_model": 16, "layers": 1, "heads": 2, "experts": 2, "top_k": 1,
              "expert_hidden": 16, "shared_experts": 0, "seq_len": 16},
    "parallel": {"schedule": "1f1b", "pp": 1, "ep": 1, "dp": 1, "microbatches": 1,
                 "microbatch_size": 1},
    "train": {"steps": 2, "lr": 0.001, "seed": 1},
    "checkpoint": {"every": 1},
    "restart": {"max_restarts": 0, "backoff_ms": 0},
}


def job_timeout():
    return 120 if sanitized() else 30


def spec_file(tmp_path, stem, **sections):
    """TINY with sections merged in (dicts) or fields replaced, as STEM.json."""
    spec = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        if isinstance(value, dict):
            spec[key].update(value)
        else:
            spec[key] = value
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps(spec))
    return path


def refused(c, path, field, *words):
    """submit is refused as a bad spec naming field (and words), with no
    control character in what duplexctl prints."""
    result = c.ctl("submit", path)
    assert result.returncode == 1, describe(result)
    assert "BAD_SPEC" in result.stderr and field in result.stderr, describe(result)
    for word in words:
        assert word in result.stderr, describe(result)
    assert "\x1b" not in result.stderr + result.stdout, describe(result)
    return result


@pytest.fixture
def coordinator(cluster):
    """duplexd alone: a spec is checked before anything is placed."""
    cluster.start_duplexd()
    return cluster


@pytest.mark.parametrize("dataset", ["/dev/zero", "../../etc/shadow", "License"])
def test_a_dataset_the_workers_lack_is_refused_by_both(coordinator, tmp_path, dataset):
    c = coordinator
    path = spec_file(tmp_path, "dataset", train={"dataset": dataset})
    refused(c, path, "train.dataset", dataset, "licenses")
    # --standalone reads specs with the same parser: it refuses the same
    alone = run_binary(WORKER, "--standalone", path, "--steps", 1)
    assert alone.returncode != 0, describe(alone)
    assert "train.dataset" in alone.stderr and dataset in alone.stderr, describe(alone)
    assert c.duplexd.running()


def test_the_builtin_dataset_is_accepted_by_both(coordinator, tmp_path):
    path = spec_file(tmp_path, "builtin", train={"dataset": "licenses"})
    dry = coordinator.ctl("submit", path, "--set", "backend=sim", "--dry-run")
    # nothing is alive to place it on: refused for capacity, not for the spec
    assert "BAD_SPEC" not in dry.stderr, describe(dry)
    alone = run_binary(WORKER, "--standalone", path, "--steps", 1, "--json",
                       timeout=job_timeout())
    assert alone.returncode == 0, describe(alone)
    assert json.loads(alone.stdout.splitlines()[0])["step"] == 1


@pytest.mark.parametrize("ckdir", ["../../outside", "..", "a/../../b", "/srv/duplex/../../tmp"])
def test_a_checkpoint_dir_with_dot_dot_is_refused(coordinator, tmp_path, ckdir):
    c = coordinator
    refused(c, spec_file(tmp_path, "dotdot", checkpoint={"dir": ckdir}), "checkpoint.dir", '".."')
    # by --set too
    set_result = c.ctl("submit", spec_file(tmp_path, "plain"), "--set", f"checkpoint.dir={ckdir}")
    assert set_result.returncode == 1, describe(set_result)
    assert "checkpoint.dir" in set_result.stderr, describe(set_result)
    alone = run_binary(WORKER, "--standalone", tmp_path / "dotdot.json", "--steps", 1)
    assert alone.returncode != 0 and "checkpoint.dir" in alone.stderr, describe(alone)


@pytest.mark.parametrize("name", ["two\nlines", "\x1b[2J\x1b[Hgotcha", "bell\x07", "del\x7f",
                                  "c1\u009b31m"])
def test_a_name_with_control_characters_is_refused(coordinator, tmp_path, name):
    refused(coordinator, spec_file(tmp_path, "name", name=name), "name", "control character")
    assert coordinator.duplexd.running()


def test_a_worker_keeps_checkpoints_under_its_root(cluster, tmp_path):
    c = cluster
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    c.start_duplexd()
    c.start_worker("w0", 0, "--checkpoint-root", root, backend="cpu")

    # a relative checkpoint.dir is taken from the root, not the working directory
    ok = c.ctl("submit", spec_file(tmp_path, "inside", checkpoint={"dir": "ck"}), "--wait",
               timeout=job_timeout())
    assert ok.returncode == 0 and "succeeded" in ok.stdout, describe(ok)
    shards = sorted((root / "ck").glob("job-*/step-*/*.ckpt"))
    assert len(shards) == 2, shards
    assert not (tmp_path / "ck").exists()

    # an absolute one outside the root: the worker refuses the assignment
    bad = c.ctl("submit", spec_file(tmp_path, "outside", checkpoint={"dir": str(outside / "ck")}),
                "--wait", timeout=job_timeout())
    assert bad.returncode != 0, describe(bad)
    assert "refused its assignment" in bad.stdout + bad.stderr, describe(bad)
    assert "checkpoint.dir" in bad.stdout + bad.stderr, describe(bad)
    log = c.worker_procs["w0"].log_text()
    assert "checkpoint.dir" in log and f"outside checkpoint root {root.resolve()}" in log, \
        c.worker_procs["w0"].log_tail()
    assert not outside.exists(), list(outside.rglob("*"))
    # nobody died over it, and the worker is not blamed: a second such job
    # fails the same way instead of blocklisting w0 (two failures would)
    again = c.ctl("submit", spec_file(tmp_path, "outside2", checkpoint={"dir": str(outside)}),
                  "--wait", timeout=job_timeout())
    assert again.returncode != 0 and "refused its assignment" in again.stdout + again.stderr, \
        describe(again)
    assert c.duplexd.running()
    w0 = c.workers()["w0"]
    assert w0["state"] == "alive" and not w0.get("blocklisted"), w0
    ok = c.ctl("submit", spec_file(tmp_path, "after", checkpoint={"dir": "ck2"}), "--wait",
               timeout=job_timeout())
    assert ok.returncode == 0 and "succeeded" in ok.stdout, describe(ok)


def test_a_checkpoint_root_that_is_not_there_stops_the_worker(cluster, tmp_path):
    c = cluster
    c.start_duplexd()
    w = c.start_worker("w9", 9, "--checkpoint-root", tmp_path / "missing", backend="cpu",
                       wait=False)
    w.expected_running = False
    assert w.wait() == 1
    assert "--checkpoint-root" in w.log_text() and "No such file" in w.log_text()


def test_status_escapes_control_characters_it_is_given(cluster, tmp_path):
    """A job stored before names were checked: status prints it escaped."""
    c = cluster
    c.start_duplexd()
    c.duplexd.terminate()
    assert c.duplexd.wait() == 0
    evil = "evil\x1b[2J\nname"
    conn = sqlite3.connect(c.db_path)
    try:
        # finished just now: within retention, so in memory again after the restart
        now = int(time.time() * 1000)
        conn.execute("INSERT INTO jobs (name, spec, backend, state, priority, workers, steps, "
                     "reason, submitted_ms, finished_ms) "
                     "VALUES (?, ?, 'sim', 'succeeded', 0, 2, 1, ?, 1, ?)",
                     (evil, json.dumps({"name": evil}), "done \x1b]0;title\x07", now))
        conn.commit()
    finally:
        conn.close()
    c.start_duplexd()
    table = c.ctl("status")
    one = c.ctl("status", 1)
    every = c.ctl("status", "--all")  # read from the database
    for result in (table, one, every):
        assert result.returncode == 0, describe(result)
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout, describe(result)
        assert "\\x1b" in result.stdout, describe(result)
    assert "evil\\x1b[2J\\x0aname" in one.stdout, describe(one)
