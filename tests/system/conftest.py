"""Shared helpers and fixtures for the duplex system tests.

The tests drive the real binaries (duplexd, duplex-worker, duplexctl) as
separate processes.  Everything a test starts lives under its tmp_path, uses
a random free port, logs to a file there, and is stopped in fixture teardown.

Binaries come from $DUPLEX_BIN if set, else <repo>/build/bin.

Besides fixtures, this module holds a tiny hand-written protobuf encoder and
decoder for duplex.Envelope (proto/duplex.proto); test_bad_input.py imports
them with ``from conftest import ...``.
"""

import enum
import functools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections import namedtuple
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("DUPLEX_BIN") or REPO / "build" / "bin").resolve()
DUPLEXD = BIN_DIR / "duplexd"
WORKER = BIN_DIR / "duplex-worker"
CTL = BIN_DIR / "duplexctl"

# Upper bound for anything that normally takes about a second.  Polls return
# as soon as their condition holds, so this only costs time on failure.
DEADLINE = 20.0
# --timeout given to duplexctl for ordinary queries (it must not be what
# makes a slow sanitizer build fail).
CTL_TIMEOUT = 10
# How many lines of each daemon log to show when something fails.
LOG_TAIL_LINES = 40

# Sanitizer reports in a log or on stderr always fail the test.
SANITIZER_REPORT = re.compile(
    r"ERROR: (AddressSanitizer|LeakSanitizer|ThreadSanitizer|MemorySanitizer)"
    r"|WARNING: ThreadSanitizer"
    r"|:\d+:\d+: runtime error: "  # UBSan
)


@functools.lru_cache(maxsize=None)
def sanitized():
    """True when the binaries under test are an ASan/UBSan build (slower)."""
    if os.environ.get("DUPLEX_SANITIZED"):
        return os.environ["DUPLEX_SANITIZED"] not in ("0", "")
    try:
        data = DUPLEXD.read_bytes()
    except OSError:
        return False
    return b"__asan_init" in data or b"__ubsan_handle" in data


def timing_slack_s():
    """Extra seconds allowed on timing assertions (more under sanitizers)."""
    return 3.0 if sanitized() else 0.5


@pytest.fixture(scope="session", autouse=True)
def _require_binaries():
    missing = [str(p) for p in (DUPLEXD, WORKER, CTL)
               if not (os.access(p, os.X_OK) and p.stat().st_size > 0)]
    if missing:
        pytest.exit("duplex binaries missing or not executable (build them first, or set "
                    "DUPLEX_BIN): " + ", ".join(missing), returncode=1)


# --------------------------------------------------------------------------
# small generic helpers


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env():
    """Environment for spawned programs: no inherited DUPLEX_COORDINATOR, and
    the binaries under test first on PATH (so duplexctl local finds them)."""
    env = dict(os.environ)
    env.pop("DUPLEX_COORDINATOR", None)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


def poll_until(predicate, timeout=DEADLINE, what="condition", interval=0.05,
               ignore=(), on_timeout=None):
    """Call predicate() until it returns something truthy; return that value.

    Exceptions of the types in `ignore` count as "not yet"; any other
    exception propagates at once.  On timeout raise AssertionError naming
    `what`, the last value seen, and on_timeout() (e.g. log tails) if given.
    """
    deadline = time.monotonic() + timeout
    last, last_exc = None, None
    while True:
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except ignore as exc:  # noqa: PERF203 - retry is the point
            last_exc = exc
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:.1f}s waiting for {what}; last value: {last!r}"
            if last_exc is not None:
                msg += f"\nlast error: {last_exc}"
            if on_timeout is not None:
                msg += "\n" + on_timeout()
            raise AssertionError(msg)
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


def describe(result):
    """Human-readable summary of a CompletedProcess for assertion messages."""
    return (f"$ {' '.join(map(str, result.args))}\nexit status {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")


class CtlError(AssertionError):
    """duplexctl did not give a usable answer."""


