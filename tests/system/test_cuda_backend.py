"""`duplex-worker --backend cuda`: on a machine without the GPU stack it
refuses to start with a message naming every missing piece (the driver,
NCCL, cuBLASLt; their paths can be given), and nothing else needs them; on
the fake GPU stack (tests/fake/) the whole GPU check runs, and cuda workers
train the parity job like the single-process CPU trainer."""

import ctypes
import json
import re
import subprocess
import sys

import pytest

from conftest import (BIN_DIR, REPO, SANITIZER_REPORT, WORKER, describe, run_binary,
                      sanitized)

GPUCHECK = BIN_DIR / "duplex-gpucheck"  # built only where nvcc is: it embeds the kernels
# Only what runs the real kernels' images needs nvcc: the tests on the fake
# GPU stack (marked fake_gpu) run in every build, the fake's kernels being
# the CPU references (a build without nvcc gives it placeholder images).
needs_gpucheck = pytest.mark.skipif(not GPUCHECK.exists(),
                                    reason="built without nvcc: no duplex-gpucheck")

# Parity with the CPU trainer on the fake stack (its kernels are the CPU
# references; only summation orders differ), measured on the plain build
# and bounded at 10-15x that, so that a real bug cannot hide under the
# issue's 1e-4 (which is for a GPU's own kernels: tests/gpu/train_check.py):
# every fp32 job's losses within 1.8e-8 to 3.8e-8 relative: bound 4e-7
CUDA_REL_LOSS = 4e-7
# fp8 dispatch: 6.7e-8 here, 3.9e-6 in train_check.py's pp 2 x ep 2 (a tiny
# difference can move a value across an e4m3 rounding boundary): 4e-5
FP8_REL_LOSS = 4e-5
# final parameters (test_train.assert_params_close): 2.6e-6 to 4.3e-6: 5e-5
CUDA_PARAM_TOL = 5e-5
# bf16 GEMM inputs against the fp32 CPU run: 2.2e-5 (and over 1e-7): 3e-4
CUDA_BF16_REL_LOSS = 3e-4
# the CPU trainer's fp8 dispatch against its fp32 one: 1.2e-5 (and over 1e-7): 2e-4
FP8_MOVES_LOSS = 2e-4


def have_driver():
    """A driver that loads and initialises (a GPU machine)."""
    try:
        return ctypes.CDLL("libcuda.so.1").cuInit(0) == 0
    except (OSError, AttributeError):
        return False


def cuda_worker(*args):
    result = run_binary(WORKER, "--backend", "cuda", "--id", "gpu-test",
                        "--coordinator", "tcp://127.0.0.1:1", "--insecure", *args, timeout=20)
    assert not SANITIZER_REPORT.search(result.stderr), describe(result)
    return result


def test_a_missing_driver_is_named():
    if have_driver():
        pytest.skip("a GPU machine: the worker starts")
    result = cuda_worker()
    assert result.returncode == 1, describe(result)
    assert "the cuda backend cannot start: libcuda.so.1 (the NVIDIA driver) cannot be " \
           "loaded" in result.stderr, describe(result)


def test_every_missing_library_is_named_with_its_path():
    result = cuda_worker("--cuda-lib", "/nonexistent/libcuda.so", "--nccl-lib",
                         "/nonexistent/libnccl.so.2", "--cublaslt-lib", "/nonexistent/lt.so")
    assert result.returncode == 1, describe(result)
    for piece in ("/nonexistent/libcuda.so (the NVIDIA driver)",
                  "/nonexistent/libnccl.so.2 (NCCL)", "/nonexistent/lt.so (cuBLASLt)"):
        assert piece in result.stderr, describe(result)


@needs_gpucheck
def test_the_gpu_check_says_what_is_missing():
    if have_driver():
        pytest.skip("a GPU machine: run tests/gpu/run.sh there")
    result = run_binary(GPUCHECK, "--small", timeout=20)
    assert not SANITIZER_REPORT.search(result.stderr), describe(result)
    assert result.returncode == 2, describe(result)
    assert "libcuda.so.1 (the NVIDIA driver) cannot be loaded" in result.stderr, describe(result)


