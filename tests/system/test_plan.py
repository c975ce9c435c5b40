"""`duplexctl plan`: schedules as compact text, JSON, SVG and a timeline.

The heart of this file is the oracle: the compute order of the reference
(deepseek-ai/DualPipe's DualPipe and DualPipeV step loops, as the team's
notes describe them), written here in Python independently of the C
generator and recorded in the compact notation. `duplexctl plan --format
compact` must print exactly what the oracle builds, rank by rank.

Needs no duplexd.
"""

import collections
import json
import xml.etree.ElementTree as ET

import pytest

from conftest import ctl, describe

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
SVG_NS = "{http://www.w3.org/2000/svg}"

# Default costs (dp_costs_default): F=1, B=2, W=1, I=B-W, FB=F+B.
F, B, W = 1.0, 2.0, 1.0
I, FB = B - W, F + B


# --------------------------------------------------------------------------
# the oracle: the reference's step order, written independently of the C
# generator from the team's reading of deepseek-ai/DualPipe
# (shared/notes/dualpipe.md, sections 2 and 3)


class Rank:
    """One rank's compute ops in compact notation.

    Micro-batches are counted per physical chunk (0 prints as d, 1 as u);
    the eight steps name logical chunks, which DualPipe's second half of the
    ranks swaps. An I queues its weight-gradient job; W takes the oldest.
    """

    def __init__(self, swap):
        self.swap = swap
        self.next_forward = [0, 0]
        self.next_backward = [0, 0]
        self.queued = collections.deque()
        self.ops = []

    def take(self, counters, x):
        chunk = x ^ self.swap
        mb = counters[chunk]
        counters[chunk] += 1
        return f"{mb}{'du'[chunk]}"

    def forward(self, x):
        self.ops.append("F" + self.take(self.next_forward, x))

    def backward(self, x, zero_bubble=False):
        name = self.take(self.next_backward, x)
        if zero_bubble:
            self.queued.append(name)
        self.ops.append(("I" if zero_bubble else "B") + name)

    def overlapped(self, xf, xb):
        f = self.take(self.next_forward, xf)
        b = self.take(self.next_backward, xb)
        self.ops.append(f"(F{f};B{b})")

    def weight(self):
        self.ops.append("W" + self.queued.popleft())


def steps(rank, H, h, M, swap, apart):
    """The eight steps for half size H, mirrored rank h, M micro-batches per
    chunk; `apart`: this rank runs the first main-step pair un-overlapped."""
    me = Rank(swap)
    for _ in range(2 * (H - h - 1)):
        me.forward(0)
    for _ in range(h + 1):
        me.forward(0)
        me.forward(1)
    for _ in range(H - h - 1):
        me.backward(1, zero_bubble=True)
        me.weight()
        me.forward(1)
    for i in range(M - 2 * H + h + 1):
        if i == 0 and apart:
            me.forward(0)
            me.backward(1)
        else:
            me.overlapped(0, 1)
        me.overlapped(1, 0)
    for _ in range(H - h - 1):
        me.backward(1)
        me.overlapped(1, 0)
    switch = (h + 1) // 2  # the zero-bubble switch in step 6
    zero_bubble = False
    for i in range(h + 1):
        zero_bubble |= i == switch and h % 2 == 1
        me.backward(1, zero_bubble)
        zero_bubble |= i == switch and h % 2 == 0
        me.backward(0, zero_bubble)
    for _ in range(H - h - 1):
        me.weight()
        me.backward(0, zero_bubble=True)
    for _ in range(h + 1):
        me.weight()
    assert not me.queued, f"rank {rank} ends with W jobs queued"
    return me.ops


def ref_dualpipe(rank, P, N):
    assert P % 2 == 0 and N % 2 == 0 and N >= 2 * P
    h = min(rank, P - 1 - rank)
    return steps(rank, P // 2, h, N // 2, int(rank >= P // 2), apart=h == P // 2 - 1)


def ref_dualpipev(rank, P, N):
    assert N >= 2 * P
    return steps(rank, P, rank, N, 0, apart=rank == P - 1)


REFERENCE = {"dualpipe": ref_dualpipe, "dualpipev": ref_dualpipev}


def oracle_lines(schedule, pp, n):
    return [f"rank {r}: " + " ".join(REFERENCE[schedule](r, pp, n)) for r in range(pp)]


# --------------------------------------------------------------------------
# helpers


def plan(*args):
    """duplexctl plan ARGS; fails the test unless it exits 0."""
    result = ctl("plan", *args)
    assert result.returncode == EXIT_OK, describe(result)
    assert result.stderr == "", describe(result)
    return result.stdout


def compact(schedule, pp, n):
    out = plan("--schedule", schedule, "--pp", pp, "--microbatches", n, "--format", "compact")
    assert out.endswith("\n"), out
    return out.splitlines()


def plan_json(schedule, pp, n, *extra):
    out = plan("--schedule", schedule, "--pp", pp, "--microbatches", n, "--format", "json",
               *extra)
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"plan --format json printed invalid JSON ({exc}):\n{out[:2000]}")


