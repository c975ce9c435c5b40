"""systemd integration: the unit files in systemd/ and sd_notify(3).

1. `make install` into a temporary prefix installs the units, the example
   settings file (only when absent) and the sysusers.d file, and
   `systemd-analyze verify` accepts the installed units.
2. duplexd and duplex-worker, started with NOTIFY_SOCKET pointing at a
   datagram socket the test binds (as systemd does for Type=notify), send
   READY=1 once serving, WATCHDOG=1 every half WATCHDOG_USEC from their
   loops, and STOPPING=1 after SIGTERM.

Needs systemd-analyze (Debian package systemd) for the first part only.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import CTL, DEADLINE, DUPLEXD, REPO, WORKER, describe

UNITS = ("duplexd.service", "duplex-worker@.service")
# The watchdog period the tests ask for: pings come every half of it.
WATCHDOG_USEC = 200_000


# --------------------------------------------------------------------------
# unit files


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`make install` with PREFIX and SYSCONFDIR in a temporary directory.

    DESTDIR stays empty so that the installed units name binaries that exist
    (PREFIX/bin) and `systemd-analyze verify` can check them as they are.
    BINS names the binaries under test by absolute path: make has no rule
    for those, so it installs them as they are and never rebuilds anything
    (which would need the right BUILD and SANITIZE).
    """
    root = tmp_path_factory.mktemp("install")
    prefix, etc = root / "usr", root / "etc"
    make = ["make", "--no-print-directory", "-C", str(REPO), f"PREFIX={prefix}",
            f"SYSCONFDIR={etc}", "BINS=" + " ".join(str(p) for p in (DUPLEXD, WORKER, CTL))]
    result = subprocess.run([*make, "install"], capture_output=True, text=True,
                            timeout=DEADLINE * 3)
    assert result.returncode == 0, describe(result)
    return root, prefix, etc, make


def test_install_puts_units_and_settings(installed):
    _, prefix, etc, _ = installed
    unit_dir = prefix / "lib" / "systemd" / "system"
    for name in ("duplexd", "duplex-worker", "duplexctl"):
        assert os.access(prefix / "bin" / name, os.X_OK), name
    for unit in UNITS:
        text = (unit_dir / unit).read_text()
        # absolute paths rewritten to the prefix and the settings directory
        assert f"ExecStart={prefix}/bin/" in text, text
        assert f"EnvironmentFile=-{etc}/duplex/duplex.env" in text, text
        assert "/usr/local/" not in text, text
        assert "Type=notify" in text and "WatchdogSec=" in text, text
    assert (etc / "duplex" / "duplex.env").read_text() == \
        (REPO / "systemd" / "duplex.env").read_text()
    assert (prefix / "lib" / "sysusers.d" / "duplex.conf").is_file()


def test_install_keeps_edited_settings_and_uninstall(installed):
    _, prefix, etc, make = installed
    env_file = etc / "duplex" / "duplex.env"
    env_file.write_text("DUPLEX_COORDINATOR=tcp://head:7700\n")
    result = subprocess.run([*make, "install"], capture_output=True, text=True,
                            timeout=DEADLINE * 3)
    assert result.returncode == 0, describe(result)
    assert env_file.read_text() == "DUPLEX_COORDINATOR=tcp://head:7700\n"

    result = subprocess.run([*make, "uninstall"], capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 0, describe(result)
    for unit in UNITS:
        assert not (prefix / "lib" / "systemd" / "system" / unit).exists()
    assert not (prefix / "bin" / "duplexd").exists()
    assert env_file.exists(), "uninstall removed an edited settings file"
    # reinstall for the tests that follow (the edited settings file stays)
    result = subprocess.run([*make, "install"], capture_output=True, text=True,
                            timeout=DEADLINE * 3)
    assert result.returncode == 0, describe(result)


@pytest.mark.parametrize("unit", ["duplexd.service", "duplex-worker@0.service",
                                  "duplex-worker@7.service"])
def test_systemd_analyze_verify(installed, unit):
    """`systemd-analyze verify` on the installed units.

    verify exits non-zero for a missing ExecStart binary or a bad unit name,
    but only *warns* (exit 0) about unknown keys and unparsable values, so
    any message naming our unit files fails the test too. User=duplex needs
    no such user here: verify does not resolve users (systemd does that
    when it starts the service), so the units are checked unchanged.
    Messages about other units (the host's own) are not ours to judge.
    """
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    _, prefix, _, _ = installed
    unit_dir = prefix / "lib" / "systemd" / "system"
    # verify loads a template's instance from the template in the same
    # directory; SYSTEMD_UNIT_PATH lets After=duplexd.service resolve too
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:", SYSTEMD_LOG_COLOR="0")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_dir / unit)],
                            capture_output=True, text=True, timeout=DEADLINE, env=env)
    assert result.returncode == 0, describe(result)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "duplex" in line]
    assert not ours, describe(result)


