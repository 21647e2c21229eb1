"""Kernel-shaped links for tests and benchmarks: two network namespaces joined by a shaped veth pair.

:class:`ShapedLink` creates namespaces ``<ns>a`` and ``<ns>b`` joined by a veth pair with a private address on
each end, shapes *both* ends with ``tc tbf`` (one direction each, as a real full-duplex link), changes the rate
while traffic runs, takes the link down and up (this kernel has no ``netem``: an outage is the next best thing),
starts competing TCP flows across it, and removes everything again - also on an exception, ``SIGINT``,
``SIGTERM`` or interpreter exit. Run one rank in each namespace with :meth:`ShapedLink.exec_args` or
:meth:`ShapedLink.popen`; traffic between them never leaves the two namespaces.

Needs root, ``ip`` and ``tc`` (iproute2). :func:`available` tries it and says why not, for ``pytest.skip``.

Example::

    ok, why = available()
    with ShapedLink(rate_mbit=100) as link:
        rank0 = link.popen(0, [sys.executable, "train.py", "--rank", "0", "--master", link.address(0)])
        rank1 = link.popen(1, [sys.executable, "train.py", "--rank", "1", "--master", link.address(0)])
        link.rate_mbit = 20  # tc qdisc change on both ends, while training runs
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from typing_extensions import Self

__all__ = ["PREFIX", "CompetingFlows", "NetemError", "ShapedLink", "available", "cleanup_stale"]

log = logging.getLogger(__name__)

#: Name prefix of every namespace this module creates; :func:`cleanup_stale` removes leftovers by it.
PREFIX = "nsl"
# tc's "1mbit" as a size is 2**20 / 8 bytes. A smaller bucket cost throughput at 1 Gbit/s, and a bucket
# smaller than a queued GSO packet never lets it through (a collective then stalls until the timeout).
_MIN_BURST_BYTES = 131072
_COMMAND_TIMEOUT = 30.0
_counter = itertools.count()
_live: set[ShapedLink] = set()
_live_lock = threading.RLock()
_previous_handlers: dict[int, Any] = {}
_atexit_registered = False


class NetemError(RuntimeError):
    """An ``ip`` / ``tc`` command failed; the message holds the command and its error output."""


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetemError(f"`{' '.join(args)}` could not run: {err}") from err
    if check and proc.returncode != 0:
        raise NetemError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _check_side(side: int) -> int:
    if side not in (0, 1) or isinstance(side, bool):
        raise ValueError(f"Expected `side` to be 0 or 1, but got {side!r}")
    return side


def _check_rate(rate_mbit: float | None) -> float | None:
    if rate_mbit is None:
        return None
    if isinstance(rate_mbit, bool) or not isinstance(rate_mbit, (int, float)) or not 0.01 <= rate_mbit <= 100_000:
        raise ValueError(f"Expected `rate_mbit` in [0.01, 100000] Mbit/s or None (unshaped), but got {rate_mbit!r}")
    return float(rate_mbit)


class ShapedLink:
    """Two network namespaces joined by a veth pair, both ends shaped by ``tc tbf``.

    Side 0 lives in namespace ``netns(0)`` with interface ``ifname(0)`` and address ``address(0)``; side 1
    likewise. Names carry this process's pid and a counter, so parallel and stale runs never clash.

    Args:
        rate_mbit: tbf rate of each direction in Mbit/s (IP packets including their Ethernet header count);
            ``None`` leaves the veth unshaped.
        burst_bytes: tbf bucket size, kept unchanged when the rate changes (shrinking it with the rate wedged
            the link); at least 131072 (tc's ``1mbit``).
        latency_ms: the longest a packet may wait in the tbf queue (sets the queue length).
        network: private IPv4 network the two ends are numbered from (first two host addresses). It exists
            only inside the two namespaces.
        prefix: namespace name prefix (letters, at most 4), for :func:`cleanup_stale`.
        handle_signals: on ``SIGTERM``/``SIGHUP`` remove the link before the process dies (main thread only).

    Raises:
        ValueError: if an argument is out of range.
        NetemError: (on :meth:`create`) if a command fails; whatever was created is removed again.
    """

    def __init__(
        self,
        rate_mbit: float | None = 1000.0,
        burst_bytes: int = _MIN_BURST_BYTES,
        latency_ms: float = 100.0,
        network: str = "10.231.0.0/30",
        prefix: str = PREFIX,
        handle_signals: bool = True,
    ) -> None:
        self._rate = _check_rate(rate_mbit)
        if isinstance(burst_bytes, bool) or not isinstance(burst_bytes, int) or burst_bytes < _MIN_BURST_BYTES:
            raise ValueError(
                f"Expected `burst_bytes` to be an integer >= {_MIN_BURST_BYTES} (tc's 1mbit; smaller buckets starve"
                f" or wedge the link), but got {burst_bytes!r}"
            )
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or not 1 <= latency_ms <= 10_000:
            raise ValueError(f"Expected `latency_ms` in [1, 10000], but got {latency_ms!r}")
        try:
            net = ipaddress.IPv4Network(network)
        except ValueError as err:
            raise ValueError(f"Expected `network` to be an IPv4 network like '10.231.0.0/30', but got {network!r}") from err
        if not net.is_private or net.prefixlen > 30:
            raise ValueError(f"Expected `network` to be a private IPv4 network of prefix length <= 30, but got {network!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-z]{1,4}", prefix):
            raise ValueError(f"Expected `prefix` to be 1-4 lowercase letters, but got {prefix!r}")
        if not isinstance(handle_signals, bool):
            raise ValueError(f"Expected `handle_signals` to be a bool, but got {handle_signals!r}")  # noqa: TRY004
        self.burst_bytes = burst_bytes
        self.latency_ms = float(latency_ms)
        self.network = net
        self.prefix = prefix
        self.handle_signals = handle_signals
        # interface names are limited to 15 characters: prefix (4) + pid (7) + "x" + counter + side
        token = f"{prefix}{os.getpid()}x{next(_counter) % 100}"
        self._netns = (f"{token}a", f"{token}b")
        self._ifname = (f"{token}a", f"{token}b")
        hosts = itertools.islice(net.hosts(), 2)
        self._address = tuple(str(h) for h in hosts)
        self._created = False
        self._up = True
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ naming
    def netns(self, side: int) -> str:
        """Name of the namespace of ``side`` (0 or 1)."""
        return self._netns[_check_side(side)]

    def ifname(self, side: int) -> str:
        """The veth interface inside ``side``'s namespace (e.g. for ``GLOO_SOCKET_IFNAME``)."""
        return self._ifname[_check_side(side)]

    def address(self, side: int) -> str:
        """IPv4 address of ``side``'s end of the link."""
        return self._address[_check_side(side)]

    def exec_args(self, side: int) -> list[str]:
        """Command prefix that runs a program inside ``side``'s namespace: ``["ip", "netns", "exec", NS]``."""
        return ["ip", "netns", "exec", self.netns(side)]

    @property
    def created(self) -> bool:
        return self._created

    def __repr__(self) -> str:
        rate = "unshaped" if self._rate is None else f"{self._rate:g} Mbit/s"
        return f"ShapedLink({self._netns[0]}<->{self._netns[1]}, {rate}, {'up' if self._up else 'down'})"

    # ------------------------------------------------------------------ lifecycle
    def create(self) -> ShapedLink:
        """Create both namespaces, the veth pair, addresses and shaping. Idempotent."""
        if self._created:
            return self
        with _live_lock:
            _live.add(self)
            _install_handlers(self.handle_signals)
        self._created = True
        try:
            for ns in self._netns:
                _run(["ip", "netns", "add", ns])
            # created directly inside the namespaces: the names never exist in the root namespace
            _run(["ip", "link", "add", self._ifname[0], "netns", self._netns[0], "type", "veth",
                  "peer", "name", self._ifname[1], "netns", self._netns[1]])
            for side in (0, 1):
                ns, dev = self._netns[side], self._ifname[side]
                _run(["ip", "-n", ns, "addr", "add", f"{self._address[side]}/{self.network.prefixlen}", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
            if self._rate is not None:
                self._tc("replace", self._rate)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the processes started through :meth:`popen` and remove both namespaces (and so the veth)."""
        for proc in self._procs:
            _stop_process(proc)
        self._procs.clear()
        if self._created:
            for ns in self._netns:
                # deleting a namespace deletes the veth end in it; the peer goes with it
                _run(["ip", "netns", "del", ns], check=False)
            self._created = False
        with _live_lock:
            _live.discard(self)
            if not _live:
                _restore_handlers()

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ shaping
    @property
    def rate_mbit(self) -> float | None:
        """Shaped rate of each direction in Mbit/s (``None``: unshaped). Setting it calls :meth:`set_rate`."""
        return self._rate

    @rate_mbit.setter
    def rate_mbit(self, value: float | None) -> None:
        self.set_rate(value)

    def set_rate(self, rate_mbit: float | None) -> None:
        """Change the rate of both ends in place (``tc qdisc change``), keeping the burst; ``None`` unshapes."""
        rate = _check_rate(rate_mbit)
        self._require_created()
        if rate is None:
            if self._rate is not None:
                for side in (0, 1):
                    _run(["tc", "-n", self._netns[side], "qdisc", "del", "dev", self._ifname[side], "root"])
        else:
            self._tc("change" if self._rate is not None else "replace", rate)
        self._rate = rate

    def _tc(self, verb: str, rate: float) -> None:
        for side in (0, 1):
            _run([
                "tc", "-n", self._netns[side], "qdisc", verb, "dev", self._ifname[side], "root", "tbf",
                # tc reads "kbit" in a rate as 1000 bit/s
                "rate", f"{round(rate * 1000)}kbit",
                "burst", str(self.burst_bytes),
                "latency", f"{self.latency_ms:g}ms",
            ])

    def qdisc(self, side: int) -> str:
        """``tc -s qdisc show`` of ``side``'s interface (rate, backlog, drops), for diagnostics."""
        self._require_created()
        return _run(["tc", "-s", "-n", self.netns(side), "qdisc", "show", "dev", self.ifname(side)]).stdout.strip()

    # ------------------------------------------------------------------ outages
    @property
    def is_up(self) -> bool:
        return self._up

    def down(self) -> None:
        """Take both ends down: nothing crosses (TCP connections stall and retry) until :meth:`up`."""
        self._require_created()
        for side in (0, 1):
            _run(["ip", "-n", self._netns[side], "link", "set", self._ifname[side], "down"])
        self._up = False

    def up(self) -> None:
        """Bring both ends up again (addresses and the shaping survive the outage)."""
        self._require_created()
        for side in (0, 1):
            _run(["ip", "-n", self._netns[side], "link", "set", self._ifname[side], "up"])
        self._up = True

    # ------------------------------------------------------------------ processes and counters
    def popen(self, side: int, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``args`` inside ``side``'s namespace; it is stopped (if still running) by :meth:`close`."""
        self._require_created()
        proc = subprocess.Popen([*self.exec_args(side), *args], **kwargs)
        self._procs.append(proc)
        return proc

    def counters(self, side: int) -> dict[str, int]:
        """Byte and packet counters of ``side``'s interface (``tx_bytes``, ``rx_bytes``, ``tx_packets``, ...)."""
        self._require_created()
        names = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "tx_dropped")
        paths = [f"/sys/class/net/{self.ifname(side)}/statistics/{n}" for n in names]
        # /sys shows the namespace of the mounting process: read it from inside
        out = _run([*self.exec_args(side), "cat", *paths]).stdout.split()
        return {n: int(v) for n, v in zip(names, out)}

    def competing_flows(
        self, flows: int = 1, seconds: float = 10.0, source: int = 0, port: int = 5201
    ) -> CompetingFlows:
        """Start ``flows`` bulk TCP connections from ``source`` to the other side for ``seconds`` (bounded)."""
        self._require_created()
        return CompetingFlows(self, flows=flows, seconds=seconds, source=source, port=port)

    def _require_created(self) -> None:
        if not self._created:
            raise RuntimeError(f"{self!r} is not created: use it as a context manager or call create() first")


_RECEIVER = r"""
import socket, sys, threading, time
host, port, flows, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), time.time() + float(sys.argv[4])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((host, port)); srv.listen(flows)
srv.settimeout(1.0); total = [0]
def drain(c):
    c.settimeout(1.0)
    while time.time() < deadline:
        try:
            b = c.recv(1 << 20)
        except socket.timeout:
            continue
        except OSError:  # the sender resets at its deadline (linger 0)
            break
        if not b:
            break
        total[0] += len(b)
threads = []
print("ready", flush=True)
while len(threads) < flows and time.time() < deadline:
    try:
        c, _ = srv.accept()
    except socket.timeout:
        continue
    t = threading.Thread(target=drain, args=(c,), daemon=True); t.start(); threads.append(t)
for t in threads:
    t.join(max(0.0, deadline - time.time()))
print(total[0], flush=True)
"""

_SENDER = r"""
import socket, struct, sys, threading, time
host, port, flows, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), time.time() + float(sys.argv[4])
def send():
    while time.time() < stop:
        try:
            c = socket.create_connection((host, port), timeout=1.0); break
        except OSError:
            time.sleep(0.05)
    else:
        return
    # linger 0: close discards what is still buffered, so the flow really ends at its deadline
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.settimeout(1.0); buf = b"\0" * 65536
    while time.time() < stop:
        try:
            c.send(buf)
        except socket.timeout:
            continue
        except OSError:
            break
    c.close()
threads = [threading.Thread(target=send) for _ in range(flows)]
for t in threads: t.start()
for t in threads: t.join()
"""


class CompetingFlows:
    """Bulk TCP flows across a :class:`ShapedLink`: they compete with training traffic for the shaped rate.

    A receiver runs in the other namespace, a sender with ``flows`` connections in ``source``'s; both exit by
    themselves after ``seconds`` (plus a short grace), and :meth:`stop` or the link's close ends them sooner.

    Raises:
        ValueError: if an argument is out of range.
    """

    def __init__(self, link: ShapedLink, flows: int = 1, seconds: float = 10.0, source: int = 0, port: int = 5201):
        if isinstance(flows, bool) or not isinstance(flows, int) or not 1 <= flows <= 64:
            raise ValueError(f"Expected `flows` to be an integer in [1, 64], but got {flows!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
            raise ValueError(f"Expected `seconds` in (0, 3600], but got {seconds!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
            raise ValueError(f"Expected `port` to be an integer in [1024, 65535], but got {port!r}")
        source = _check_side(source)
        sink = 1 - source
        self.flows, self.seconds, self.source = flows, float(seconds), source
        host = link.address(sink)
        self._receiver = link.popen(
            sink, [sys.executable, "-c", _RECEIVER, host, str(port), str(flows), str(seconds + 2.0)],
            stdout=subprocess.PIPE, text=True,
        )
        # wait until it listens, so that the sender's first connection attempt succeeds
        ready = self._receiver.stdout.readline().strip()
        if ready != "ready":
            _stop_process(self._receiver)
            raise NetemError(f"competing-flow receiver did not start (said {ready!r})")
        self._sender = link.popen(source, [sys.executable, "-c", _SENDER, host, str(port), str(flows), str(seconds)])

    def running(self) -> bool:
        return self._sender.poll() is None

    def stop(self) -> None:
        """End both processes now."""
        _stop_process(self._sender)
        _stop_process(self._receiver)

    def wait(self) -> int:
        """Wait until the flows end by themselves; return the bytes the receiver got."""
        self._sender.wait(timeout=self.seconds + 10)
        out, _ = self._receiver.communicate(timeout=10)
        return int(out.split()[-1]) if out.split() else 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_process(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


# ---------------------------------------------------------------------- removal on exit and on signals
def _close_all() -> None:
    with _live_lock:
        links = list(_live)
    for link in links:
        try:
            link.close()
        except Exception as err:  # noqa: BLE001 - best effort while the process is going down
            log.warning("could not remove %r: %s", link, err)


def _on_signal(signum: int, frame: Any) -> None:
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    _close_all()  # restores the previous handlers once no link is left
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers(handle_signals: bool) -> None:
    global _atexit_registered
    if not _atexit_registered:
        import atexit

        atexit.register(_close_all)
        _atexit_registered = True
    # SIGINT already raises KeyboardInterrupt, which runs __exit__ and atexit; SIGTERM/SIGHUP would kill silently
    if not handle_signals or _previous_handlers or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        _previous_handlers[signum] = signal.signal(signum, _on_signal)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _previous_handlers.items():
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, handler)
    _previous_handlers.clear()


# ---------------------------------------------------------------------- availability and leftovers
_NAME = re.compile(r"^(?P<prefix>[a-z]{1,4})(?P<pid>\d+)x\d+[ab]$")
_available: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """Whether a shaped link can be built here: ``(True, "")`` or ``(False, reason)``. Tries it once, cached."""
    global _available
    if _available is not None:
        return _available
    if not sys.platform.startswith("linux"):
        _available = (False, f"network namespaces need Linux (this is {sys.platform})")
    elif os.geteuid() != 0:
        _available = (False, "creating network namespaces and tc qdiscs needs root")
    elif not (shutil.which("ip") and shutil.which("tc")):
        _available = (False, "iproute2's `ip` and `tc` are not on PATH")
    else:
        try:
            with ShapedLink(rate_mbit=100.0, handle_signals=False) as link:
                link.set_rate(50.0)
                link.counters(0)
            _available = (True, "")
        except (NetemError, OSError) as err:
            _available = (False, f"a shaped veth link could not be created: {err}")
    return _available


def cleanup_stale(prefix: str = PREFIX, include_alive: bool = False) -> list[str]:
    """Remove namespaces left by runs that died without cleaning up; return their names.

    A namespace is stale when the pid in its name is no longer running (or, with ``include_alive``, any
    namespace with ``prefix`` not owned by a live link of this process). Processes still inside a stale
    namespace were started in it by this module, and are killed by pid.
    """
    if not isinstance(prefix, str) or not re.fullmatch(r"[a-z]{1,4}", prefix):
        raise ValueError(f"Expected `prefix` to be 1-4 lowercase letters, but got {prefix!r}")
    with _live_lock:
        mine = {ns for link in _live for ns in link._netns}
    removed = []
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if not match or match["prefix"] != prefix or name in mine:
            continue
        if not include_alive and _pid_alive(int(match["pid"])):
            continue
        for pid in _run(["ip", "netns", "pids", name], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