def compact_ops(line):
    """The ops of one compact line ("rank R: op op ...")."""
    head, _, ops = line.partition(": ")
    assert head.startswith("rank "), line
    return ops.split(" ") if ops else []


def peak_activations(ops):
    """Live activations per validate.h: a forward's lives until its B or I;
    an FB counts its forward before its backward frees."""
    live = peak = 0
    for op in ops:
        if op.startswith("("):
            peak = max(peak, live + 1)
        elif op[0] == "F":
            live += 1
            peak = max(peak, live)
        elif op[0] in "BI":
            live -= 1
    return peak


def busy_time(ops, f=F, b=B, i=I, w=W, fb=FB):
    cost = {"F": f, "B": b, "I": i, "W": w}
    return sum(fb if op.startswith("(") else cost[op[0]] for op in ops)


def assert_lines_equal(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} rank lines, expected {len(want)}"
    for r, (g, w) in enumerate(zip(got, want)):
        if g != w:
            gops, wops = compact_ops(g), compact_ops(w)
            k = next((k for k, (a, b) in enumerate(zip(gops, wops)) if a != b),
                     min(len(gops), len(wops)))
            raise AssertionError(
                f"{what}: rank {r} differs from the reference at op {k} "
                f"(got {gops[k:k + 4]}, reference {wops[k:k + 4]})\n"
                f"  got:       {g}\n  reference: {w}")


# --------------------------------------------------------------------------
# (a) compact output equals the reference, line by line


def test_oracle_matches_the_notes_counts():
    """The oracle itself against /work/shared/notes/dualpipe.md section 2."""
    P, N = 8, 20
    per_rank = [ref_dualpipe(r, P, N) for r in range(P)]
    assert [sum(op[0] == "I" for op in ops) for ops in per_rank] == [7, 6, 5, 4, 4, 5, 6, 7]
    assert [sum(op[0] == "W" for op in ops) for ops in per_rank] == [7, 6, 5, 4, 4, 5, 6, 7]
    assert [sum(op[0] == "(" for op in ops) for ops in per_rank] == \
        [9, 10, 11, 11, 11, 11, 10, 9]
    for ops in per_rank:
        forwards = [op for op in ops if op[0] == "F"] + \
            [op[1:op.index(";")] for op in ops if op[0] == "("]
        assert len(forwards) == N


@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("mult", ["2P", "2P+2", "4P", "4P+6"])
def test_dualpipe_compact_matches_reference(pp, mult):
    n = {"2P": 2 * pp, "2P+2": 2 * pp + 2, "4P": 4 * pp, "4P+6": 4 * pp + 6}[mult]
    assert_lines_equal(compact("dualpipe", pp, n), oracle_lines("dualpipe", pp, n),
                       f"dualpipe P={pp} N={n}")


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("mult", ["2P", "2P+1", "3P+1", "5P"])
def test_dualpipev_compact_matches_reference(pp, mult):
    n = {"2P": 2 * pp, "2P+1": 2 * pp + 1, "3P+1": 3 * pp + 1, "5P": 5 * pp}[mult]
    assert_lines_equal(compact("dualpipev", pp, n), oracle_lines("dualpipev", pp, n),
                       f"dualpipev P={pp} N={n}")


@pytest.mark.parametrize("pp,n", [(2, 4), (4, 8), (4, 10), (8, 16)])
def test_dualpipev_is_the_first_half_of_dualpipe(pp, n):
    """Notes, section 3: DualPipeV(P, N) rank r runs DualPipe(2P, 2N) rank r."""
    assert compact("dualpipev", pp, n) == compact("dualpipe", 2 * pp, 2 * n)[:pp]


def test_compact_format_shape():
    lines = compact("1f1b", 3, 4)
    assert lines == [
        "rank 0: F0d F1d F2d B0d F3d B1d B2d B3d",
        "rank 1: F0d F1d B0d F2d B1d F3d B2d B3d",
        "rank 2: F0d B0d F1d B1d F2d B2d F3d B3d",
    ]
    for line in compact("zb1p", 4, 8) + compact("dualpipe", 4, 8):
        assert not line.endswith(" ") and "  " not in line, repr(line)
        for op in compact_ops(line):
            assert op[0] in "FBIW(", op


# --------------------------------------------------------------------------
# (b) json: the summary against the formulas and the op lists


