"""`duplex-worker --backend cuda` on a machine without the GPU stack: it
refuses to start with a message naming every missing piece (the driver,
NCCL, cuBLASLt; their paths can be given), and nothing else needs them."""

import ctypes

import pytest

from conftest import BIN_DIR, SANITIZER_REPORT, WORKER, describe, run_binary

GPUCHECK = BIN_DIR / "duplex-gpucheck"  # built only where nvcc is


def have_driver():
    """A driver that loads and initialises (a GPU machine)."""
    try:
        return ctypes.CDLL("libcuda.so.1").cuInit(0) == 0
    except (OSError, AttributeError):
        return False


def cuda_worker(*args):
    result = run_binary(WORKER, "--backend", "cuda", "--id", "gpu-test",
                        "--coordinator", "tcp://127.0.0.1:1", *args, timeout=20)
    assert not SANITIZER_REPORT.search(result.stderr), describe(result)
    return result


def test_a_missing_driver_is_named():
    result = cuda_worker()
    assert result.returncode == 1, describe(result)
    if have_driver():  # a GPU machine: the stack loads, training is not built yet
        assert "training on it is not built yet" in result.stderr, describe(result)
    else:
        assert "the cuda backend cannot start: libcuda.so.1 (the NVIDIA driver) cannot be " \
               "loaded" in result.stderr, describe(result)


def test_every_missing_library_is_named_with_its_path():
    result = cuda_worker("--cuda-lib", "/nonexistent/libcuda.so", "--nccl-lib",
                         "/nonexistent/libnccl.so.2", "--cublaslt-lib", "/nonexistent/lt.so")
    assert result.returncode == 1, describe(result)
    for piece in ("/nonexistent/libcuda.so (the NVIDIA driver)",
                  "/nonexistent/libnccl.so.2 (NCCL)", "/nonexistent/lt.so (cuBLASLt)"):
        assert piece in result.stderr, describe(result)


@pytest.mark.skipif(not GPUCHECK.exists(), reason="duplex-gpucheck needs nvcc to build")
def test_the_gpu_check_says_what_is_missing():
    if have_driver():
        pytest.skip("a GPU machine: run tests/gpu/run.sh there")
    result = run_binary(GPUCHECK, "--small", timeout=20)
    assert not SANITIZER_REPORT.search(result.stderr), describe(result)
    assert result.returncode == 2, describe(result)
    assert "libcuda.so.1 (the NVIDIA driver) cannot be loaded" in result.stderr, describe(result)


FAKE = BIN_DIR.parent / "lib" / "libfakecuda.so"  # tests/fake/: the GPU stack on the host


def fake_stack():
    return ["--cuda-lib", str(FAKE), "--nccl-lib", str(FAKE), "--cublaslt-lib", str(FAKE)]


@pytest.mark.skipif(not FAKE.exists(), reason="libfakecuda.so is built by make test-build")
def test_on_a_gpu_stack_that_loads_the_worker_says_training_is_not_built_yet():
    result = cuda_worker(*fake_stack())
    assert result.returncode == 1, describe(result)
    assert "the cuda backend's GPU stack loads (driver 13.0, 1 device (duplex fake GPU), " \
           "NCCL 2.27.0, cuBLASLt 130000), but training on it is not built yet" \
           in result.stderr, describe(result)


@pytest.mark.skipif(not GPUCHECK.exists() or not FAKE.exists(),
                    reason="duplex-gpucheck needs nvcc to build")
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