def ctl(*args, env=None, timeout=DEADLINE):
    """Run duplexctl with the given arguments; return the CompletedProcess."""
    argv = [str(CTL), *map(str, args)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                timeout=timeout, env=env or base_env(),
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout}s "
                             f"(stderr so far: {exc.stderr!r})") from None
    if SANITIZER_REPORT.search(result.stderr):
        raise AssertionError("sanitizer report from duplexctl:\n" + describe(result))
    return result


def run_binary(path, *args, timeout=DEADLINE, env=None):
    """Run one of the binaries to completion (for --help, bad options...)."""
    argv = [str(path), *map(str, args)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=env or base_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(argv)} did not exit within {timeout}s") from None


def db_query(db_path, sql, params=()):
    """Run a read-only query on a duplex SQLite database; return all rows."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def pid_running(pid):
    """True while process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def kill_if_duplex(pid, sig=signal.SIGKILL):
    """Send `sig` to pid, but only if it still is one of our programs (guards
    against pid reuse when cleaning up processes we did not spawn)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"duplex" in cmdline and pid_running(pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# processes


class Daemon:
    """One spawned long-running program with its output in a log file."""

    def __init__(self, name, argv, log_path, cwd, env, expect_exit=False):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        # False once the test kills it or expects it to exit by itself.
        self.expected_running = not expect_exit
        self.proc = None

    def start(self):
        with open(self.log_path, "ab") as log:
            log.write(f"=== {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd,
                                         env=self.env, start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid

    @property
    def returncode(self):
        return self.proc.poll()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.expected_running = False
        if self.running():
            self.proc.send_signal(sig)

    def kill9(self):
        """SIGKILL and reap."""
        self.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=DEADLINE)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout=DEADLINE):
        """Wait for exit; return the exit status, or fail with the log tail."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) did not exit within "
                                 f"{timeout}s\n{self.log_tail()}") from None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=LOG_TAIL_LINES):
        return format_log_tail(self.log_path, n)


def format_log_tail(path, n=LOG_TAIL_LINES):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        lines = ["(no log file)"]
    return f"----- {path} (last {min(n, len(lines))} of {len(lines)} lines) -----\n" + \
        "\n".join(lines[-n:])


CERT_KEY = re.compile(r'^\s+(public|secret)-key = "(.{40})"\s*$', re.M)


def read_cert(path):
    """{"public": Z85, "secret": Z85 or None} of a ZeroMQ certificate file."""
    keys = dict(m.groups() for m in CERT_KEY.finditer(Path(path).read_text()))
    return {"public": keys["public"], "secret": keys.get("secret")}


class Keys:
    """CURVE keys made with `duplexctl keys gen` in one directory, and the
    allow-list duplexd reads (--authorized): one line per key made, in the
    order made."""

    def __init__(self, root):
        self.dir = Path(root) / "keys"
        self.authorized = self.dir / "authorized"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.authorized.write_text("# allow-list of a test cluster\n")
        self.lines = {}  # name -> its allow-list line

    def gen(self, name, role, *extra, authorize=True):
        """Make NAME.key/NAME.key_secret; list it (unless authorize=False)
        and return the secret file's path."""
        result = ctl("keys", "gen", "--role", role, "--name", name, "--out", self.dir, *extra)
        assert result.returncode == 0, describe(result)
        if role != "server":
            self.lines[name] = result.stdout.strip()
            if authorize:
                with open(self.authorized, "a") as f:
                    f.write(self.lines[name] + "\n")
        return self.dir / f"{name}.key_secret"

    def public(self, name):
        return self.dir / f"{name}.key"

    def rewrite(self, names):
        """The allow-list with only these keys' lines."""
        self.authorized.write_text("# allow-list of a test cluster\n" + "".join(
            self.lines[n] + "\n" for n in names))


