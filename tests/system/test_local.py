"""`duplexctl local up/down`: a whole cluster on this machine in the background."""

import socket
from pathlib import Path

import pytest

from conftest import DEADLINE, ctl, describe, free_port, pid_running


class LocalDir:
    """A `duplexctl local` directory and the commands run on it."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.dir = cluster.root / "local"
        self.addr = f"tcp://127.0.0.1:{free_port()}"
        # The test's Cluster is only used for its env, log collection and
        # teardown; point its queries at the local cluster's coordinator.
        cluster.addr = self.addr
        cluster.db_path = self.dir / "duplex.db"
        # and its queries at the keys `local up` makes for its cluster
        cluster.operator_key = self.dir / "keys" / "operator.key_secret"
        cluster.server_pub = self.dir / "keys" / "duplexd.key"

    def pid_file(self, name):
        return self.dir / "run" / f"{name}.pid"

    def read_pid(self, name):
        text = self.pid_file(name).read_text().strip()
        assert text.isdigit(), f"{self.pid_file(name)} holds {text!r}, not a pid"
        return int(text)

    def adopt_running(self):
        """Let teardown kill whatever the pid files name, whatever happens."""
        for path in sorted((self.dir / "run").glob("*.pid")):
            text = path.read_text().strip()
            if text.isdigit():
                self.cluster.adopt(path.stem, int(text))

    def ctl(self, *args, timeout=3 * DEADLINE):
        return ctl("local", *args, "--dir", self.dir, env=self.cluster.env, timeout=timeout)

    def up(self, workers=2):
        result = self.ctl("up", "--workers", workers, "--backend", "sim",
                          "--coordinator", self.addr)
        if (self.dir / "run").is_dir():
            self.adopt_running()
        return result

    def down(self):
        return self.ctl("down")


@pytest.fixture
def local(cluster):
    ld = LocalDir(cluster)
    yield ld
    if (ld.dir / "run").is_dir():
        ld.adopt_running()  # cluster's teardown SIGKILLs anything left


NAMES = ("duplexd", "worker-0", "worker-1")


def test_local_up_and_down(local):
    up = local.up(workers=2)
    assert up.returncode == 0, describe(up) + "\n" + local.cluster.log_tails()
    assert local.addr in up.stdout, f"`local up` should print the coordinator address:\n{up.stdout}"

    pids = {name: local.read_pid(name) for name in NAMES}
    for name, pid in pids.items():
        assert pid_running(pid), f"{name} (pid {pid}) from {local.pid_file(name)} is not running"
    for name in NAMES:
        log = local.dir / "logs" / f"{name}.log"
        assert log.is_file(), f"missing log {log}"
    assert (local.dir / "duplex.db").is_file()

    host = socket.gethostname()
    workers = local.cluster.workers()
    assert sorted(workers) == [f"{host}-gpu0", f"{host}-gpu1"], workers
    for k in range(2):
        w = workers[f"{host}-gpu{k}"]
        assert w["state"] == "alive", w
        assert w["gpu"] == k, w
        assert w["backend"] == "sim", w
        assert w["pid"] == pids[f"worker-{k}"], f"pid file and duplexd disagree: {w}"

    again = local.up(workers=2)
    assert again.returncode != 0, describe(again)
    assert "already running" in again.stderr + again.stdout, describe(again)
    assert {name: local.read_pid(name) for name in NAMES} == pids, "pid files changed"
    for name, pid in pids.items():
        assert pid_running(pid), f"second `local up` disturbed {name}"

    down = local.down()
    assert down.returncode == 0, describe(down)
    still = [f"{name} (pid {pid})" for name, pid in pids.items() if pid_running(pid)]
    assert not still, f"still running after `local down`: {still}"
    for name in NAMES:
        assert not local.pid_file(name).exists(), f"{local.pid_file(name)} not removed"

    # Workers were stopped with SIGTERM while duplexd still ran: they left.
    rows = local.cluster.worker_rows()
    assert {wid: r["state"] for wid, r in rows.items()} == \
        {f"{host}-gpu0": "left", f"{host}-gpu1": "left"}, rows
    assert sorted(e["worker_id"] for e in local.cluster.events("left")) == sorted(rows)

    down_again = local.down()
    assert down_again.returncode == 0, describe(down_again)
    assert (down_again.stdout + down_again.stderr).strip(), \
        "`local down` with nothing running should say so"


def test_local_down_on_fresh_dir(local):
    result = local.down()
    assert result.returncode == 0, describe(result)
    assert (result.stdout + result.stderr).strip(), "`local down` should print a message"
    assert not Path(local.dir / "run" / "duplexd.pid").exists()


def test_commands_find_the_default_local_clusters_keys(cluster):
    """`local up` with the default --dir (var/local, here under the test's
    own working directory) makes CURVE keys; duplexctl run there then needs
    no key flags, as the README's commands assume."""
    import subprocess
    from conftest import CTL, base_env

    env = base_env()
    env.pop("DUPLEX_KEY", None)
    env.pop("DUPLEX_SERVER_KEY", None)
    addr = f"tcp://127.0.0.1:{free_port()}"
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(CTL), "--coordinator", addr, *args], cwd=cluster.root, env=env, text=True,
        capture_output=True, timeout=3 * DEADLINE)
    up = run("local", "up", "--workers", "1", "--backend", "sim", "--coordinator", addr)
    try:
        assert up.returncode == 0, describe(up)
        keys = cluster.root / "var" / "local" / "keys"
        assert (keys / "operator.key_secret").stat().st_mode & 0o777 == 0o600
        listing = run("workers")
        assert listing.returncode == 0 and "alive" in listing.stdout, describe(listing)
        insecure = run("--insecure", "workers")
        assert insecure.returncode != 0 and "speaks CURVE" in insecure.stderr, describe(insecure)
    finally:
        for path in sorted((cluster.root / "var" / "local" / "run").glob("*.pid")):
            text = path.read_text().strip()
            if text.isdigit():
                cluster.adopt(path.stem, int(text))
        run("local", "down")