FAKE = BIN_DIR.parent / "lib" / "libfakecuda.so"  # tests/fake/: the GPU stack on the host


def fake_stack():
    assert FAKE.exists(), f"{FAKE} is missing: make test-build builds it"
    return ["--cuda-lib", str(FAKE), "--nccl-lib", str(FAKE), "--cublaslt-lib", str(FAKE)]


def cuda_spec(tmp_path, name, **parallel):
    """The worker issue's parity job as a cuda job (test_train's spec)."""
    from test_train import spec_with

    path = spec_with(tmp_path, name, **parallel)
    spec = json.loads(path.read_text())
    spec["backend"] = "cuda"
    path.write_text(json.dumps(spec))
    return path


def loss_parity(losses, reference, bound, what):
    """Every step's loss of a job ({"step", "loss"} entries) within bound,
    relative, of the standalone run's at that step; prints and returns the
    largest relative difference."""
    worst = 0.0
    for entry in losses:
        ref = reference[entry["step"] - 1]
        rel = abs(entry["loss"] - ref) / abs(ref)
        assert rel <= bound, \
            f"{what}: step {entry['step']}: {entry['loss']!r} vs {ref!r} ({rel:.3g} > {bound:.0e})"
        worst = max(worst, rel)
    print(f"{what}: losses within {worst:.3g} of the standalone run's")
    return worst


def ended_job(c, jid):
    """duplexctl status JOB --json once the job ended (past any recovery)."""
    status = {}

    def ended():
        result = c.ctl("status", jid, "--json")
        status.update(json.loads(result.stdout) if result.returncode == 0 else {})
        return status.get("state") in ("succeeded", "failed", "cancelled")
    c.poll_until(ended, timeout=600 if sanitized() else 120, what=f"job {jid} to end")
    return status


def cuda_workers(c, n, *args):
    """duplexd and n workers on the fake GPU stack, one fake GPU each."""
    c.env["FAKECUDA_DEVICES"] = str(n)
    c.start_duplexd("--nccl-lib", str(FAKE))
    for gpu in range(n):
        c.start_worker(f"g{gpu}", gpu, *fake_stack(), *args, backend="cuda", wait=False)
    for gpu in range(n):
        c.wait_worker_alive(f"g{gpu}")


@pytest.mark.fake_gpu
def test_a_worker_on_a_gpu_it_does_not_have_says_so():
    result = cuda_worker("--gpu", "3", *fake_stack())
    assert result.returncode == 1, describe(result)
    assert "the cuda backend cannot start on GPU 3 (driver 13.0, 1 device (duplex fake GPU), " \
           "NCCL 2.27.0, cuBLASLt 130000): GPU 3: device 3: there are 1" in result.stderr, \
        describe(result)


