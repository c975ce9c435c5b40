"""`duplex-worker --standalone`: the single-process reference trainer.

Trains examples/demo.json's model for a few steps on the license texts and
checks the per-step JSON lines, their bitwise reproducibility, and that a
spec error is reported with its field. Needs no duplexd.
"""

import json
import math

from conftest import REPO, SANITIZER_REPORT, WORKER, describe, run_binary, sanitized

DEMO = REPO / "examples" / "demo.json"
STEPS = 5


def train_timeout():
    return 120 if sanitized() else 30


def standalone(*args):
    result = run_binary(WORKER, "--standalone", *args, timeout=train_timeout())
    assert not SANITIZER_REPORT.search(result.stderr), describe(result)
    return result


def test_demo_five_steps_json():
    result = standalone(DEMO, "--steps", STEPS, "--json")
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert len(lines) == STEPS, describe(result)
    losses = []
    for s, line in enumerate(lines, 1):
        doc = json.loads(line)
        assert list(doc) == ["step", "loss"], line
        assert doc["step"] == s, line
        assert isinstance(doc["loss"], float) and math.isfinite(doc["loss"]), line
        losses.append(doc["loss"])
    assert losses[0] > losses[-1], losses
    # decreasing on average: the second half below the first
    assert sum(losses[STEPS // 2:]) / (STEPS - STEPS // 2) < sum(losses[:STEPS // 2]) / (STEPS // 2)
    # a byte-level model starts near ln 256
    assert abs(losses[0] - math.log(256)) < 0.5, losses


def test_two_runs_bitwise_identical():
    one = standalone(DEMO, "--steps", 3, "--json")
    two = standalone(DEMO, "--steps", 3, "--json")
    assert one.returncode == 0 and two.returncode == 0, describe(one) + describe(two)
    assert one.stdout == two.stdout
    assert len(one.stdout.splitlines()) == 3


def test_readable_lines():
    result = standalone(DEMO, "--steps", 1)
    assert result.returncode == 0, describe(result)
    assert "loss" in result.stdout and "tokens/s" in result.stdout, describe(result)


def test_spec_error_names_the_field(tmp_path):
    spec = json.loads(DEMO.read_text())
    spec["model"]["layers"] = 3  # does not split into pp 2's stages
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    result = standalone(bad, "--steps", 1, "--json")
    assert result.returncode != 0, describe(result)
    assert "model.layers" in result.stderr, describe(result)
    assert result.stdout == "", describe(result)


def test_missing_spec_file(tmp_path):
    result = standalone(tmp_path / "nope.json")
    assert result.returncode != 0, describe(result)
    assert "nope.json" in result.stderr, describe(result)
