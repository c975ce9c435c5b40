"""duplexctl place (EPLB alone) and submit: spec errors name the field, a dry
run shows the placement and the simulated schedule, and a job larger than
the cluster is refused."""

import json

import pytest

from conftest import CTL, describe, run_binary

README_LOADS = {"weight": [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]}
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_place_reproduces_the_eplb_readme(tmp_path):
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps(README_LOADS))
    args = ("place", "--loads", loads, "--replicas", 16, "--groups", 4, "--nodes", 2, "--gpus", 8)
    result = run_binary(CTL, *args, "--json")
    assert result.returncode == 0, describe(result)
    doc = json.loads(result.stdout)
    assert doc["policy"] == "hierarchical"
    assert [layer["phy2log"] for layer in doc["layers"]] == README_PHY2LOG
    for layer in doc["layers"]:
        assert sum(layer["logcnt"]) == 16
        assert layer["imbalance"] >= 1.0
        for expert, slots in enumerate(layer["log2phy"]):
            live = [s for s in slots if s >= 0]
            assert len(live) == layer["logcnt"][expert]
            assert all(layer["phy2log"][s] == expert for s in live)
    table = run_binary(CTL, *args)
    assert table.returncode == 0, describe(table)
    assert "policy: hierarchical" in table.stdout and "imbalance" in table.stdout


@pytest.mark.parametrize("content,args,word", [
    ("{\"weight\": [[1, 2], [3]]}", ("--replicas", 2, "--gpus", 2), "weight[1]"),
    ("{\"weight\": [[1, \"x\"]]}", ("--replicas", 2, "--gpus", 2), "not a number"),
    ("not json", ("--replicas", 2, "--gpus", 2), "loads.json"),
    ("{\"weight\": [[1, 2, 3]]}", ("--replicas", 4, "--gpus", 2, "--groups", 2), "groups"),
    ("{\"weight\": [[1, 2, 3]]}", ("--gpus", 3), "required"),
])
def test_place_errors(tmp_path, content, args, word):
    loads = tmp_path / "loads.json"
    loads.write_text(content)
    result = run_binary(CTL, "place", "--loads", loads, *args)
    assert result.returncode == 2, describe(result)
    assert word in result.stderr, describe(result)


SPEC = {"name": "demo", "backend": "sim",
        "model": {"layers": 4, "experts": 8},
        "parallel": {"schedule": "dualpipe", "pp": 2, "ep": 2, "microbatches": 4}}


def submit(cluster, tmp_path, spec, *args):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return cluster.ctl("submit", path, *args)


def test_dry_run_shows_placement_and_schedule(sim4, tmp_path):
    c = sim4
    result = submit(c, tmp_path, SPEC, "--dry-run", "--json")
    assert result.returncode == 0, describe(result)
    plan = json.loads(result.stdout)
    assert plan["workers"] == 4 and plan["split_ep_groups"] == 0
    ranks = plan["ranks"]
    assert sorted(r["worker"] for r in ranks) == ["w0", "w1", "w2", "w3"]
    for pp in (0, 1):
        group = [r for r in ranks if r["pp"] == pp]
        assert len({r["node"] for r in group}) == 1, f"EP group {pp} spans nodes: {group}"
        assert sorted(e for r in group for e in r["experts"]) == list(range(8))
        assert all(r["stages"] == [pp, 1 - pp] for r in group), group
    sched = plan["schedule"]
    f, b, w, fb = (sched["costs_ms"][k] for k in ("f", "b", "w", "fb"))
    assert sched["bubble_ms"] == pytest.approx((2 // 2 - 1) * (fb + b - 3 * w))
    assert sched["peak_activations"] == 3 and sched["param_copies"] == 2

    table = submit(c, tmp_path, SPEC, "--dry-run", "--set", "parallel.schedule=1f1b")
    assert table.returncode == 0, describe(table)
    assert "nothing started" in table.stdout and "schedule 1f1b" in table.stdout
    assert all(wid in table.stdout for wid in ("w0", "w1", "w2", "w3"))


@pytest.mark.parametrize("sets,field", [
    (("--set", "model.layers=3"), "model.layers"),
    (("--set", "parallel.ep=3"), "parallel.ep"),
    (("--set", "model.bogus=1"), "model.bogus"),
    (("--set", "parallel.schedule=gpipe"), "parallel.schedule"),
])
def test_spec_errors_name_the_field(sim4, tmp_path, sets, field):
    result = submit(sim4, tmp_path, SPEC, "--dry-run", *sets)
    assert result.returncode == 1, describe(result)
    assert field in result.stderr and "BAD_SPEC" in result.stderr, describe(result)


def test_too_big_for_the_cluster(sim4, tmp_path):
    c = sim4
    big = submit(c, tmp_path, SPEC, "--dry-run", "--set", "parallel.dp=2")
    assert big.returncode == 1, describe(big)
    assert "needs 8 sim workers" in big.stderr and "has 4 alive" in big.stderr, describe(big)
    run = submit(c, tmp_path, SPEC, "--set", "parallel.dp=2")
    assert run.returncode == 1, describe(run)
    assert "needs 8 sim workers" in run.stderr and "NO_CAPACITY" in run.stderr, describe(run)
    assert c.duplexd.running()