@pytest.mark.fake_gpu
@pytest.mark.parametrize("pp,ep,dp", [(4, 1, 1), (2, 1, 2), (2, 2, 1), (1, 4, 1)])
def test_the_cuda_backend_trains_the_parity_job_like_the_standalone_run(cluster, tmp_path, pp,
                                                                        ep, dp):
    """The worker issue's parity job on 4 cuda workers (2 nodes of 2), as
    DualPipe pp 4, pp 2 x dp 2 and pp 2 x ep 2, and as 1F1B pp 1 x ep 4:
    every step's loss within CUDA_REL_LOSS (4e-7) relative of the
    single-process CPU trainer (the issue asks 1e-4; on the fake stack the
    kernels are their CPU references and the GEMMs sum in another order
    than OpenBLAS), and the checkpoint's parameters within CUDA_PARAM_TOL
    (5e-5). The step-end sums run by NCCL all-reduce
    over each stage's ranks: 2 (DualPipe's mirror) or 4 (with dp 2 or ep
    2 or 4). Placement keeps an ep pair on one node (rows by IPC); ep 4
    spans both nodes, so its rows go in two hops: a token crosses to each
    node once, to the rank with its sender's local index (NCCL), which
    forwards it to the expert's rank there (IPC)."""
    from test_train import (STEPS, assert_params_close, final_params, finished,
                            standalone_run, submit)

    c = cluster
    cuda_workers(c, 4)
    path = cuda_spec(tmp_path, f"cuda-parity-pp{pp}-ep{ep}-dp{dp}",
                     schedule="dualpipe" if pp > 1 else "1f1b", ep=ep, pp=pp, dp=dp,
                     # the ep ranks share each micro-batch's sequences
                     **({"microbatch_size": 4, "microbatches": 2} if ep == 4 else {}))
    reference, ref_params = standalone_run(path, tmp_path)
    status = finished(c, submit(c, path))
    losses = status["losses"]
    assert [e["step"] for e in losses] == list(range(1, STEPS + 1)), status
    loss_parity(losses, reference, CUDA_REL_LOSS, f"cuda pp {pp} ep {ep} dp {dp}")
    assert losses[-1]["loss"] < losses[0]["loss"] - 0.3, losses
    assert_params_close(final_params(c, status), ref_params, f"cuda pp {pp} ep {ep} dp {dp}",
                        CUDA_PARAM_TOL)
    if ep > 1:  # the ranks report the rows their experts ran, as on the cpu backend
        assert status["expert_imbalance"] is not None and status["expert_imbalance"] >= 1.0, \
            status
    # the pipeline's messages went GPU to GPU, by IPC to a neighbour on the
    # same node (workers g0 and g1 are on node0, g2 and g3 on node1) and
    # by NCCL to the others, and so did the step-end sums; every rank holds
    # two stages, each shared with its mirror (and its dp or ep copy)
    logs = [c.worker_procs[f"g{gpu}"].log_text() for gpu in range(4)]
    for log in logs:
        assert "; step-end sums by NCCL (rank" in log, log
        assert f"; {2 if pp > 1 else 1} stage group{'s' if pp > 1 else ''}); {ep} ep rank" \
            in log, log
        if ep == 2:  # placement keeps the pair on one node: by IPC
            assert "2 ep ranks, peers 1 by IPC, 0 by NCCL\n" in log, log
        if ep == 4:  # across the nodes, in two hops
            assert "4 ep ranks, peers 1 by IPC, 2 by NCCL, expert rows in two hops " \
                "(2 nodes x 2)" in log, log
    links = re.findall(r"pipeline links ([^;]*);", "".join(logs))
    assert len(links) == 4 and all("hosts" not in ln for ln in links), links
    if pp == 4:  # 4 stages on 2 nodes: pairs inside a node and across
        assert any("IPC" in ln for ln in links) and any("NCCL" in ln for ln in links), links


@pytest.mark.fake_gpu
def test_bf16_gemms_train_within_their_rounding(cluster, tmp_path):
    """train.precision bf16: attention's projections and the experts take
    bf16 inputs; the losses follow the fp32 CPU run within
    CUDA_BF16_REL_LOSS (3e-4) but not to fp32's last bits, and the model
    learns."""
    from test_train import finished, standalone_run, submit

    c = cluster
    cuda_workers(c, 4)
    path = cuda_spec(tmp_path, "cuda-bf16", schedule="1f1b", ep=1)
    spec = json.loads(path.read_text())
    spec["train"]["precision"] = "bf16"
    spec["train"]["steps"] = 10
    path.write_text(json.dumps(spec))
    reference, _ = standalone_run(path, tmp_path)
    status = finished(c, submit(c, path))
    losses = [e["loss"] for e in status["losses"]]
    assert len(losses) == 10
    worst = loss_parity(status["losses"], reference, CUDA_BF16_REL_LOSS, "bf16 GEMMs vs fp32")
    assert worst > 1e-7, "bf16 losses equal fp32's: the GEMMs did not round"
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.fake_gpu
def test_uneven_nodes_send_expert_rows_directly(cluster, tmp_path):
    """pp 1 x ep 4 with 3 workers on node0 and 1 on node1: two hops need as
    many ep ranks on every node, so the log says why not and each row goes
    straight to its expert's rank (IPC on node0, NCCL to node1); the losses
    still match the CPU trainer within CUDA_REL_LOSS."""
    from test_train import finished, standalone_run, submit

    c = cluster
    c.env["FAKECUDA_DEVICES"] = "4"
    c.start_duplexd("--nccl-lib", str(FAKE))
    for gpu in range(4):
        c.start_worker(f"g{gpu}", gpu, *fake_stack(), "--node", "node1" if gpu == 3 else "node0",
                       backend="cuda", wait=False)
    for gpu in range(4):
        c.wait_worker_alive(f"g{gpu}")
    path = cuda_spec(tmp_path, "cuda-uneven", schedule="1f1b", pp=1, ep=4, dp=1,
                     microbatch_size=4, microbatches=2)
    spec = json.loads(path.read_text())
    spec["train"]["steps"] = 10
    path.write_text(json.dumps(spec))
    reference, _ = standalone_run(path, tmp_path)
    losses = finished(c, submit(c, path))["losses"]
    assert [e["step"] for e in losses] == list(range(1, 11)), losses
    loss_parity(losses, reference, CUDA_REL_LOSS, "uneven nodes, rows sent directly")
    log = c.worker_procs["g0"].log_text()
    assert "the ep ranks' nodes run different numbers of them: expert rows go directly" in log, log
    assert "4 ep ranks, peers 2 by IPC, 1 by NCCL\n" in log, log


