#!/usr/bin/python3
"""Runs the test suites for one or more build directories and prints one summary.

usage: tests/run.py [--stage unit|fuzz|system ...] [-k NAME] [-m MARKEXPR] BUILD_DIR ...

For each build directory (e.g. build, build/asan) it runs the Criterion unit
test binaries in BUILD/tests/unit/ (stage "unit"), the fuzz-corpus replay
("fuzz") and the pytest system tests with DUPLEX_BIN=BUILD/bin ("system");
--stage (repeatable) runs only those stages.

-k NAME selects tests by name. Unit tests: a binary (test_jobs, or jobs),
a Criterion filter SUITE/TEST with * globs (jobs/*, */a_name), or any
other text, matched anywhere in SUITE/TEST. Fuzz replay: the targets whose
name holds NAME (fuzz_ckpt). System tests: pytest's -k expression (a NAME
with / or * is a Criterion filter only). -m MARKEXPR is pytest's -m, for
the system tests (e.g. -m 'not fake_gpu'). A -k or -m that selects no test
at all is an error.

Every skipped test is listed with its reason. The reason must match one
of the patterns of tests/skips.txt, the skips that are allowed; any other
skip counts as a failure. The last line is
"test: N passed, M failed, K skipped"; the exit status is non-zero on any
failure.
"""
import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"
SKIPS_FILE = os.path.join(REPO, "tests", "skips.txt")
STAGES = ("unit", "fuzz", "system")
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
# Criterion keeps a test green when LeakSanitizer reports at the end of it.
SANITIZER_REPORT = re.compile(r"ERROR: (LeakSanitizer|AddressSanitizer)|runtime error:")
CRITERION_SYNTHESIS = re.compile(
    r"Synthesis: Tested: (\d+) \| Passing: (\d+) \| Failing: (\d+) \| Crashing: (\d+)")
FUZZ_TARGETS = ("envelope", "ckpt", "cert", "authz")


class Result:
    """What one stage of one build gave: counts, and each skip with its reason."""

    def __init__(self):
        self.passed = self.failed = 0
        self.skips = []  # (test name, reason)

    def ran(self):
        return self.passed + self.failed + len(self.skips)


def run(cmd, env):
    shown = cmd if len(cmd) <= 8 else cmd[:3] + [f"... ({len(cmd) - 3} more arguments)"]
    print("+", " ".join(shown), flush=True)
    return subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")


def unit_binaries(unit_dir):
    if not os.path.isdir(unit_dir):
        return []
    return [n for n in sorted(os.listdir(unit_dir))
            if n.startswith("test_") and "." not in n
            and os.access(os.path.join(unit_dir, n), os.X_OK)]


def unit_tests(build, env, args):
    res = Result()
    unit_dir = os.path.join(REPO, build, "tests", "unit")
    names = unit_binaries(unit_dir)
    if not names:
        print(f"  no unit test binaries in {unit_dir}")
        res.failed += 1
        return res
    # -k: a binary's name runs all of it; anything else is a Criterion
    # filter on SUITE/TEST (as given when it has a /, else anywhere in it)
    pattern = None if args.k is None else args.k if "/" in args.k else f"*{args.k}*"
    for binary in (args.k, f"test_{args.k}"):
        if args.k is not None and binary in names:
            names, pattern = [binary], None
            break
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            report = os.path.join(tmp, f"{name}.json")
            cmd = [os.path.join(unit_dir, name), "--jobs=2", f"--json={report}"]
            proc = run(cmd + ([f"--filter={pattern}"] if pattern else []), env)
            p, f, skips = criterion_report(report, name, pattern)
            m = CRITERION_SYNTHESIS.search(proc.stdout)
            if m is None or int(m.group(3)) + int(m.group(4)) > f:
                f = max(f, 1)  # crashed before its synthesis, or its report lost a failure
            if (proc.returncode != 0 or SANITIZER_REPORT.search(proc.stdout)) and f == 0:
                f = 1  # a sanitizer report, or an exit status that says so
            if pattern and p + f + len(skips) == 0:
                continue  # the filter selected nothing here
            res.passed += p
            res.failed += f
            res.skips += skips
            if f:
                print(proc.stdout)
            print(f"  {name}: {p} passed, {f} failed, {len(skips)} skipped")
    return res


def criterion_report(path, binary, pattern=None):
    """(passed, failed, [(name, reason)]) from a Criterion --json report,
    by each test's own status (the synthesis line leaves skips out). The
    report lists the tests a --filter left out as skipped: those that do
    not match pattern are not counted."""
    passed = failed = 0
    skips = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return 0, 0, []
    for suite in doc.get("test_suites", []):
        for test in suite.get("tests", []):
            if pattern and not fnmatch.fnmatchcase(f"{suite.get('name')}/{test.get('name')}",
                                                   pattern):
                continue
            status = test.get("status")
            if status == "PASSED":
                passed += 1
            elif status == "SKIPPED":
                reason = " ".join(test.get("messages") or ["(no reason given)"])
                skips.append((f"{binary} {suite.get('name')}/{test.get('name')}", reason))
            else:  # FAILED, ERRORED (crashed, timed out)
                failed += 1
    return passed, failed, skips