# schedule, P, N, bubble by the README's table (PP = stages), copies
FORMULA_CASES = [
    ("1f1b", 4, 8, (4 - 1) * (F + B), 1),
    ("zb1p", 4, 8, (4 - 1) * (F + B - 2 * W), 1),
    ("dualpipe", 8, 20, (8 // 2 - 1) * (FB + B - 3 * W), 2),
    ("dualpipev", 4, 8, (2 * 4 // 2 - 1) * (FB + B - 3 * W), 2),
]


@pytest.mark.parametrize("schedule,pp,n,bubble,copies", FORMULA_CASES,
                         ids=[c[0] for c in FORMULA_CASES])
def test_json_summary_matches_formulas(schedule, pp, n, bubble, copies):
    doc = plan_json(schedule, pp, n)
    lines = compact(schedule, pp, n)
    stages = 2 * pp if schedule == "dualpipev" else pp
    chunks = 1 if schedule in ("1f1b", "zb1p") else 2

    assert doc["schedule"] == schedule
    assert (doc["ranks"], doc["microbatches"], doc["stages"], doc["chunks_per_rank"]) == \
        (pp, n, stages, chunks)
    assert doc["costs"]["F"] == F and doc["costs"]["B"] == B and doc["costs"]["W"] == W
    assert doc["costs"]["I"] == I and doc["costs"]["FB"] == FB
    s = doc["summary"]
    assert s["bubble"] == pytest.approx(bubble), s
    assert s["param_copies"] == copies
    if schedule == "1f1b":
        assert s["makespan"] == pytest.approx((n + pp - 1) * (F + B))
    if schedule in ("1f1b", "zb1p"):
        assert s["max_peak_activations"] == pp
    if schedule == "dualpipe":
        assert s["max_peak_activations"] == pp + 1  # README: PP+1

    detail = doc["ranks_detail"]
    assert [d["rank"] for d in detail] == list(range(pp))
    for d, line in zip(detail, lines):
        ops = compact_ops(line)
        assert d["busy"] == pytest.approx(busy_time(ops)), d["rank"]
        assert d["busy"] + d["idle"] == pytest.approx(s["makespan"])
        assert d["peak_activations"] == peak_activations(ops), d["rank"]
        compute = [o for o in d["ops"] if o["kind"] not in ("SEND", "RECV")]
        assert len(compute) == len(ops)
        assert [o["index"] for o in d["ops"]] == list(range(len(d["ops"])))
        for o in d["ops"]:
            assert 0 <= o["start"] <= o["end"] <= s["makespan"] + 1e-9, o
            if o["kind"] == "FB":
                assert set(o["backward"]) == {"path", "mb", "stage", "chunk"}
            if o["kind"] in ("SEND", "RECV"):
                assert o["payload"] in ("activation", "gradient") and 0 <= o["peer"] < pp
    assert s["bubble"] == pytest.approx(max(d["idle"] for d in detail))
    assert s["max_peak_activations"] == max(d["peak_activations"] for d in detail)


def test_json_compute_ops_follow_compact_order():
    doc = plan_json("dualpipe", 4, 10)
    for d, line in zip(doc["ranks_detail"], compact("dualpipe", 4, 10)):
        names = []
        for o in d["ops"]:
            leg = "du"[o["chunk"]]
            if o["kind"] == "FB":
                bw = o["backward"]
                names.append(f"(F{o['mb']}{leg};B{bw['mb']}{'du'[bw['chunk']]})")
            elif o["kind"] not in ("SEND", "RECV"):
                names.append(f"{o['kind']}{o['mb']}{leg}")
        assert names == compact_ops(line)
        starts = [o["start"] for o in d["ops"] if o["kind"] not in ("SEND", "RECV")]
        assert starts == sorted(starts), "a rank runs its ops in order"


def test_json_dualpipe_bubble_with_cheaper_overlap():
    """--costs FB=2 (overlap saves one unit): (PP/2-1)(F&B+B-3W) = 3 x 1."""
    doc = plan_json("dualpipe", 8, 20, "--costs", "F=1,B=2,W=1,FB=2")
    assert doc["costs"]["FB"] == 2
    assert doc["summary"]["bubble"] == pytest.approx((8 // 2 - 1) * (2 + B - 3 * W))


def test_json_costs_option_is_applied():
    doc = plan_json("1f1b", 4, 8, "--costs", "F=2,B=3,W=1")
    assert doc["costs"]["F"] == 2 and doc["costs"]["B"] == 3
    assert doc["costs"]["I"] == 2 and doc["costs"]["FB"] == 5  # B-W, F+B
    assert doc["summary"]["makespan"] == pytest.approx((8 + 4 - 1) * (2 + 3))
    assert doc["summary"]["bubble"] == pytest.approx((4 - 1) * (2 + 3))


# --------------------------------------------------------------------------
# (c) svg


@pytest.mark.parametrize("schedule,pp,n", [("dualpipe", 8, 20), ("zb1p", 4, 8),
                                           ("dualpipev", 3, 7)])
def test_svg_is_xml_with_one_box_per_compute_op(schedule, pp, n):
    out = plan("--schedule", schedule, "--pp", pp, "--microbatches", n, "--format", "svg")
    root = ET.fromstring(out)
    assert root.tag == SVG_NS + "svg"
    boxes = [g for g in root.iter(SVG_NS + "g") if g.get("class", "").split()[:1] == ["op"]]
    ops = [op for line in compact(schedule, pp, n) for op in compact_ops(line)]
    assert len(boxes) == len(ops)
    kinds = collections.Counter(g.get("class").split()[1] for g in boxes)
    want = collections.Counter("FB" if op[0] == "(" else op[0] for op in ops)
    assert kinds == want
    for g in boxes:
        assert g.findall(SVG_NS + "rect"), "every op is drawn as a box"
    labels = [t.text for t in root.iter(SVG_NS + "text")]
    for r in range(pp):
        assert f"rank {r}" in labels


# --------------------------------------------------------------------------
# (d) text


@pytest.mark.parametrize("schedule,pp,n", [("dualpipe", 8, 20), ("1f1b", 4, 8),
                                           ("dualpipev", 2, 5)])
def test_text_has_a_row_per_rank_and_the_summary(schedule, pp, n):
    out = plan("--schedule", schedule, "--pp", pp, "--microbatches", n)
    rows = [line for line in out.splitlines() if line.startswith("rank ")]
    assert len(rows) == pp
    assert all("|" in row for row in rows)
    for word in ("legend", "makespan", "bubble", "idle", "peak activations",
                 "parameter copies", schedule):
        assert word in out, word
    assert max(len(line) for line in out.splitlines() if line.startswith("rank ")) <= 140


def test_help_documents_every_option():
    result = ctl("plan", "--help")
    assert result.returncode == EXIT_OK, describe(result)
    for opt in ("--schedule", "--pp", "--microbatches", "--costs", "--format", "--out",
                "duplexctl plan --schedule dualpipe --pp 8 --microbatches 20 --format compact"):
        assert opt in result.stdout, opt
    listing = ctl("help")
    assert "plan" in listing.stdout


# --------------------------------------------------------------------------
# (e) errors


def usage_error(*args):
    result = ctl("plan", *args)
    assert result.returncode == EXIT_USAGE, describe(result)
    assert result.stderr.startswith("duplexctl plan: "), describe(result)
    assert result.stdout == "", describe(result)
    return result.stderr


def test_dualpipe_needs_even_ranks():
    assert "even" in usage_error("--schedule", "dualpipe", "--pp", 3, "--microbatches", 12)


def test_dualpipe_needs_even_microbatches():
    err = usage_error("--schedule", "dualpipe", "--pp", 2, "--microbatches", 5)
    assert "even" in err and "5" in err


def test_microbatches_below_twice_the_ranks():
    assert "8" in usage_error("--schedule", "dualpipe", "--pp", 4, "--microbatches", 6)
    assert "8" in usage_error("--schedule", "dualpipev", "--pp", 4, "--microbatches", 7)


def test_unknown_schedule():
    assert "gpipe" in usage_error("--schedule", "gpipe", "--pp", 4, "--microbatches", 8)


def test_unknown_format():
    assert "png" in usage_error("--pp", 4, "--microbatches", 8, "--format", "png")


@pytest.mark.parametrize("spec", ["F=abc", "Q=1", "F", "B=-1"])
def test_bad_costs(spec):
    assert "costs" in usage_error("--pp", 4, "--microbatches", 8, "--costs", spec)


@pytest.mark.parametrize("args", [("--microbatches", 8), ("--pp", 4), ("--pp", 0,
                                                                        "--microbatches", 8)])
def test_missing_or_bad_sizes(args):
    usage_error(*args)


def test_out_to_unwritable_path(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file\n")
    target = blocker / "plan.svg"
    result = ctl("plan", "--pp", 4, "--microbatches", 8, "--format", "svg", "--out", target)
    assert result.returncode != EXIT_OK, describe(result)
    assert str(target) in result.stderr, describe(result)
    assert result.stdout == ""


# --------------------------------------------------------------------------
# (f) --out


@pytest.mark.parametrize("fmt", ["compact", "json", "svg", "text"])
def test_out_writes_the_file(tmp_path, fmt):
    target = tmp_path / f"plan.{fmt}"
    args = ("--schedule", "dualpipev", "--pp", 3, "--microbatches", 7, "--format", fmt)
    result = ctl("plan", *args, "--out", target)
    assert result.returncode == EXIT_OK, describe(result)
    assert result.stdout == ""
    assert target.read_text() == plan(*args)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name], "no temporary left"
    # and once more over the existing file
    result = ctl("plan", *args, "--out", target)
    assert result.returncode == EXIT_OK, describe(result)
    assert target.read_text() == plan(*args)