@pytest.mark.fake_gpu
def test_fp8_dispatch_sends_e4m3_records_in_two_hops_like_the_cpu_trainer(cluster, tmp_path):
    """train.dispatch fp8 on pp 1 x ep 4 over 2 nodes x 2 GPUs: each token
    row goes to the relays and on to the experts as an e4m3 record (a scale
    per 1x128 tile). The CPU trainer rounds the rows the same way, so the
    losses still match it within FP8_REL_LOSS; against fp32 dispatch they
    move, within e4m3's rounding (FP8_MOVES_LOSS)."""
    from test_train import finished, standalone_run, submit

    c = cluster
    cuda_workers(c, 4)
    path = cuda_spec(tmp_path, "cuda-fp8", schedule="1f1b", pp=1, ep=4, dp=1, microbatch_size=4,
                     microbatches=2)
    spec = json.loads(path.read_text())
    spec["train"]["steps"] = 10
    path.write_text(json.dumps(spec))
    fp32, _ = standalone_run(path, tmp_path)
    spec["train"]["dispatch"] = "fp8"
    path.write_text(json.dumps(spec))
    reference, _ = standalone_run(path, tmp_path)
    moved = max(abs(a - b) / abs(b) for a, b in zip(reference, fp32))
    print(f"fp8 dispatch: the CPU trainer's losses {moved:.3g} from its fp32 dispatch's")
    assert 1e-7 < moved <= FP8_MOVES_LOSS, (reference, fp32)
    status = finished(c, submit(c, path))
    assert [e["step"] for e in status["losses"]] == list(range(1, 11)), status
    loss_parity(status["losses"], reference, FP8_REL_LOSS, "fp8 dispatch")
    for gpu in range(4):
        assert "expert rows in two hops (2 nodes x 2)" in c.worker_procs[f"g{gpu}"].log_text()


@pytest.mark.fake_gpu
@needs_gpucheck
def test_the_whole_gpu_check_runs_on_the_fake_stack():
    """Every launch sequence, wrapper and harness path of duplex-gpucheck,
    with the kernels' CPU references standing in for the kernels: every row
    passes but the overlap ratios, which time a CPU here."""
    result = run_binary(GPUCHECK, "--small", "--iters", "1", *fake_stack(), timeout=300)
    assert not SANITIZER_REPORT.search(result.stderr), describe(result)
    assert result.returncode in (0, 1), describe(result)
    table = result.stdout[result.stdout.index("\ncheck ") + 1:]
    table = table[:table.index("\n\n")]  # the rows end at the footer's blank line
    rows = table.splitlines()[1:]
    failed = [r for r in rows if " FAIL" in r and not r.startswith("overlap")]
    assert len(rows) > 60, describe(result)
    assert not failed, "\n".join(failed) + "\n" + describe(result)
    for area in ("route_topk", "dispatch_pack", "combine", "fp8_quant", "rmsnorm_fwd", "attn_fwd",
                 "embed_bwd", "adamw", "twohop_rows", "gemm bf16 xwt", "nccl_allreduce",
                 "transport ipc"):
        assert any(r.startswith(area) and " PASS" in r for r in rows), area + "\n" + table


