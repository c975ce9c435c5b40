"""localcluster.py - a throwaway `duplexctl local` cluster for the benches:
duplexd and N workers in a temporary directory on a free port, started on
entry and stopped on exit (the directory is removed unless something
failed, so its logs can be read), with helpers to run duplexctl."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, build, backend, workers, name):
        self.bindir = os.path.join(os.path.abspath(build), "bin")
        self.ctl = os.path.join(self.bindir, "duplexctl")
        self.dir = tempfile.mkdtemp(prefix="%s-%s-" % (name, backend))
        self.addr = "tcp://127.0.0.1:%d" % free_port()
        self.backend = backend
        self.workers_n = workers
        self.name = name
        self.env = dict(os.environ, DUPLEX_COORDINATOR=self.addr)

    def run(self, *args, timeout=60):
        """duplexctl ARGS; its stdout, or RuntimeError with what it said."""
        p = subprocess.run([self.ctl] + list(args), env=self.env, cwd=self.dir,
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError("duplexctl %s failed (%d):\n%s%s" %
                               (" ".join(args), p.returncode, p.stdout, p.stderr))
        return p.stdout

    def __enter__(self):
        try:
            out = self.run("local", "up", "--workers", str(self.workers_n), "--backend",
                           self.backend, "--dir", self.dir, "--coordinator", self.addr, timeout=90)
            # the cluster's own keys (duplexd talks CURVE only): duplexctl's
            # operator key and duplexd's public key, as `local up` says them
            for line in out.splitlines():
                if line.startswith("its keys: export "):
                    for pair in line[len("its keys: export "):].split():
                        name, _, value = pair.partition("=")
                        self.env[name] = value
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.run("local", "down", "--dir", self.dir, timeout=60)
        except Exception as e:  # still remove the directory
            print("%s: local down: %s" % (self.name, e), file=sys.stderr)
        if exc[0] is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print("%s: logs kept in %s/logs" % (self.name, self.dir), file=sys.stderr)
        return False

    def workers(self):
        return json.loads(self.run("workers", "--json"))["workers"]

    def status(self, job_id):
        return json.loads(self.run("status", str(job_id), "--json"))

    def events(self):
        out = self.run("events", "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]