class Cluster:
    """duplexd and workers for one test, all under `root`.

    Daemons are started on demand; stop_all() (called by the fixtures) stops
    whatever still runs and reports anything suspicious.

    By default the cluster has CURVE keys (secure=True): duplexd's, an
    operator's (duplexctl via ctl()), a reader's, and one worker key for any
    worker id ("workers", also in self.env as $DUPLEX_KEY so that workers
    started with their own argv find it). secure=False runs everything with
    --insecure.
    """

    def __init__(self, root, heartbeat_ms=200, dead_after_ms=1000, secure=True):
        self.root = Path(root)
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.db_path = self.root / "duplex.db"
        self.heartbeat_ms = heartbeat_ms
        self.dead_after_ms = dead_after_ms
        self.env = base_env()
        self.daemons = []        # every Daemon ever started, in order
        self.duplexd = None      # the current coordinator
        self.worker_procs = {}   # worker id -> its latest Daemon
        self.adopted = []        # (name, pid) started by others, e.g. `local up`
        self.secure = secure
        self.keys = None
        if secure:
            self.keys = Keys(self.root)
            self.keys.gen("duplexd", "server")
            self.operator_key = self.keys.gen("operator", "operator")
            self.reader_key = self.keys.gen("reader", "reader")
            self.worker_key = self.keys.gen("workers", "worker", "--ids", "*")
            self.server_pub = self.keys.public("duplexd")
            self.env["DUPLEX_KEY"] = str(self.worker_key)
            self.env["DUPLEX_SERVER_KEY"] = str(self.server_pub)

    def curve_args(self, key=None):
        """duplexctl's or a worker's flags for this cluster: key (default the
        operator's) and duplexd's public key; --insecure without keys."""
        if not self.secure:
            return ["--insecure"]
        return ["--key", key or self.operator_key, "--server-key", self.server_pub]

    def curve_socket(self, sock, key_name="operator"):
        """Make a pyzmq socket a CURVE client of this cluster's duplexd with
        the named key (or leave it in clear without keys); returns it."""
        if self.secure:
            own = read_cert(self.keys.dir / f"{key_name}.key_secret")
            sock.curve_secretkey = own["secret"].encode()
            sock.curve_publickey = own["public"].encode()
            sock.curve_serverkey = read_cert(self.server_pub)["public"].encode()
        return sock

    # -- starting things --------------------------------------------------

    def spawn(self, name, argv, expect_exit=False):
        n = sum(1 for d in self.daemons if d.name == name)
        log = self.log_dir / (f"{name}.log" if n == 0 else f"{name}.{n + 1}.log")
        daemon = Daemon(name, argv, log, cwd=self.root, env=self.env,
                        expect_exit=expect_exit)
        self.daemons.append(daemon)
        return daemon.start()

    def duplexd_argv(self, *extra, listen=None, db=None):
        keys = (["--key", self.keys.dir / "duplexd.key_secret", "--authorized",
                 self.keys.authorized] if self.secure else [])
        return [DUPLEXD, "--listen", listen or self.addr, "--db", db or self.db_path,
                "--heartbeat-ms", self.heartbeat_ms, "--dead-after-ms", self.dead_after_ms,
                "--log-level", "debug", *keys, *extra]

    def start_duplexd(self, *extra, wait=True):
        """Start (or restart) the coordinator; by default wait until it answers."""
        self.duplexd = self.spawn("duplexd", self.duplexd_argv(*extra))
        if wait:
            self.wait_answering()
        return self.duplexd

    def start_worker(self, worker_id, gpu, *extra, backend="sim", wait=True):
        """Start a worker with an explicit id; by default wait until duplexd
        lists this very process (by pid) as alive."""
        keys = [] if self.secure else ["--insecure"]  # with keys: $DUPLEX_KEY in self.env
        argv = [WORKER, "--coordinator", self.addr, "--backend", backend,
                "--id", worker_id, "--gpu", gpu, "--host", "testhost",
                "--node", f"node{gpu // 2}", "--log-level", "debug", *keys, *extra]
        daemon = self.spawn(f"worker-{worker_id}", argv)
        self.worker_procs[worker_id] = daemon
        if wait:
            self.wait_worker_alive(worker_id)
        return daemon

    def adopt(self, name, pid):
        """Remember a process someone else started so teardown can kill it."""
        self.adopted.append((name, pid))

    # -- waiting ------------------------------------------------------------

    def check_daemons(self):
        """Fail at once if a daemon died that the test expects to be running."""
        for d in self.daemons:
            if d.expected_running and not d.running():
                d.expected_running = False  # report once
                raise AssertionError(f"{d.name} (pid {d.pid}) exited unexpectedly with "
                                     f"status {d.returncode}\n{d.log_tail()}")

    def poll_until(self, predicate, timeout=DEADLINE, what="condition", ignore=(),
                   progress=None):
        """poll_until() that also fails fast when a daemon dies, and on
        timeout reports progress() (what was last seen) and the log tails."""
        def checked():
            self.check_daemons()
            return predicate()

        def on_timeout():
            seen = ""
            if progress is not None:
                try:
                    seen = f"last seen: {progress()!r}\n"
                except Exception as exc:  # noqa: BLE001 - only for the message
                    seen = f"(could not get progress: {exc})\n"
            return seen + self.log_tails()
        return poll_until(checked, timeout=timeout, what=what, ignore=ignore,
                          on_timeout=on_timeout)

    def wait_answering(self, timeout=DEADLINE):
        """Wait until `duplexctl workers --json` gets an answer."""
        return self.poll_until(lambda: self.workers(ctl_timeout=2) is not None,
                               timeout=timeout, what=f"duplexd to answer on {self.addr}",
                               ignore=(CtlError,))

    def wait_states(self, expected, timeout=DEADLINE):
        """Wait until each worker id in `expected` has the given state;
        return the workers dict seen then."""
        seen = {}

        def matches():
            ws = self.workers()
            seen["states"] = {wid: w["state"] for wid, w in ws.items()}
            return ws if all(ws.get(wid, {}).get("state") == state
                             for wid, state in expected.items()) else None
        return self.poll_until(matches, timeout=timeout, what=f"worker states {expected}",
                               ignore=(CtlError,), progress=lambda: seen.get("states"))

    def wait_worker_alive(self, worker_id, timeout=DEADLINE):
        """Wait until duplexd shows `worker_id` alive with the pid of the
        process we started last for it."""
        pid = self.worker_procs[worker_id].pid
        seen = {}

        def ok():
            w = seen["worker"] = self.workers().get(worker_id)
            return w if w and w["state"] == "alive" and w["pid"] == pid else None
        return self.poll_until(ok, timeout=timeout, ignore=(CtlError,),
                               what=f"worker {worker_id} (pid {pid}) to be alive",
                               progress=lambda: seen.get("worker"))

    def wait_event(self, kind, worker_id=None, count=1, timeout=DEADLINE):
        """Wait until at least `count` events of `kind` (for worker_id) exist."""
        def enough():
            evs = self.events(kind, worker_id)
            return evs if len(evs) >= count else None
        return self.poll_until(enough, timeout=timeout,
                               what=f"{count} {kind!r} event(s) for {worker_id or 'any worker'}",
                               progress=self.events)

    # -- querying -------------------------------------------------------------

    def ctl(self, *args, ctl_timeout=CTL_TIMEOUT, timeout=None, key=None):
        """duplexctl against this cluster's coordinator, with the operator's
        key (or `key`, a secret certificate's path)."""
        return ctl("--coordinator", self.addr, "--timeout", ctl_timeout, *self.curve_args(key),
                   *args, env=self.env, timeout=timeout or ctl_timeout + DEADLINE)

    def workers_list(self, ctl_timeout=CTL_TIMEOUT):
        """The "workers" list of `duplexctl workers --json`, as printed."""
        result = self.ctl("workers", "--json", ctl_timeout=ctl_timeout)
        if result.returncode != 0:
            raise CtlError("duplexctl workers --json failed:\n" + describe(result))
        try:
            doc = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"workers --json printed invalid JSON ({exc}):\n"
                                 + describe(result)) from None
        assert isinstance(doc, dict) and isinstance(doc.get("workers"), list), \
            f"unexpected JSON shape: {doc!r}"
        return doc["workers"]

    def workers(self, ctl_timeout=CTL_TIMEOUT):
        """`duplexctl workers --json` as {id: worker dict}."""
        return {w["id"]: w for w in self.workers_list(ctl_timeout=ctl_timeout)}

    def states(self):
        return {wid: w["state"] for wid, w in self.workers().items()}

    def db_query(self, sql, params=()):
        return db_query(self.db_path, sql, params)

    def events(self, kind=None, worker_id=None):
        """Rows of the events table as dicts, oldest first, optionally filtered."""
        sql = "SELECT id, ts_ms, kind, worker_id, detail FROM events WHERE 1=1"
        params = []
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        if worker_id is not None:
            sql += " AND worker_id = ?"
            params.append(worker_id)
        rows = self.db_query(sql + " ORDER BY id", params)
        return [dict(zip(("id", "ts_ms", "kind", "worker_id", "detail"), r)) for r in rows]

    def worker_rows(self):
        """The workers table as {id: {column: value}}."""
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM workers")}
        finally:
            conn.close()

    # -- diagnostics and teardown --------------------------------------------

    def log_files(self):
        return sorted(self.root.rglob("*.log"), key=lambda p: (p.stat().st_mtime, str(p)))

    def log_tails(self, n=LOG_TAIL_LINES):
        files = self.log_files()
        if not files:
            return "(no daemon logs)"
        return "\n".join(format_log_tail(p, n) for p in files)

    def stop_all(self):
        """Stop everything still running (workers first, so their Goodbye can
        reach duplexd); return a list of problems found on the way."""
        problems = []
        live = [d for d in self.daemons if d.running()]
        workers = [d for d in live if d.name.startswith("worker-")]
        others = [d for d in live if d not in workers]
        for group in (workers, others):
            for d in group:
                d.terminate()
            deadline = time.monotonic() + DEADLINE / 2
            for d in group:
                try:
                    rc = d.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    problems.append(f"{d.name} (pid {d.pid}) ignored SIGTERM for "
                                    f"{DEADLINE / 2:.0f}s; killed")
                    d.proc.kill()
                    d.proc.wait()
                    continue
                if rc != 0:
                    problems.append(f"{d.name} exited with status {rc} on SIGTERM")
        for _name, pid in self.adopted:
            kill_if_duplex(pid)
        for path in self.log_files():
            text = path.read_text(errors="replace")
            if SANITIZER_REPORT.search(text):
                problems.append(f"sanitizer report in {path}")
        return problems