@pytest.mark.fake_gpu
def test_the_gpu_hosts_training_check_runs_on_the_fake_stack():
    """tests/gpu/train_check.py, as the bundle runs it on a GPU host (4
    workers on GPU 0, three jobs against the standalone trainer), on the
    fake stack: every job passes its check (the issue's 1e-4, for a GPU's
    kernels), and here, with the kernels' CPU references, within
    CUDA_REL_LOSS (FP8_REL_LOSS with fp8 dispatch)."""
    libs = fake_stack()
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "train_check.py"),
                             str(BIN_DIR), *libs, "--timeout", "600" if sanitized() else "120"],
                            capture_output=True, text=True, timeout=1300)
    assert result.returncode == 0, result.stdout + result.stderr
    passes = re.findall(r"train_check: PASS (pp \d x ep \d(?:, fp8 dispatch)?): 20 steps, "
                        r"max rel (\S+) ", result.stdout)
    assert [what for what, _ in passes] == ["pp 4 x ep 1", "pp 2 x ep 2",
                                            "pp 2 x ep 2, fp8 dispatch"], result.stdout
    print(result.stdout)
    for what, worst in passes:
        bound = FP8_REL_LOSS if "fp8" in what else CUDA_REL_LOSS
        assert float(worst) <= bound, (what, worst, bound)


@pytest.mark.fake_gpu
def test_a_kernel_fault_loses_no_run(cluster, tmp_path):
    """A kernel fault on one worker's GPU (the fake's FAKECUDA_FAULT_AFTER: an
    illegal access on a GPU) leaves that context unusable: the worker reports
    its job failed, says goodbye and exits with status 5 for systemd to
    restart it; the job restarts from its last checkpoint on the spare and
    ends with the standalone run's losses."""
    from test_train import STEPS, standalone_run, submit

    c = cluster
    c.env["FAKECUDA_DEVICES"] = "5"
    c.start_duplexd("--nccl-lib", str(FAKE))
    base_env = dict(c.env)
    c.env["FAKECUDA_FAULT_AFTER"] = "6000"  # a few steps into the job
    argv = [WORKER, "--coordinator", c.addr, "--backend", "cuda", "--id", "g1", "--gpu", "1",
            "--host", "testhost", "--node", "node0", "--log-level", "debug", *fake_stack()]
    faulty = c.spawn("worker-g1", argv, expect_exit=True)
    c.worker_procs["g1"] = faulty
    c.env = base_env
    for gpu in (0, 2, 3, 4):
        c.start_worker(f"g{gpu}", gpu, *fake_stack(), backend="cuda", wait=False)
    for gpu in range(5):
        c.wait_worker_alive(f"g{gpu}")
    path = cuda_spec(tmp_path, "cuda-fault", schedule="dualpipe", ep=1)
    reference, _ = standalone_run(path, tmp_path)
    jid = submit(c, path)
    status = ended_job(c, jid)
    assert status["state"] == "succeeded", (status, c.ctl("events", jid).stdout)
    assert status["attempt"] == 2, status
    assert faulty.wait(timeout=30) == 5, faulty.log_tail()
    assert "lost its context" in faulty.log_text() and "launch failure" in faulty.log_text()
    # one recovery, caused by g1's fault: the job's state events, in order
    # (job_failure: other ranks' failures reported while it recovers)
    events = [json.loads(line) for line in c.ctl("events", jid, "--json").stdout.splitlines()]
    states = [e for e in events if e["kind"].startswith("job_") and e["kind"] != "job_failure"]
    assert [e["kind"] for e in states] == [
        "job_queued", "job_placing", "job_running", "job_recovering", "job_placing",
        "job_running", "job_recovered", "job_succeeded"], events
    recovering, recovered = states[3], states[6]
    assert "restart 1 of 3" in recovering["detail"], recovering
    # g1's fault is what the job reports: as the recovery's cause, or (when a
    # peer whose IPC transfer g1's teardown cancelled reported first) as a
    # job_failure while it recovers
    causes = [recovering["detail"]] + [e["detail"] for e in events if e["kind"] == "job_failure"]
    assert any("worker g1: " in d and "launch failure" in d for d in causes), events
    assert recovered["detail"].startswith("attempt 2: "), recovered
    assert all(recovering["id"] < e["id"] < recovered["id"]
               for e in events if e["kind"] == "job_failure"), events
    losses = status["losses"]
    assert [e["step"] for e in losses][-1] == STEPS, status
    loss_parity(losses, reference, CUDA_REL_LOSS, "a kernel fault, recovered")
    assert c.workers()["g1"]["state"] in ("left", "lost"), c.workers()["g1"]


