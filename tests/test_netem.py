"""Unit tests of the shaped-link helper: argument checks and the ``ip`` / ``tc`` commands it issues.

Commands are captured by replacing ``netem._run``, so these need no root; one test at the end really
creates a link and kills its owner with SIGTERM (skipped where links cannot be created).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lightning_netsense import netem
from lightning_netsense.netem import CompetingFlows, NetemError, ShapedLink


class _Recorder:
    """Stands in for ``netem._run``: records each command, answers ``ip netns list/pids`` from a script."""

    def __init__(self, fail_on: str | None = None, netns_list: str = "", pids: str = ""):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.netns_list = netns_list
        self.pids = pids

    def __call__(self, args, check=True):
        args = list(args)
        self.calls.append(args)
        if self.fail_on is not None and self.fail_on in " ".join(args):
            raise NetemError(f"`{' '.join(args)}` failed (exit 2): RTNETLINK answers: Operation not permitted")
        out = ""
        if args[:3] == ["ip", "netns", "list"]:
            out = self.netns_list
        elif args[:3] == ["ip", "netns", "pids"]:
            out = self.pids
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    def joined(self) -> list[str]:
        return [" ".join(c) for c in self.calls]


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(netem, "_run", rec)
    return rec


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rate_mbit": 0}, "rate_mbit"),
        ({"rate_mbit": -5.0}, "rate_mbit"),
        ({"rate_mbit": "100"}, "rate_mbit"),
        ({"rate_mbit": True}, "rate_mbit"),
        ({"rate_mbit": 1e6}, "rate_mbit"),
        ({"burst_bytes": 4096}, "burst_bytes"),
        ({"burst_bytes": 131072.0}, "burst_bytes"),
        ({"latency_ms": 0}, "latency_ms"),
        ({"network": "8.8.8.0/30"}, "network"),
        ({"network": "10.231.0.0/31"}, "network"),
        ({"network": "not-a-network"}, "network"),
        ({"prefix": "NSL"}, "prefix"),
        ({"prefix": "toolong"}, "prefix"),
        ({"handle_signals": 1}, "handle_signals"),
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ShapedLink(**kwargs)


def test_names_and_addresses():
    a, b = ShapedLink(), ShapedLink(network="192.168.77.0/24")
    assert a.netns(0) != b.netns(0) and a.netns(0) != a.netns(1)
    assert str(os.getpid()) in a.netns(0)
    for link in (a, b):
        for side in (0, 1):
            assert len(link.ifname(side)) <= 15  # IFNAMSIZ - 1
            assert link.netns(side).startswith(netem.PREFIX)
    assert (a.address(0), a.address(1)) == ("10.231.0.1", "10.231.0.2")
    assert (b.address(0), b.address(1)) == ("192.168.77.1", "192.168.77.2")
    assert a.exec_args(1) == ["ip", "netns", "exec", a.netns(1)]
    with pytest.raises(ValueError, match="`side`"):
        a.address(2)
    with pytest.raises(ValueError, match="`side`"):
        a.ifname(True)


def test_create_shapes_both_ends_and_close_removes_them(recorder):
    link = ShapedLink(rate_mbit=12.5, burst_bytes=262144, latency_ms=50)
    with link:
        assert link.created
        calls = recorder.joined()
    ns0, ns1, if0, if1 = link.netns(0), link.netns(1), link.ifname(0), link.ifname(1)
    assert calls[:2] == [f"ip netns add {ns0}", f"ip netns add {ns1}"]
    # the veth is created inside the namespaces: its names never exist in the root namespace
    assert f"ip link add {if0} netns {ns0} type veth peer name {if1} netns {ns1}" in calls
    assert f"ip -n {ns0} addr add 10.231.0.1/30 dev {if0}" in calls
    assert f"ip -n {ns1} link set {if1} up" in calls
    for ns, dev in ((ns0, if0), (ns1, if1)):
        assert f"tc -n {ns} qdisc replace dev {dev} root tbf rate 12500kbit burst 262144 latency 50ms" in calls
    assert recorder.joined()[-2:] == [f"ip netns del {ns0}", f"ip netns del {ns1}"]
    assert not link.created


def test_rate_change_keeps_burst_and_unshaping_round_trips(recorder):
    with ShapedLink(rate_mbit=1000) as link:
        start = len(recorder.calls)
        link.rate_mbit = 20
        link.set_rate(None)
        link.set_rate(100)
        calls = recorder.joined()[start:]
        assert link.rate_mbit == 100
    ns, dev = link.netns(0), link.ifname(0)
    assert calls[0] == f"tc -n {ns} qdisc change dev {dev} root tbf rate 20000kbit burst 131072 latency 100ms"
    assert f"tc -n {ns} qdisc del dev {dev} root" in calls
    # from unshaped, the qdisc has to be added again
    assert f"tc -n {ns} qdisc replace dev {dev} root tbf rate 100000kbit burst 131072 latency 100ms" in calls
    assert len(calls) == 6  # each action on both ends


def test_outage_takes_both_ends_down_and_up(recorder):
    with ShapedLink() as link:
        start = len(recorder.calls)
        link.down()
        assert not link.is_up
        link.up()
        assert link.is_up
        calls = recorder.joined()[start:]
    assert calls == [
        f"ip -n {link.netns(0)} link set {link.ifname(0)} down",
        f"ip -n {link.netns(1)} link set {link.ifname(1)} down",
        f"ip -n {link.netns(0)} link set {link.ifname(0)} up",
        f"ip -n {link.netns(1)} link set {link.ifname(1)} up",
    ]


def test_failed_creation_removes_what_was_made(monkeypatch):
    rec = _Recorder(fail_on="type veth")
    monkeypatch.setattr(netem, "_run", rec)
    link = ShapedLink()
    with pytest.raises(NetemError, match="Operation not permitted"):
        link.create()
    assert rec.joined()[-2:] == [f"ip netns del {link.netns(0)}", f"ip netns del {link.netns(1)}"]
    assert not link.created and link not in netem._live


def test_use_before_create_is_refused():
    link = ShapedLink()
    for call in (lambda: link.set_rate(10), link.down, link.up, lambda: link.counters(0), lambda: link.qdisc(1)):
        with pytest.raises(RuntimeError, match="not created"):
            call()


def test_sigterm_handler_installed_while_a_link_lives(recorder):
    before = signal.getsignal(signal.SIGTERM)
    with ShapedLink():
        assert signal.getsignal(signal.SIGTERM) is netem._on_signal
    assert signal.getsignal(signal.SIGTERM) is before
    with ShapedLink(handle_signals=False):
        assert signal.getsignal(signal.SIGTERM) is before


def test_competing_flows_validate_arguments():
    for kwargs, name in (({"flows": 0}, "flows"), ({"seconds": 0}, "seconds"), ({"port": 80}, "port"),
                         ({"source": 2}, "source|side")):
        with pytest.raises(ValueError, match=f"`({name})`"):
            CompetingFlows(link=None, **kwargs)


def test_cleanup_stale_removes_only_dead_owners(monkeypatch):
    dead, alive = 4_000_001, os.getpid() + 1
    listing = "\n".join([
        f"nsl{dead}x0a (id: 3)", f"nsl{dead}x0b (id: 4)",
        f"nsl{alive}x1a (id: 5)",
        "nslfoo", "other123x0a", "myns (id: 1)",
    ])
    rec = _Recorder(netns_list=listing)
    monkeypatch.setattr(netem, "_run", rec)
    monkeypatch.setattr(netem, "_pid_alive", lambda pid: pid != dead)
    assert netem.cleanup_stale() == [f"nsl{dead}x0a", f"nsl{dead}x0b"]
    assert f"ip netns del nsl{dead}x0a" in rec.joined()
    assert not [c for c in rec.joined() if "del" in c and (str(alive) in c or "myns" in c or "other" in c)]
    rec.calls.clear()
    assert netem.cleanup_stale(include_alive=True) == [f"nsl{dead}x0a", f"nsl{dead}x0b", f"nsl{alive}x1a"]
    with pytest.raises(ValueError, match="`prefix`"):
        netem.cleanup_stale(prefix="../x")


def test_available_explains_missing_root(monkeypatch):
    monkeypatch.setattr(netem, "_available", None)
    monkeypatch.setattr(netem.os, "geteuid", lambda: 1000)
    ok, reason = netem.available()
    assert not ok and "root" in reason


def test_command_errors_name_the_command():
    with pytest.raises(NetemError, match="definitely-not-a-program-xyz.*could not run"):
        netem._run(["definitely-not-a-program-xyz"])
    with pytest.raises(NetemError, match=r"exit 3\): boom"):
        netem._run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])


# ------------------------------------------------------------------------------------------ real link (root)
_OWNER = textwrap.dedent(
    """
    import importlib.util, sys, time
    # load netem.py alone: the package __init__ imports Lightning, which takes seconds to start
    spec = importlib.util.spec_from_file_location("netem", sys.argv[1])
    netem = importlib.util.module_from_spec(spec); spec.loader.exec_module(netem)
    link = netem.ShapedLink(rate_mbit=100).create()
    print(link.netns(0), link.netns(1), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.shaped
def test_sigterm_removes_a_real_link():
    ok, reason = netem.available()
    if not ok:
        pytest.skip(f"kernel-shaped link unavailable: {reason}")
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, netem.__file__], stdout=subprocess.PIPE, text=True)
    try:
        names = proc.stdout.readline().split()
        assert len(names) == 2, "the owner process did not create its link"
        listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
        assert all(n in listed for n in names)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM  # cleaned up, then died of the signal as before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    listed = ""
    while time.monotonic() < deadline:
        listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
        if not any(n in listed for n in names):
            break
        time.sleep(0.05)
    assert not any(n in listed for n in names), f"left behind: {listed}"