def finish_cluster(cluster):
    """Fixture teardown: stop the cluster and fail loudly on problems."""
    problems = cluster.stop_all()
    if problems:
        pytest.fail("problems at teardown:\n  " + "\n  ".join(problems) + "\n"
                    + cluster.log_tails(), pytrace=False)


@pytest.fixture
def cluster(tmp_path):
    """An empty Cluster (nothing started) in tmp_path: heartbeat 200 ms,
    dead-after 1000 ms."""
    c = Cluster(tmp_path)
    yield c
    finish_cluster(c)


@pytest.fixture
def sim4(cluster):
    """duplexd and four sim workers, two per node."""
    cluster.start_duplexd()
    for gpu, wid in enumerate(("w0", "w1", "w2", "w3")):
        cluster.start_worker(wid, gpu, wait=False)
    for wid in ("w0", "w1", "w2", "w3"):
        cluster.wait_worker_alive(wid)
    return cluster


def pytest_configure(config):
    """The markers the system tests use (pytest -m; tests/run.py -m)."""
    config.addinivalue_line(
        "markers", "fake_gpu: runs the cuda backend or duplex-gpucheck on the fake GPU stack "
        "(libfakecuda.so, tests/fake/); deselect with -m 'not fake_gpu'")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tails of all daemon logs to the report of a failed test."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    seen = set()
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Cluster) and id(value) not in seen:
            seen.add(id(value))
            report.sections.append((f"duplex logs ({value.root})", value.log_tails()))


