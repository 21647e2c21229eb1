"""``NetSenseMonitor``: log what the network-sensing strategy measured and decided, through the Trainer's loggers."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.imports import RequirementCache
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lightning_netsense._validation import check_bool, check_choice, check_int
from lightning_netsense.observation import MODE_CODES, LinkEstimate, Observation
from lightning_netsense.progress import ModeTotals, print_summary
from lightning_netsense.strategy import NetSenseStrategy

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import STEP_OUTPUT

__all__ = [
    "LOGGED_KEYS",
    "PROGRESS_BAR_KEYS",
    "NetSenseMonitor",
    "bandwidth_estimate",
    "mode_code",
    "observation_metrics",
]

_RICH_AVAILABLE = RequirementCache("rich>=10.2.2")

#: Every key :class:`NetSenseMonitor` logs (a key is left out of a step where its value is not finite).
LOGGED_KEYS = (
    "netsense/bandwidth_mbps",
    "netsense/latency_ms",
    "netsense/mode",
    "netsense/compression_ratio",
    "netsense/bytes_sent",
    "netsense/dense_bytes",
    "netsense/comm_time_ms",
    "netsense/exposed_comm_ms",
    "netsense/backward_time_ms",
    "netsense/step_time_ms",
    "netsense/rel_error",
    "netsense/update_error",
    "netsense/sign_flips",
    "netsense/residual_norm",
)
#: Keys the monitor puts on the progress bar (``self.log(..., prog_bar=True, logger=False)``).
PROGRESS_BAR_KEYS = ("netsense_Mbps", "netsense_mode")


def mode_code(mode: str) -> int:
    """Numeric code of ``mode`` (:data:`~lightning_netsense.observation.MODE_CODES`); ``-1`` for a mode outside that table."""
    return MODE_CODES.get(mode, -1)


def bandwidth_estimate(link: LinkEstimate) -> float:
    """Bandwidth to report, bytes/s: the fitted ``B`` of ``t = alpha + bytes / B``; where the fit cannot tell
    transfer time from latency (small messages on a fast link: ``B = inf``), the highest delivery rate seen in
    the window (a lower bound); ``inf`` before any sample.
    """
    return link.bandwidth if math.isfinite(link.bandwidth) else link.max_bandwidth


def observation_metrics(observation: Observation) -> dict[str, float]:
    """The logged values of one agreed observation, in logger units; every key but ``netsense/rel_error``.

    Values that are not finite (the bandwidth before anything was measured) are left out rather than logged as
    ``inf``, which some loggers reject.
    """
    link = observation.link
    values = {
        "netsense/bandwidth_mbps": bandwidth_estimate(link) * 8 / 1e6,
        "netsense/latency_ms": link.alpha * 1e3,
        "netsense/mode": float(mode_code(observation.decision.mode)),
        "netsense/compression_ratio": observation.compression_ratio,
        "netsense/bytes_sent": observation.bytes_sent,
        "netsense/dense_bytes": observation.dense_bytes,
        "netsense/comm_time_ms": observation.comm_time * 1e3,
        "netsense/exposed_comm_ms": observation.exposed_comm_time * 1e3,
        "netsense/backward_time_ms": observation.backward_time * 1e3,
        "netsense/step_time_ms": observation.step_time * 1e3,
        "netsense/update_error": observation.update_error,
        "netsense/sign_flips": observation.sign_flips,
        "netsense/residual_norm": observation.residual_norm,
    }
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}


class NetSenseMonitor(Callback):
    r"""Log the link estimate, the chosen mode and what compression cost, for :class:`NetSenseStrategy`.

    Reads ``trainer.strategy.netsense_state`` (public, and agreed by every rank at each step boundary) and logs
    through every logger in ``trainer.loggers``. Like :class:`~lightning.pytorch.callbacks.LearningRateMonitor`
    it requires a logger.

    **Logged metrics** — on the same steps and step axis as Lightning's own training metrics: the step that just
    ran, numbered from 0 (``trainer.global_step - 1`` at ``on_train_batch_end``), every ``log_every_n_steps``.

    - ``netsense/bandwidth_mbps`` — estimated link bandwidth, Mbit/s: ``B`` of the fit ``t = alpha + bytes / B``
      over recent collectives; where the fit cannot separate transfer time from latency (small messages on a
      fast link), the highest delivery rate measured in the window, a lower bound.
    - ``netsense/latency_ms`` — estimated latency per collective (``alpha``), ms.
    - ``netsense/mode`` — mode the step ran in, as a number: 0 ``none`` (plain DDP), 1 ``fp16``, 2 ``bf16``,
      3 ``int8``, 4 ``powersgd``, 5 ``topk`` (higher = stronger compression, see
      :data:`~lightning_netsense.observation.MODE_CODES`); -1 for a mode of your own outside that table. Loggers whose
      ``experiment`` has ``add_text`` (TensorBoard) also get the mode *name* as text under ``netsense/mode``,
      once each time it changes.
    - ``netsense/compression_ratio`` — plain-DDP wire bytes / bytes actually sent (1 for ``none``).
    - ``netsense/bytes_sent`` — wire bytes sent by one rank this step.
    - ``netsense/dense_bytes`` — wire bytes plain DDP would have sent for the same gradients.
    - ``netsense/comm_time_ms`` — time the gradient collectives took (sum over buckets, queue-corrected), ms.
    - ``netsense/exposed_comm_ms`` — communication left after the last bucket was ready (not hidden), ms.
    - ``netsense/backward_time_ms`` — backward pass until the last bucket was ready, ms.
    - ``netsense/step_time_ms`` — wall time between two step boundaries, ms.
    - ``netsense/rel_error`` — relative gradient error ``||g - g_hat|| / ||g||``, mean over ranks *and* over the
      steps since the last logged step (0 for steps in mode ``none``); aggregated across ranks with
      :class:`torchmetrics.aggregation.MeanMetric`.
    - ``netsense/update_error`` — error of the step the optimizer takes from what was sent, against the step it
      would take from the exact gradient, in the optimizer's own geometry (for Adam, with its second moments;
      for SGD, the plain relative error; see :mod:`~lightning_netsense.update_error`): a step of update error
      ``e`` makes about ``1 - e**2`` of an exact step's progress (0 for ``none``; root mean square over ranks).
    - ``netsense/sign_flips`` — share of (sampled) coordinates sent with the opposite sign of the exact
      gradient (mean over ranks).
    - ``netsense/residual_norm`` — norm of the error-feedback memory (root mean square over ranks).

    A value that is not finite is left out of that step (only the bandwidth, before anything was measured).

    With a progress bar the monitor also shows ``netsense_Mbps`` and ``netsense_mode`` (the code above) through
    ``pl_module.log(..., prog_bar=True, logger=False)``, so any bar (TQDM, :class:`RichProgressBar`, your own)
    displays them. At the end of ``fit``, rank 0 prints a ``rich`` table (when rich is installed): per mode, the
    steps, time and share of time, MB sent vs plain DDP, and the mean error.

    Collectives: the error's cross-rank mean is computed on logged steps only (every rank logs on the same
    steps); on other steps the monitor issues no collective.

    Args:
        logging_interval: ``"step"`` to log every ``log_every_n_steps`` optimizer steps, ``"epoch"`` to log once
            at the end of each training epoch.
        log_every_n_steps: steps between two logged steps (default: the Trainer's ``log_every_n_steps``;
            0 disables step logging).
        prog_bar: show the bandwidth and mode on the progress bar.
        summary: print the summary table at the end of ``fit`` (rank 0, needs ``rich``).

    Raises:
        ValueError: if an argument is of the wrong type or out of range, naming it.
        MisconfigurationException: in ``setup``, if the Trainer has no logger or its strategy is not a
            :class:`~lightning_netsense.NetSenseStrategy`.

    Example::

        import lightning_netsense as ln
        trainer = Trainer(strategy="netsense_ddp", callbacks=[ln.NetSenseMonitor()], log_every_n_steps=10)
    """

    def __init__(
        self,
        logging_interval: Literal["step", "epoch"] = "step",
        log_every_n_steps: int | None = None,
        prog_bar: bool = True,
        summary: bool = True,
    ) -> None:
        self.logging_interval = check_choice("logging_interval", logging_interval, ("step", "epoch"))
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, low=0, allow_none=True)
        self.prog_bar = check_bool("prog_bar", prog_bar)
        self.summary = check_bool("summary", summary)
        #: per mode, what the steps seen by this monitor added up to (saved in checkpoints)
        self.totals: dict[str, ModeTotals] = {}
        self._error = MeanMetric(nan_strategy="ignore")
        self._window = 0  # steps accumulated in `_error`; identical on every rank (boundaries are collective)
        self._seen_step = 0
        self._last_mode: str | None = None

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `NetSenseMonitor` callback with `Trainer(logger=False)`: it logs through the Trainer's"
                " loggers. Pass one, e.g. `Trainer(logger=TensorBoardLogger('logs'))`, or remove the callback."
            )
        if not isinstance(trainer.strategy, NetSenseStrategy):
            raise MisconfigurationException(
                f"`NetSenseMonitor` needs `NetSenseStrategy`, but the Trainer's strategy is"
                f" {type(trainer.strategy).__name__}. Use `Trainer(strategy='netsense_ddp')` (after"
                " `import lightning_netsense`) or `strategy=NetSenseStrategy(...)`."
            )
        # reset here, not in on_fit_start: a resumed fit restores `totals` (load_state_dict) between the two
        self.totals = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = trainer.strategy.netsense_state
        self._seen_step = state.step if state is not None else 0
        self._last_mode = None
        # the cross-rank mean runs on the collective backend's device (CUDA tensors for NCCL)
        self._error = self._error.to(pl_module.device)
        self._error.reset()
        self._window = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        state = trainer.strategy.netsense_state
        # a boundary happens only after a synchronising backward (not on accumulating micro-batches)
        if state is None or state.step == self._seen_step or state.last_observation is None:
            return
        self._seen_step = state.step
        obs = state.last_observation
        local = state.last_local
        self._error.update(local.rel_error if local is not None else obs.rel_error)
        self._window += 1
        self.totals.setdefault(obs.decision.mode, ModeTotals()).add(
            obs.step_time, obs.bytes_sent, obs.dense_bytes, obs.rel_error
        )
        self._log_mode_change(trainer, obs)
        if self.prog_bar and trainer.progress_bar_callback is not None:
            bar = {"netsense_mode": float(mode_code(obs.decision.mode))}
            bandwidth = bandwidth_estimate(obs.link)
            if math.isfinite(bandwidth):
                bar["netsense_Mbps"] = bandwidth * 8 / 1e6
            for key, value in bar.items():
                pl_module.log(key, value, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if self.logging_interval == "step":
            every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
            # the steps Lightning logs its own metrics on: (index + 1) % every == 0, with index = global_step - 1
            if every > 0 and trainer.global_step % every == 0:
                self._log(trainer, obs)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = trainer.strategy.netsense_state
        if self.logging_interval == "epoch" and state is not None and state.last_observation is not None:
            self._log(trainer, state.last_observation)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.summary and trainer.is_global_zero and self.totals):
            return
        if not _RICH_AVAILABLE:
            rank_zero_warn("NetSenseMonitor(summary=True) needs `rich` to print its table: pip install rich")
            return
        print_summary(self.totals)

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"totals": {mode: t.to_dict() for mode, t in self.totals.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = {str(m): ModeTotals.from_dict(t) for m, t in state_dict.get("totals", {}).items()}

    # ------------------------------------------------------------------ internals
    def _log(self, trainer: pl.Trainer, obs: Observation) -> None:
        metrics = observation_metrics(obs)
        if self._window:
            # collective (torchmetrics syncs on compute): reached on the same steps by every rank
            metrics["netsense/rel_error"] = float(self._error.compute())
            self._error.reset()
            self._window = 0
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_step_index(trainer))

    def _log_mode_change(self, trainer: pl.Trainer, obs: Observation) -> None:
        mode = obs.decision.mode
        if mode == self._last_mode:
            return
        previous, self._last_mode = self._last_mode, mode
        if not trainer.is_global_zero:  # loggers write on rank 0 only; other ranks hold dummy experiments
            return
        step = _step_index(trainer)
        text = f"step {step}: **{obs.decision.key}** (code {mode_code(mode)})"
        if previous is not None:
            text += f", was {previous}"
        for logger in trainer.loggers:
            add_text = getattr(logger.experiment, "add_text", None)
            if callable(add_text):
                add_text("netsense/mode", text, global_step=step)


def _step_index(trainer: pl.Trainer) -> int:
    """0-based index of the optimizer step that just ran: the x value Lightning gives that step's own metrics.

    At ``on_train_batch_end`` (and at epoch end) ``trainer.global_step`` already counts the step, so the values
    describing it belong one below; Lightning logs ``training_step`` metrics and epoch-end metrics there too, and
    TensorBoard then overlays e.g. ``train_loss`` and ``netsense/mode`` of the same step.
    """
    return max(trainer.global_step - 1, 0)