def test_verify_catches_a_broken_unit(installed, tmp_path):
    """The check above can fail: a unit naming a missing binary does."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    _, prefix, _, _ = installed
    text = (prefix / "lib" / "systemd" / "system" / "duplexd.service").read_text()
    broken = tmp_path / "duplexd.service"
    broken.write_text(text.replace(f"{prefix}/bin/duplexd", f"{tmp_path}/no-such-duplexd"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode != 0, describe(result)


# --------------------------------------------------------------------------
# sd_notify


class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []  # (monotonic time, {key: value}) in arrival order

    def env(self, env):
        """env with NOTIFY_SOCKET and a watchdog asked for. WATCHDOG_PID is
        left unset: the child's pid is not known before it is spawned, and
        sd_watchdog_enabled(3) then takes the request for whichever process
        reads it (systemd itself always sets it to the main pid)."""
        env = dict(env, NOTIFY_SOCKET=self.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
        env.pop("WATCHDOG_PID", None)
        return env

    def receive(self, timeout):
        """Collect messages for up to timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key, timeout=DEADLINE, count=1):
        """Receive until count messages with key arrived; return the time and
        fields of the count-th."""
        deadline = time.monotonic() + timeout
        while True:
            found = [(t, fields) for t, fields in self.messages if key in fields]
            if len(found) >= count:
                return found[count - 1]
            left = deadline - time.monotonic()
            assert left > 0, f"{len(found)} of {count} {key} within {timeout}s; " \
                f"got {self.messages!r}"
            self.receive(min(left, 0.1))

    def drain(self):
        """Take every message already queued, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return
                fields = dict(line.split("=", 1) for line in data.decode().splitlines()
                              if "=" in line)
                self.messages.append((time.monotonic(), fields))
        finally:
            self.sock.setblocking(True)

    def since(self, t0, key):
        return [t for t, fields in self.messages if t >= t0 and key in fields]

    def close(self):
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sockets = []

    def make(name):
        s = NotifySocket(tmp_path / f"{name}.notify")
        sockets.append(s)
        return s

    yield make
    for s in sockets:
        s.close()


def check_notify_lifecycle(daemon, sock):
    """READY=1, then WATCHDOG=1 every half period, then STOPPING=1 on SIGTERM."""
    _, ready = sock.wait_for("READY")
    assert ready["READY"] == "1", ready
    assert ready.get("STATUS"), ready
    # the timer's period is half of WATCHDOG_USEC (the daemon's debug log),
    # and it keeps pinging: five pings in a row, however loaded the machine
    period_ms = WATCHDOG_USEC // 2000
    assert f"systemd watchdog: pinging every {period_ms} ms" in daemon.log_text(), \
        daemon.log_tail()
    sock.wait_for("WATCHDOG", count=5)
    assert not sock.since(0, "STOPPING"), sock.messages
    daemon.send_signal(signal.SIGTERM)
    sock.wait_for("STOPPING")
    assert daemon.wait() == 0, daemon.log_tail()


def test_duplexd_notifies_systemd(cluster, notify):
    sock = notify("duplexd")
    cluster.env = sock.env(cluster.env)
    duplexd = cluster.start_duplexd(wait=False)
    check_notify_lifecycle(duplexd, sock)


def test_worker_notifies_systemd(cluster, notify):
    cluster.start_duplexd()
    sock = notify("worker")
    cluster.env = sock.env(cluster.env)  # keeps the cluster's worker key
    worker = cluster.start_worker("sd-w0", 0)
    check_notify_lifecycle(worker, sock)


def test_no_watchdog_for_another_pid(cluster, notify):
    """WATCHDOG_PID naming another process: READY=1 but no pings."""
    sock = notify("duplexd")
    env = sock.env(cluster.env)
    env["WATCHDOG_PID"] = str(os.getpid())
    cluster.env = env
    duplexd = cluster.start_duplexd(wait=False)
    sock.wait_for("READY")
    # A watchdog timer fires at once, in the loop's first turn, before that
    # turn reads any request: once duplexd has answered one, a ping would be
    # queued on our socket already. Then none until it stops either.
    cluster.wait_answering()
    sock.drain()
    assert not sock.since(0, "WATCHDOG"), sock.messages
    duplexd.send_signal(signal.SIGTERM)
    sock.wait_for("STOPPING")
    assert duplexd.wait() == 0, duplexd.log_tail()
    sock.drain()
    assert not sock.since(0, "WATCHDOG"), sock.messages
    assert "systemd watchdog: pinging" not in duplexd.log_text(), duplexd.log_tail()


def test_quiet_outside_systemd(cluster):
    """Without NOTIFY_SOCKET nothing changes: duplexd serves and stops as before."""
    assert "NOTIFY_SOCKET" not in cluster.env
    duplexd = cluster.start_duplexd()
    duplexd.send_signal(signal.SIGTERM)
    assert duplexd.wait() == 0, duplexd.log_tail()