# --------------------------------------------------------------------------
# protocol: hand-written protobuf for duplex.Envelope and friends

PROTOCOL_VERSION = 2  # proto/envelope.h DX_PROTOCOL_VERSION


class MsgType(enum.IntEnum):
    REGISTER = 1
    REGISTER_ACK = 2
    HEARTBEAT = 3
    GOODBYE = 4
    ERROR = 5
    LIST_WORKERS = 6
    LIST_WORKERS_REPLY = 7


class ErrorCode(enum.IntEnum):
    TOO_LARGE = 1
    MALFORMED = 2
    BAD_VERSION = 3
    UNKNOWN_TYPE = 4
    BAD_BODY = 5
    INVALID = 6
    UNEXPECTED = 7
    NOT_REGISTERED = 8
    SESSION_REPLACED = 9
    BAD_SPEC = 10
    NO_CAPACITY = 11
    NOT_IMPLEMENTED = 12
    FORBIDDEN = 13


def encode_varint(n):
    if n < 0:
        n += 1 << 64  # int32/int64 negatives are 10-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(number, value):
    """A varint field; omitted when 0, as proto3 does."""
    return encode_varint(number << 3) + encode_varint(value) if value else b""


def bytes_field(number, data):
    """A length-delimited field (str is UTF-8 encoded); omitted when empty."""
    if isinstance(data, str):
        data = data.encode()
    return encode_varint(number << 3 | 2) + encode_varint(len(data)) + data if data else b""


