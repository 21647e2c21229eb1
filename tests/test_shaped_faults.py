"""Faults of the link on a kernel-shaped link (root, network namespaces): outages survived within the budget and
fatal beyond it; one-way shaping and a straggling rank change nothing in what the ranks agree on.

The failure-detection budget is the process-group timeout (``NetSenseStrategy(timeout=...)``; the ranks here run
plain DDP with ``netsense_hook`` from ``tests/shaped_worker.py`` and get it through ``--timeout``). While the link
is down TCP retransmits with exponential back-off, so a collective caught in an outage waits for the link and
then for the next retransmission; an outage that ends within the budget costs one slow step, one that does not
makes every rank raise. Skipped, with the reason, where namespaces cannot be created.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from shaped_worker import read_lines

from lightning_netsense.netem import ShapedLink, available, cleanup_stale

pytestmark = [pytest.mark.shaped, pytest.mark.slow]

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shaped_worker.py")
_MODEL = ["--width", "128", "--depth", "3", "--batch", "16", "--bucket-cap-mb", "0.05"]
_SLACK_S = 10.0  # allowed on top of the budget for every rank to have raised and exited


@pytest.fixture(scope="module")
def shaping():
    ok, reason = available()
    if not ok:
        pytest.skip(f"kernel-shaped link unavailable: {reason}")
    cleanup_stale()


def _outage(tmp_path, link: ShapedLink, budget: float, outage: float, steps: int, cut_after: int) -> dict:
    """Two ranks train; after step ``cut_after`` the link goes down for ``outage`` seconds (``inf``: until both
    ranks have exited) while they go on. Returns each rank's records, exit code and exit time after the cut."""
    outs = [str(tmp_path / f"rank{r}.jsonl") for r in (0, 1)]
    errs = [open(tmp_path / f"rank{r}.err", "w") for r in (0, 1)]
    procs = []
    try:
        for r in (0, 1):
            cmd = [sys.executable, WORKER, "--rank", str(r), "--master-addr", link.address(0),
                   "--ifname", link.ifname(r), "--out", outs[r], "--steps", str(steps), "--control", str(tmp_path),
                   "--pause-at", str(cut_after), "--timeout", str(budget), "--policy", "netsense", *_MODEL]
            procs.append(link.popen(r, cmd, stdout=errs[r], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while not all(any(e.get("event") == "paused" for e in read_lines(o)) for o in outs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _tails(tmp_path)
            time.sleep(0.05)
        link.down()
        t_cut = time.monotonic()
        timer = threading.Timer(outage, link.up) if outage != float("inf") else None
        if timer:
            timer.start()
        (tmp_path / f"resume_{cut_after}").touch()  # the ranks go on into the dead link
        exit_after: list[float | None] = [None, None]
        limit = t_cut + (outage if timer else budget) + _SLACK_S + 60
        while any(x is None for x in exit_after) and time.monotonic() < limit:
            for r, p in enumerate(procs):
                if exit_after[r] is None and p.poll() is not None:
                    exit_after[r] = time.monotonic() - t_cut
            time.sleep(0.05)
        if timer:
            timer.join()
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for f in errs:
            f.close()
    return {"ranks": [read_lines(o) for o in outs], "codes": codes, "exit_after": exit_after,
            "tails": _tails(tmp_path)}


def _tails(tmp_path) -> str:
    return "\n".join(f"--- rank {r}:\n" + (tmp_path / f"rank{r}.err").read_text()[-2000:] for r in (0, 1))


def test_outage_within_the_budget_is_survived_with_identical_replicas(shaping, tmp_path):
    budget, outage = 20.0, 3.0
    with ShapedLink(rate_mbit=1000) as link:
        out = _outage(tmp_path, link, budget, outage, steps=8, cut_after=3)
    assert out["codes"] == [0, 0], out["tails"]
    done = [next(e for e in records if e["event"] == "done") for records in out["ranks"]]
    assert done[0]["params_sha256"] == done[1]["params_sha256"], "the replicas diverged"
    steps = [[e for e in records if e["event"] == "step"] for records in out["ranks"]]
    assert [e["decision"] for e in steps[0]] == [e["decision"] for e in steps[1]]
    # the outage hit traffic: the step after the cut waited for the link (and for TCP's next retransmission)
    stalled = max(e["t_end"] - e["t_start"] for e in steps[0][4:])
    assert outage - 0.5 <= stalled < budget, f"slowest step after the cut: {stalled:.1f} s"
    print(f"\n{outage:g} s outage: the slowest step took {stalled:.1f} s")


def test_outage_beyond_the_budget_makes_every_rank_raise(shaping, tmp_path):
    budget = 8.0
    with ShapedLink(rate_mbit=1000) as link:
        out = _outage(tmp_path, link, budget, float("inf"), steps=50, cut_after=3)
    assert all(c not in (None, 0) for c in out["codes"]), f"exit codes {out['codes']}\n{out['tails']}"
    for r, seconds in enumerate(out["exit_after"]):
        assert seconds is not None and seconds < budget + _SLACK_S, f"rank {r}: {seconds} s\n{out['tails']}"
    print(f"\nranks exited {out['exit_after'][0]:.1f} s and {out['exit_after'][1]:.1f} s after the cut (budget {budget:g} s)")
    names = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout.split()
    assert not [n for n in names if n.startswith(f"nsl{os.getpid()}x")]


def test_one_way_shaping_and_a_straggler_keep_decisions_and_replicas_identical(shaping, tmp_path):
    """Rank 1's egress at 20 Mbit/s, rank 0's at 1 Gbit/s, and rank 1 50 ms late into every step: each rank measures
    its own link differently, and the agreement at the boundary must still give both the same decisions."""
    steps = 12
    outs = [str(tmp_path / f"rank{r}.jsonl") for r in (0, 1)]
    errs = [open(tmp_path / f"rank{r}.err", "w") for r in (0, 1)]
    procs = []
    with ShapedLink(rate_mbit=1000) as link:
        # one direction only: the tbf on rank 1's end, with the same burst (changing it can wedge the link)
        subprocess.run(["tc", "-n", link.netns(1), "qdisc", "change", "dev", link.ifname(1), "root", "tbf",
                        "rate", "20000kbit", "burst", str(link.burst_bytes), "latency", f"{link.latency_ms:g}ms"],
                       check=True, capture_output=True)
        try:
            for r in (0, 1):
                cmd = [sys.executable, WORKER, "--rank", str(r), "--master-addr", link.address(0),
                       "--ifname", link.ifname(r), "--out", outs[r], "--steps", str(steps), "--timeout", "60",
                       "--policy", "netsense", "--straggle", "0.05" if r == 1 else "0", *_MODEL]
                procs.append(link.popen(r, cmd, stdout=errs[r], stderr=subprocess.STDOUT))
            codes = [p.wait(timeout=150) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
            for f in errs:
                f.close()
    assert codes == [0, 0], _tails(tmp_path)
    records = [read_lines(o) for o in outs]
    steps_of = [[e for e in rs if e["event"] == "step"] for rs in records]
    assert len(steps_of[0]) == len(steps_of[1]) == steps
    assert [e["decision"] for e in steps_of[0]] == [e["decision"] for e in steps_of[1]]
    assert [e["mode"] for e in steps_of[0]] == [e["mode"] for e in steps_of[1]]
    done = [next(e for e in rs if e["event"] == "done") for rs in records]
    assert done[0]["params_sha256"] == done[1]["params_sha256"], "the replicas diverged"
    # the two directions really differ: what each rank's own collectives measured (before the agreement)
    print("\nmodes:", [e["mode"] for e in steps_of[0]],
          "\nagreed estimate (Mbit/s):", [f"{e['bandwidth_mbit']:.0f}" for e in steps_of[0]])