@pytest.mark.fake_gpu
def test_a_rank_that_never_joins_nccl_costs_a_restart_not_a_hang(cluster, tmp_path):
    """One rank's NCCL join never completes (the fake's FAKE_NCCL_STALL_ONCE,
    as when a peer's NCCL cannot reach the others): every rank gives up
    after --nccl-timeout instead of waiting forever, the job restarts with a
    fresh NCCL id, and it ends with the standalone run's losses."""
    from test_train import STEPS, standalone_run, submit

    c = cluster
    c.env["FAKE_NCCL_STALL_ONCE"] = str(tmp_path / "stall-once")
    cuda_workers(c, 4, "--nccl-timeout", "2")
    path = cuda_spec(tmp_path, "cuda-stall", schedule="dualpipe", ep=1)
    reference, _ = standalone_run(path, tmp_path)
    jid = submit(c, path)
    status = ended_job(c, jid)
    assert status["state"] == "succeeded", (status, c.ctl("events", jid).stdout)
    assert status["attempt"] == 2, status
    assert (tmp_path / "stall-once").exists()
    logs = "".join(c.worker_procs[f"g{gpu}"].log_text() for gpu in range(4))
    assert "not every rank joined within 2 s" in logs, logs[-3000:]
    losses = status["losses"]
    assert [e["step"] for e in losses] == list(range(1, STEPS + 1)), status
    loss_parity(losses, reference, CUDA_REL_LOSS, "an NCCL join that stalled, restarted")
    assert all(w["state"] == "alive" for w in c.workers().values()), c.workers()


@pytest.mark.fake_gpu
def test_ranks_sharing_one_gpu_train_through_the_hosts(cluster, tmp_path):
    """NCCL refuses two ranks of a communicator on one GPU (the fake does
    too), so a job whose ranks share a GPU (4 workers on GPU 0, as
    tests/gpu/train_check.py runs on a one-GPU host) uses no NCCL: its
    pipeline messages and expert rows go through IPC rings (one node), its
    step-end sums through the hosts, and it still trains like the
    standalone run, with and without expert parallelism."""
    from test_train import finished, standalone_run, submit

    c = cluster
    c.env["FAKECUDA_DEVICES"] = "1"
    c.start_duplexd("--nccl-lib", str(FAKE))
    for i in range(4):
        c.start_worker(f"g{i}", i, *fake_stack(), "--gpu", "0", "--node", "node0",
                       backend="cuda", wait=False)
    for i in range(4):
        c.wait_worker_alive(f"g{i}")
    path = cuda_spec(tmp_path, "cuda-one-gpu", schedule="dualpipe", ep=1)
    spec = json.loads(path.read_text())
    reference, _ = standalone_run(path, tmp_path)
    status = finished(c, submit(c, path))
    assert [e["step"] for e in status["losses"]] == list(range(1, len(reference) + 1)), status
    loss_parity(status["losses"], reference, CUDA_REL_LOSS, "4 ranks on one GPU")
    log = c.worker_procs["g0"].log_text()
    assert "no NCCL, workers " in log and "share GPU 0 of node node0" in log, log
    # one node: every neighbour is reached by IPC, even on the same GPU
    assert re.search(r"pipeline links (IPC (up|down)(, )?)+; step-end sums through the hosts",
                     log), log

    # expert parallelism on the one node: the rows go through IPC rings too
    path = cuda_spec(tmp_path, "cuda-one-gpu-ep", schedule="dualpipe", pp=2, ep=2)
    reference, _ = standalone_run(path, tmp_path)
    status = finished(c, submit(c, path))
    assert [e["step"] for e in status["losses"]] == list(range(1, len(reference) + 1)), status
    loss_parity(status["losses"], reference, CUDA_REL_LOSS, "4 ranks on one GPU, ep 2")
    logs = "".join(c.worker_procs[f"g{i}"].log_text() for i in range(4))
    assert "2 ep ranks, peers 1 by IPC, 0 by NCCL" in logs, logs[-3000:]
    assert all(w["state"] == "alive" for w in c.workers().values())


