"""duplexctl frictions a new user hit (issue 18): events of a job that never
was, --help defaults, --config for duplexctl, status --watch without a job,
Ctrl-C on submit --wait, and the README's "Using it" commands."""

import json
import re
import signal
import subprocess
import time

import pytest

from conftest import CTL, REPO, describe, run_binary

FAST = {"name": "fast", "backend": "sim", "model": {"layers": 4, "experts": 8},
        "train": {"steps": 2},
        "parallel": {"schedule": "dualpipe", "pp": 2, "ep": 2, "microbatches": 4},
        "sim": {"f": 1, "b": 2, "w": 1, "fb": 3}}

# every duplexctl command, as `duplexctl ARGS --help` takes it
COMMANDS = [("workers",), ("workers", "forget"), ("local",), ("plan",), ("place",),
            ("submit",), ("status",), ("events",), ("cancel",), ("keys",), ("keys", "gen"),
            ("drain",), ("undrain",)]
# ctl/ctl.h CTL_DEFAULT_TIMEOUT_S, "(default 3)" in `duplexctl --help`
GLOBAL_TIMEOUT_S = "3"
LOCAL_TIMEOUT_S = "30"  # `local up` waits for its cluster that long


def submit(c, tmp_path, spec, *args, name="job.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    result = c.ctl("submit", path, *args)
    assert result.returncode == 0, describe(result)
    return int(result.stdout.split()[1])


def job_state(c, jid):
    result = c.ctl("status", jid, "--json")
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)["state"]


def test_events_of_a_job_that_never_was(sim4, tmp_path):
    c = sim4
    missing = c.ctl("status", 999)
    assert missing.returncode == 1 and "no job 999" in missing.stderr, describe(missing)
    result = c.ctl("events", 99)
    assert result.returncode == 1, describe(result)
    assert "no job 99" in result.stderr and result.stdout == "", describe(result)
    jid = submit(c, tmp_path, FAST)
    c.poll_until(lambda: job_state(c, jid) == "succeeded", what="the job to succeed")
    ok = c.ctl("events", jid)
    assert ok.returncode == 0 and f"job {jid}" in ok.stdout, describe(ok)


def help_text(*args):
    result = run_binary(CTL, *args, "--help")
    assert result.returncode == 0, describe(result)
    return result.stdout


@pytest.mark.parametrize("args", [()] + COMMANDS, ids=lambda a: " ".join(a) or "global")
def test_help_shows_each_default_once(args):
    out = help_text(*args)
    for line in out.splitlines():
        assert line.count("(default") <= 1, f"{args}: {line!r}"
        if line.strip().startswith("--timeout"):
            shown = re.search(r"\(default:?[^)]*?(\d+)\)", line)
            assert shown, f"{args}: --timeout shows no default: {line!r}"
            want = LOCAL_TIMEOUT_S if args == ("local",) else GLOBAL_TIMEOUT_S
            assert shown.group(1) == want, f"{args}: {line!r}"


def test_global_help_offers_config():
    assert "--config FILE" in help_text()


def test_ctl_takes_a_config_file(sim4, tmp_path):
    c = sim4
    config = tmp_path / "ctl.json"
    config.write_text(json.dumps({"coordinator": c.addr, "timeout": 10,
                                  "key": str(c.operator_key),
                                  "server-key": str(c.server_pub)}))
    result = run_binary(CTL, "--config", config, "workers", "--json", env=c.env)
    assert result.returncode == 0, describe(result)
    assert len(json.loads(result.stdout)["workers"]) == 4
    # a flag wins over the file
    result = run_binary(CTL, "--config", config, "--coordinator", "tcp://127.0.0.1:1",
                        "--timeout", 1, "workers", env=c.env)
    assert result.returncode == 1 and "tcp://127.0.0.1:1" in result.stderr, describe(result)
    config.write_text(json.dumps({"coordinater": c.addr}))
    bad = run_binary(CTL, "--config", config, "workers", env=c.env)
    assert bad.returncode == 2 and "unknown key \"coordinater\"" in bad.stderr, describe(bad)


def test_status_watch_lists_a_bounded_screen(sim4, tmp_path):
    c = sim4
    ids = [submit(c, tmp_path, dict(FAST, name=f"fast{i}"), name=f"job{i}.json")
           for i in range(7)]
    c.poll_until(lambda: all(job_state(c, j) == "succeeded" for j in ids),
                 what="seven jobs to succeed", timeout=60)
    argv = [str(CTL), "--coordinator", c.addr, "--timeout", "10", *c.curve_args(),
            "status", "--watch"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=c.env, stdin=subprocess.DEVNULL)
    time.sleep(2.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert "\033" not in out, out
    screens = [s for s in out.split("\n\n") if s.strip()]
    assert len(screens) >= 2, out  # it did repeat
    for screen in screens:
        rows = [line for line in screen.splitlines() if re.match(r"\s*\d+\s", line)]
        assert len(rows) == 5, screen  # the 5 newest finished ones
        assert {int(r.split()[0]) for r in rows} == set(ids[-5:]), screen
        assert "2 older finished jobs not shown" in screen, screen


def test_ctrl_c_on_submit_wait_says_the_job_goes_on(sim4, tmp_path):
    c = sim4
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(dict(FAST, name="slow", train={"steps": 100000})))
    argv = [str(CTL), "--coordinator", c.addr, "--timeout", "10", *c.curve_args(),
            "submit", str(path), "--wait"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=c.env, stdin=subprocess.DEVNULL)
    first = proc.stdout.readline()
    assert first.startswith("job ") and "submitted" in first, first
    jid = int(first.split()[1])
    c.poll_until(lambda: job_state(c, jid) == "running", what="the job to run")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, (out, err)
    assert f"job {jid} keeps running" in err, err
    assert f"duplexctl cancel {jid}" in err, err
    assert job_state(c, jid) == "running"
    result = c.ctl("cancel", jid)
    assert result.returncode == 0, describe(result)


def readme_using_it():
    text = (REPO / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh", 1)[1].split("```", 1)[0]


def test_readme_takes_the_cluster_down_last():
    cmds = [line.split("#")[0].strip() for line in readme_using_it().splitlines()]
    cmds = [cmd for cmd in cmds if cmd.startswith("build/bin/")]
    down = cmds.index("build/bin/duplexctl local down")
    up = next(i for i, cmd in enumerate(cmds) if "local up" in cmd)
    uses = [i for i, cmd in enumerate(cmds)
            if re.match(r"build/bin/duplexctl (submit|status|workers|events)", cmd)]
    assert uses and all(up < i < down for i in uses), cmds
    # the cluster has what the job asks for: workers and backend
    spec = json.loads((REPO / "examples" / "dualpipe.json").read_text())
    p = spec["parallel"]
    need = p["pp"] * p["ep"] * p.get("dp", 1)
    m = re.search(r"local up --workers (\d+)(?: --backend (\w+))?", cmds[up])
    assert m and int(m.group(1)) >= need, cmds[up]
    assert (m.group(2) or "cpu") == spec["backend"], cmds[up]
