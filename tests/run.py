#!/usr/bin/python3
"""Runs every test suite for one or more build directories and prints one summary.

usage: tests/run.py BUILD_DIR [BUILD_DIR ...]

For each build directory (e.g. build, build/asan) it runs the Criterion unit
test binaries in BUILD/tests/unit/, the fuzz-corpus replay, and the pytest
system tests with DUPLEX_BIN=BUILD/bin. The last line is
"test: N passed, M failed"; the exit status is non-zero on any failure.
"""
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
# Criterion keeps a test green when LeakSanitizer reports at the end of it.
SANITIZER_REPORT = re.compile(r"ERROR: (LeakSanitizer|AddressSanitizer)|runtime error:")
CRITERION_SYNTHESIS = re.compile(
    r"Synthesis: Tested: (\d+) \| Passing: (\d+) \| Failing: (\d+) \| Crashing: (\d+)")


def run(cmd, env):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")


def unit_tests(build, env):
    passed = failed = 0
    unit_dir = os.path.join(REPO, build, "tests", "unit")
    for name in sorted(os.listdir(unit_dir)) if os.path.isdir(unit_dir) else []:
        path = os.path.join(unit_dir, name)
        if not (name.startswith("test_") and os.access(path, os.X_OK) and "." not in name):
            continue
        proc = run([path, "--jobs=2"], env)
        m = CRITERION_SYNTHESIS.search(proc.stdout)
        p, f = (int(m.group(2)), int(m.group(3)) + int(m.group(4))) if m else (0, 0)
        if (proc.returncode != 0 or SANITIZER_REPORT.search(proc.stdout)) and f == 0:
            f = 1  # crashed before the synthesis, or a sanitizer report
        passed += p
        failed += f
        if f:
            print(proc.stdout)
        print(f"  {name}: {p} passed, {f} failed")
    return passed, failed


FUZZ_TARGETS = ("envelope", "ckpt", "cert", "authz")


def fuzz_replay(build, env):
    passed = failed = 0
    for target in FUZZ_TARGETS:
        replay = os.path.join(REPO, build, "tests", "fuzz", f"fuzz_{target}_replay")
        corpus = os.path.join(REPO, "tests", "fuzz", f"corpus_{target}")
        files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
        proc = run([replay] + files, env)
        if proc.returncode == 0:
            print(f"  fuzz corpus replay ({target}): all {len(files)} inputs handled")
            passed += 1
        else:
            print(proc.stdout)
            print(f"  fuzz corpus replay ({target}): FAILED")
            failed += 1
    return passed, failed


def system_tests(build, env):
    env = dict(env, DUPLEX_BIN=os.path.join(REPO, build, "bin"))
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        proc = run([PYTHON, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                    f"--junitxml={report}", "tests/system"], env)
        print(proc.stdout[-20000:] if proc.returncode else proc.stdout[-600:])
        try:
            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total = int(suite.get("tests"))
            bad = int(suite.get("failures")) + int(suite.get("errors"))
            skipped = int(suite.get("skipped"))
        except (OSError, ET.ParseError, AttributeError, TypeError):
            return 0, 1
        if proc.returncode != 0 and bad == 0:
            bad = 1
        return total - bad - skipped, bad


def main(builds):
    if not builds:
        print(__doc__)
        return 2
    totals = [0, 0]
    lines = []
    for build in builds:
        env = dict(os.environ)
        if "asan" in build:
            env.update(SANITIZER_ENV)
        for stage, fn in (("unit", unit_tests), ("fuzz-replay", fuzz_replay),
                          ("system", system_tests)):
            print(f"== {build}: {stage}", flush=True)
            p, f = fn(build, env)
            totals[0] += p
            totals[1] += f
            lines.append(f"{build:>12} {stage:<12} {p:5d} passed {f:3d} failed")
    print("\n".join(["", "summary:"] + lines))
    print(f"test: {totals[0]} passed, {totals[1]} failed")
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
