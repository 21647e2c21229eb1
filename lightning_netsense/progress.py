"""End-of-fit summary of what :class:`~lightning_netsense.callback.NetSenseMonitor` saw, as a ``rich`` table.

The totals are plain numbers accumulated from the agreed observations (identical on every rank), so building
the table needs no collective; only rank 0 prints it. ``rich`` is optional: it is imported when a table is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lightning_netsense.observation import MODE_CODES

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["ModeTotals", "print_summary", "summary_table"]


@dataclass
class ModeTotals:
    """What the steps run in one mode added up to.

    Attributes:
        steps: synchronising steps run in the mode.
        seconds: wall time of those steps (boundary to boundary, slowest rank).
        bytes_sent: wire bytes actually sent per rank.
        dense_bytes: wire bytes plain DDP would have sent for the same steps.
        error_sum: sum over the steps of the relative gradient error (mean over ranks).
    """

    steps: int = 0
    seconds: float = 0.0
    bytes_sent: float = 0.0
    dense_bytes: float = 0.0
    error_sum: float = 0.0

    def add(self, seconds: float, bytes_sent: float, dense_bytes: float, rel_error: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.bytes_sent += bytes_sent
        self.dense_bytes += dense_bytes
        # a non-finite error (e.g. a skipped AMP step) must not poison the mean of the whole run
        if math.isfinite(rel_error):
            self.error_sum += rel_error

    @property
    def mean_error(self) -> float:
        return self.error_sum / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModeTotals:
        return cls(
            steps=int(d.get("steps", 0)),
            seconds=float(d.get("seconds", 0.0)),
            bytes_sent=float(d.get("bytes_sent", 0.0)),
            dense_bytes=float(d.get("dense_bytes", 0.0)),
            error_sum=float(d.get("error_sum", 0.0)),
        )


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.2f}"


def _ratio(dense: float, sent: float) -> str:
    return f"{dense / sent:.2f}x" if sent > 0 else "-"


def summary_table(totals: Mapping[str, ModeTotals], title: str = "NetSense summary") -> Table:
    """Build the summary: one row per mode (weakest compression first) and a total row.

    Columns: mode (with its numeric code), steps, time in seconds and share of the run's time, MB sent per rank
    ("Sent MB"), MB plain DDP would have sent for the same steps ("DDP MB"), their ratio, and the mean relative
    gradient error ``||g - g_hat|| / ||g||`` ("Error", 0 for plain DDP).
    """
    from rich.table import Table

    table = Table(title=title, show_footer=True)
    total = ModeTotals()
    for t in totals.values():
        total.steps += t.steps
        total.seconds += t.seconds
        total.bytes_sent += t.bytes_sent
        total.dense_bytes += t.dense_bytes
        total.error_sum += t.error_sum

    def share(seconds: float) -> str:
        return f"{100 * seconds / total.seconds:.1f}%" if total.seconds > 0 else "-"

    # short headers: the table must fit an 80-column terminal without wrapping
    columns = [
        ("Mode", "total", "left"),
        ("Steps", str(total.steps), "right"),
        ("Time s", f"{total.seconds:.2f}", "right"),
        ("Time %", share(total.seconds), "right"),
        ("Sent MB", _mb(total.bytes_sent), "right"),
        ("DDP MB", _mb(total.dense_bytes), "right"),
        ("Ratio", _ratio(total.dense_bytes, total.bytes_sent), "right"),
        ("Error", f"{total.mean_error:.1e}", "right"),
    ]
    for header, footer, justify in columns:
        table.add_column(header, footer=footer, justify=justify, no_wrap=True)
    # unknown (user-registered) modes sort after the built-in ones
    order = sorted(totals, key=lambda m: (MODE_CODES.get(m, len(MODE_CODES)), m))
    for mode in order:
        t = totals[mode]
        table.add_row(
            f"{mode} ({MODE_CODES.get(mode, -1)})",
            str(t.steps),
            f"{t.seconds:.2f}",
            share(t.seconds),
            _mb(t.bytes_sent),
            _mb(t.dense_bytes),
            _ratio(t.dense_bytes, t.bytes_sent),
            f"{t.mean_error:.1e}",
        )
    return table


def print_summary(totals: Mapping[str, ModeTotals], console: Console | None = None) -> None:
    """Print :func:`summary_table` on ``console`` (default: rich's global console, the one the progress bar uses)."""
    from rich import get_console

    (console or get_console()).print(summary_table(totals))