def envelope(msg_type, body=b"", *, version=PROTOCOL_VERSION, request_id=0):
    return (varint_field(1, version) + varint_field(2, int(msg_type))
            + varint_field(3, request_id) + bytes_field(4, body))


def register_body(worker_id, *, host="testhost", node="node0", gpu=0, backend="sim",
                  capabilities=(), pid=None):
    return (bytes_field(1, worker_id) + bytes_field(2, host) + bytes_field(3, node)
            + varint_field(4, gpu) + bytes_field(5, backend)
            + b"".join(bytes_field(6, c) for c in capabilities)
            + varint_field(7, os.getpid() if pid is None else pid))


def register_ack_body(session_id, heartbeat_interval_ms=200, dead_after_ms=1000):
    return (bytes_field(1, session_id) + varint_field(2, heartbeat_interval_ms)
            + varint_field(3, dead_after_ms))


def heartbeat_body(worker_id, session_id, activity=1, job_id=0, step=0):
    return (bytes_field(1, worker_id) + bytes_field(2, session_id)
            + varint_field(3, activity) + varint_field(4, job_id) + varint_field(5, step))


def goodbye_body(worker_id, session_id, reason="test"):
    return bytes_field(1, worker_id) + bytes_field(2, session_id) + bytes_field(3, reason)


def read_varint(buf, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def parse_fields(buf):
    """Decode protobuf wire format into {field number: [values]}; varints are
    ints, length-delimited fields bytes.  Raises ValueError if malformed."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated fixed field")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields, number, default):
    return fields.get(number, [default])[-1]  # proto3: the last one wins


Envelope = namedtuple("Envelope", "version type request_id body")
ErrorMsg = namedtuple("ErrorMsg", "code text")


def decode_envelope(frame):
    f = parse_fields(frame)
    return Envelope(_last(f, 1, 0), _last(f, 2, 0), _last(f, 3, 0), _last(f, 4, b""))


def decode_error(body):
    f = parse_fields(body)
    return ErrorMsg(_last(f, 1, 0), _last(f, 2, b"").decode(errors="replace"))


def decode_list_workers_reply(body):
    """[{worker_id, state, pid}] from a ListWorkersReply body."""
    out = []
    for info in parse_fields(body).get(1, []):
        f = parse_fields(info)
        out.append({"worker_id": _last(f, 1, b"").decode(),
                    "state": _last(f, 6, b"").decode(),
                    "pid": _last(f, 8, 0)})
    return out
