"""The driver of the shaped-link benchmark: one long-lived rank per namespace, jobs handed over through files.

A job is one (workload, trace, contender, repeat). :meth:`Driver.run` writes ``job_<i>.json``, waits until both
ranks are set up (``ready_<i>_<rank>``: the Trainer has wrapped the model in DDP on the unshaped link), puts the link
into the trace's starting state, writes ``go_<i>`` and applies the trace's schedule on its own wall clock until both
ranks wrote ``result_<i>_<rank>.json``. A failed job raises :class:`JobFailed` with the ranks' log tails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from traces import CONGESTION, trace_events

__all__ = ["Driver", "JobFailed"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def worker_env() -> dict[str, str]:
    """The environment of a rank: this checkout's package first on the path (``ip netns exec`` keeps the
    environment), whatever is installed in the interpreter's site-packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


class JobFailed(RuntimeError):
    pass


class Driver:
    """Keeps one rank per namespace alive and runs jobs through files in a control folder."""

    def __init__(self, link: Any, control: str) -> None:
        self.link, self.control = link, control
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.port = 29511
        self.next_id = 0

    def start(self) -> None:
        # leftovers of a failed job (both ranks may have reported an error) must not fail the next wait
        for name in os.listdir(self.control):
            if name.startswith(("alive_", "error_")):
                os.remove(os.path.join(self.control, name))
        self.port += 1  # a fresh rendezvous port after a restart (the old one may linger in TIME_WAIT)
        for r in (0, 1):
            log = open(os.path.join(self.control, f"worker{r}.log"), "a")  # noqa: SIM115 - closed in stop()/kill()
            self.logs.append(log)
            cmd = [sys.executable, os.path.join(_HERE, "bench_worker.py"), "--rank", str(r),
                   "--master-addr", self.link.address(0), "--port", str(self.port), "--ifname", self.link.ifname(r),
                   "--control", self.control, "--first-job", str(self.next_id)]
            self.procs.append(self.link.popen(r, cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env()))
        self._wait([f"alive_{r}" for r in (0, 1)], 240.0, "ranks to start", errors="error_")

    def stop(self) -> None:
        open(os.path.join(self.control, "quit"), "w").close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self._close_logs()
        os.remove(os.path.join(self.control, "quit"))

    def _close_logs(self) -> None:
        for log in self.logs:
            log.close()
        self.logs.clear()

    def log_tails(self, chars: int = 1500) -> str:
        out = []
        for r in (0, 1):
            try:
                with open(os.path.join(self.control, f"worker{r}.log")) as f:
                    lines = f.read().splitlines()
                text = "\n".join(ln for ln in lines if "Warning" not in ln and "ddp = DDP" not in ln)
                out.append(f"--- rank {r}:\n{text[-chars:]}")
            except OSError:
                pass
        return "\n".join(out)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()
        self._close_logs()

    def _wait(self, names: list[str], timeout: float, what: str, tick=None, errors: str = "error_") -> None:
        """Poll until every file in ``names`` exists; raise :class:`JobFailed` on an ``errors*`` file, a rank's exit
        or the timeout. ``tick`` runs between polls (the trace's schedule)."""
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(self.control, n)) for n in names):
            # only complete reports (written to .tmp and renamed) of this job
            found = sorted(n for n in os.listdir(self.control) if n.startswith(errors) and n.endswith(".json"))
            if found:
                with open(os.path.join(self.control, found[0])) as f:
                    msg = json.load(f)["error"]
                raise JobFailed(msg)
            if any(p.poll() is not None for p in self.procs):
                raise JobFailed(f"a rank exited (codes {[p.poll() for p in self.procs]}) while waiting for {what}\n"
                                + self.log_tails())
            if time.monotonic() > deadline:
                raise JobFailed(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.log_tails())
            if tick is not None:
                tick()
            time.sleep(0.02)

    def run(self, job: dict[str, Any], trace: str | None) -> dict[str, Any]:
        """Run one job on both ranks; returns both ranks' results and the trace as applied."""
        jid = job["id"] = self.next_id
        self.next_id += 1
        link = self.link
        link.set_rate(None)  # set-up (DDP's initial broadcast) on the unshaped link
        path = os.path.join(self.control, f"job_{jid}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(job, f)
        os.replace(path + ".tmp", path)
        self._wait([f"ready_{jid}_{r}" for r in (0, 1)], 300.0, "set-up", errors=f"error_{jid}_")
        timeout = 2 * job["cap_s"] + 240.0
        pending = trace_events(trace, timeout, job["workload"]) if trace else []
        applied: list[list[Any]] = []
        flows: list[Any] = []
        t_go = time.time()

        def tick() -> None:
            now = time.time() - t_go
            while pending and pending[0][0] <= now:
                _, kind, value = pending.pop(0)
                try:
                    if kind == "rate":
                        link.set_rate(value)
                    else:
                        for src in (0, 1):  # both directions: a 2-rank allreduce uses both
                            # a fresh port per burst: the last burst's receiver may still be closing
                            port = 5201 + len(flows) % 40
                            flows.append(link.competing_flows(CONGESTION["flows"], value, source=src, port=port))
                except Exception as err:  # a failed job (the ranks are restarted), not a failed benchmark
                    raise JobFailed(f"could not apply the trace ({kind} {value}): {err}") from err
                applied.append([time.time(), kind, value])

        try:
            tick()  # the starting state, before the ranks start
            t_go = time.time()
            applied.append([t_go, "go", 0])
            open(os.path.join(self.control, f"go_{jid}"), "w").close()
            self._wait([f"result_{jid}_{r}.json" for r in (0, 1)], timeout, f"job {jid}", tick=tick,
                       errors=f"error_{jid}_")
        finally:
            for fl in flows:
                fl.stop()
        results = []
        for r in (0, 1):
            with open(os.path.join(self.control, f"result_{jid}_{r}.json")) as f:
                results.append(json.load(f))
        return {"ranks": results, "trace_log": applied, "t_go": t_go}


