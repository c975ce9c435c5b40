"""A fleet of 512 simulated workers against a real duplexd (issue 15): the
scaled-down run of bench/bench_fleet.c. The bench starts duplexd itself
(loopback, no keys, a temporary database, the default heartbeat interval
and dead-after) and simulates the workers in one process speaking the real
protocol; its --json document says what happened, and duplexd's own
events (read from its database) are what the assertions are about.

Real behaviour that must hold at any size: every worker registers, none is
declared lost while all of them heartbeat, a job placed over the whole
fleet reaches running (and succeeds), and a worker whose connection closes
is declared lost, alone, and a job that loses a worker runs again."""

import json
import subprocess

import pytest

from conftest import BIN_DIR, DUPLEXD, base_env

BENCH = BIN_DIR.parent / "bench" / "bench_fleet"
WORKERS = 512
# --quick bounds every phase (about 50 s in all); this only guards a hang
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def fleet():
    if not BENCH.exists():
        pytest.fail(f"{BENCH} is missing: build it (make BUILD=... BUILD/bench/bench_fleet; "
                    "make test-build does)")
    try:
        result = subprocess.run([str(BENCH), "--workers", str(WORKERS), "--quick", "--json",
                                 "--duplexd", str(DUPLEXD)],
                                capture_output=True, text=True, errors="replace",
                                timeout=TIMEOUT_S, env=base_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench_fleet did not finish within {TIMEOUT_S} s; so far:\n{exc.stderr}")
    assert result.returncode == 0, f"bench_fleet failed:\n{result.stderr}"
    runs = json.loads(result.stdout)["runs"]
    assert len(runs) == 1, result.stdout
    run = runs[0]
    run["log"] = result.stderr  # the readable report, for assertion messages
    return run


def test_every_worker_registers(fleet):
    assert fleet["workers"] == WORKERS
    assert fleet["registered"] == WORKERS, fleet["log"]
    assert fleet["register_s"] is not None, fleet["log"]


def test_no_worker_is_lost_while_all_heartbeat(fleet):
    assert fleet["steady_flaps"] == {"lost": 0, "returned": 0, "reregistered": 0}, fleet["log"]
    assert fleet["heartbeats_per_s"] > 0.8 * WORKERS * 1000 / fleet["heartbeat_ms"], fleet["log"]
    assert not fleet["errors"], fleet["log"]


def test_a_job_over_the_whole_fleet_runs(fleet):
    assert fleet["submit_error"] == "", fleet["log"]
    assert fleet["job_ranks"] == WORKERS
    assert fleet["assignments"] == WORKERS, fleet["log"]
    assert fleet["submit_to_running_s"] is not None, fleet["log"]
    assert fleet["job_state"] == "succeeded", fleet["log"]
    assert fleet["job_flaps"]["lost"] == 0, fleet["log"]


def test_a_crashed_worker_is_declared_lost_alone(fleet):
    assert fleet["crash_detect_s"] is not None, fleet["log"]
    assert fleet["crash_flaps"]["lost"] == 1, fleet["log"]


def test_a_job_that_loses_a_worker_runs_again(fleet):
    """The recovery phase: a running job over the whole fleet loses a
    worker (its socket closed); duplexd declares it lost, stops the
    others, places the job again once it is back, and every rank takes
    attempt 2 with no "busy" refusal (each confirmed its abort first)."""
    assert fleet["recovering_s"] is not None, fleet["log"]
    assert fleet["recovered_s"] is not None, fleet["log"]
    assert fleet["recovered_s"] > fleet["recovering_s"], fleet["log"]
    assert fleet["recovery_assignments"] == WORKERS, fleet["log"]
    assert fleet["recovery_busy_refusals"] == 0, fleet["log"]
    assert fleet["recovery_flaps"]["lost"] == 1, fleet["log"]


def test_duplexd_exits_cleanly(fleet):
    assert fleet["duplexd_exit_ok"], fleet["log"]