@pytest.mark.fake_gpu
def test_cuda_workers_report_their_gpus_memory_for_admission(cluster, tmp_path):
    """A cuda worker reports its GPU's total memory at registration
    (Register.memory_bytes; the fake GPU's FAKECUDA_MEMORY_BYTES, here 512
    MiB: room for the backend's own buffers, 64 MiB of cuBLASLt workspaces,
    and a small job), so duplexd refuses at submission (dry run and real) a
    cuda job whose ranks need more than that, with the numbers, and runs one
    that fits. --memory-limit, when given, is reported instead."""
    from test_train import finished

    c = cluster
    c.env["FAKECUDA_MEMORY_BYTES"] = str(512 << 20)
    cuda_workers(c, 2)
    for gpu in range(2):
        log = c.worker_procs[f"g{gpu}"].log_text()
        assert f"GPU {gpu} (512.0 MiB of memory)" in log, log[-3000:]
    listed = {w["id"]: w["memory_bytes"] for w in c.workers_list()}
    assert listed == {"g0": 512 << 20, "g1": 512 << 20}, listed
    path = cuda_spec(tmp_path, "cuda-admit", schedule="1f1b", pp=2, ep=1, dp=1)
    big = ("--set", "model.vocab=65536", "--set", "model.d_model=256")
    for dry in (("--dry-run",), ()):
        result = c.ctl("submit", path, *dry, *big)
        assert result.returncode == 1, describe(result)
        for word in ("NO_CAPACITY", "MiB (parameters", "per rank",
                     "0 of the 2 alive cuda workers", "it needs 2 (pp 2 x ep 1 x dp 1)",
                     "the largest cuda worker reports 512.0 MiB"):
            assert word in result.stderr, (word, describe(result))
    assert not c.db_query("SELECT id FROM jobs"), "a refused job was stored"

    # a job that fits the GPUs is accepted, and runs on them
    result = c.ctl("submit", path, "--set", "train.steps=3")
    assert result.returncode == 0, describe(result)
    status = finished(c, int(result.stdout.split()[1]))
    assert [e["step"] for e in status["losses"]][-1] == 3, status

    # --memory-limit is what a cuda worker reports when less than its GPU's
    # memory; more than the GPU holds it never reports
    c.env["FAKECUDA_DEVICES"] = "4"
    c.start_worker("g2", 2, *fake_stack(), "--memory-limit", "256M", backend="cuda")
    c.start_worker("g3", 3, *fake_stack(), "--memory-limit", "1T", backend="cuda")
    listed = {w["id"]: w["memory_bytes"] for w in c.workers_list()}
    assert listed["g2"] == 256 << 20 and listed["g3"] == 512 << 20, listed
    result = c.ctl("submit", path, "--dry-run", *big)
    assert result.returncode == 1, describe(result)
    for word in ("0 of the 4 alive cuda workers", "the largest cuda worker reports 512.0 MiB"):
        assert word in result.stderr, (word, describe(result))