def fuzz_replay(build, env, args):
    res = Result()
    for target in FUZZ_TARGETS:
        if args.k is not None and args.k not in f"fuzz_{target}":
            continue
        replay = os.path.join(REPO, build, "tests", "fuzz", f"fuzz_{target}_replay")
        corpus = os.path.join(REPO, "tests", "fuzz", f"corpus_{target}")
        files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
        proc = run([replay] + files, env)
        if proc.returncode == 0:
            print(f"  fuzz corpus replay ({target}): all {len(files)} inputs handled")
            res.passed += 1
        else:
            print(proc.stdout)
            print(f"  fuzz corpus replay ({target}): FAILED")
            res.failed += 1
    return res


# The system test files run SYSTEM_JOBS at a time (pytest-xdist, Debian's
# python3-pytest-xdist, which make deps installs), each file whole in one
# pytest worker (--dist loadfile: its module fixtures are made once, its
# tests run in order). Most of a system test's time is waiting (heartbeats,
# dead-after, restart back-off, the stall rule), so two files overlap well
# even on two cores. Every test keeps its own tmp_path, its own free port
# and its own processes (conftest.py), so files do not share anything.
# DUPLEX_SYSTEM_JOBS=1 runs them one after the other, in one process.
# (Two at a time under ASan once lost a sim job's first activation: a
# data-plane race, a connection closing with the old listener admitted
# after a rebind, fixed in worker/net/dataplane.c; the load of two files
# at a time is what made it show.)
SYSTEM_JOBS = 2


def parallel_args():
    jobs = int(os.environ.get("DUPLEX_SYSTEM_JOBS") or SYSTEM_JOBS)
    if jobs <= 1:
        return []
    try:
        import xdist  # noqa: F401 - only whether pytest can load it
    except ImportError:
        print("  (pytest-xdist is not installed: the system tests run one at a time; "
              "make deps installs python3-pytest-xdist)", flush=True)
        return []
    return ["-n", str(jobs), "--dist", "loadfile"]


def system_tests(build, env, args):
    res = Result()
    if args.k is not None and re.search(r"[/*]", args.k):
        print(f"  -k {args.k} is a Criterion filter: no system test selected")
        return res
    env = dict(env, DUPLEX_BIN=os.path.join(REPO, build, "bin"))
    select = (["-k", args.k] if args.k is not None else []) + \
        (["-m", args.m] if args.m is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        proc = run([PYTHON, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *parallel_args(), *select, "tests/system"], env)
        print(proc.stdout[-20000:] if proc.returncode not in (0, 5) else proc.stdout[-1500:])
        if proc.returncode == 5 and select:
            return res  # pytest's "no tests collected": nothing selected
        try:
            root = ET.parse(report).getroot()
        except (OSError, ET.ParseError):
            res.failed += 1
            return res
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            skipped = case.find("skipped")
            if case.find("failure") is not None or case.find("error") is not None:
                res.failed += 1
            elif skipped is not None:
                res.skips.append((name, skipped.get("message") or skipped.text or ""))
            else:
                res.passed += 1
        if proc.returncode not in (0, 5) and res.failed == 0:
            res.failed += 1  # pytest failed outside any test (collection, exit)
    return res


def allowed_skips():
    """tests/skips.txt: a regular expression a line, matched at the start
    of a skip's reason; # starts a comment line."""
    with open(SKIPS_FILE, encoding="utf-8") as f:
        return [re.compile(line.strip()) for line in f
                if line.strip() and not line.lstrip().startswith("#")]


def main(argv):
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="tests/run.py", description=parts[0], epilog="\n\n".join(parts[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", action="append", choices=STAGES,
                        help="run only this stage (repeatable; default: all three)")
    parser.add_argument("-k", metavar="NAME", help="only the tests NAME selects")
    parser.add_argument("-m", metavar="MARKEXPR", help="pytest -m, for the system tests")
    parser.add_argument("builds", nargs="+", metavar="BUILD_DIR")
    args = parser.parse_args(argv)
    stages = [s for s in STAGES if s in (args.stage or STAGES)]
    fns = {"unit": unit_tests, "fuzz": fuzz_replay, "system": system_tests}
    allowed = allowed_skips()

    passed = failed = ran = 0
    lines, skipped, refused = [], [], []
    for build in args.builds:
        env = dict(os.environ)
        if "asan" in build:
            env.update(SANITIZER_ENV)
        for stage in stages:
            print(f"== {build}: {stage}", flush=True)
            res = fns[stage](build, env, args)
            ok = [(n, r) for n, r in res.skips if any(p.match(r) for p in allowed)]
            bad = [(n, r) for n, r in res.skips if not any(p.match(r) for p in allowed)]
            passed += res.passed
            failed += res.failed + len(bad)
            ran += res.ran()
            skipped += [(build, n, r) for n, r in ok]
            refused += [(build, n, r) for n, r in bad]
            lines.append(f"{build:>12} {stage:<8} {res.passed:5d} passed "
                         f"{res.failed + len(bad):3d} failed {len(ok):3d} skipped")
    print("\n".join(["", "summary:"] + lines))
    if skipped:
        print(f"\nskipped ({len(skipped)}, each for a reason tests/skips.txt allows):")
        print("\n".join(f"  {b}: {n}: {r}" for b, n, r in skipped))
    if refused:
        print(f"\nskips counted as failures ({len(refused)}, their reason not allowed by "
              "tests/skips.txt):")
        print("\n".join(f"  {b}: {n}: {r}" for b, n, r in refused))
    if ran == 0 and (args.k is not None or args.m is not None):
        print("\nno test matched" + (f" -k {args.k}" if args.k is not None else "")
              + (f" -m {args.m!r}" if args.m is not None else ""))
        failed += 1
    print(f"test: {passed} passed, {failed} failed, {len(skipped)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
