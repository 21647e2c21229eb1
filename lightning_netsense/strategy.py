"""``NetSenseStrategy``: Lightning's DDP with the network-sensing communication hook always registered."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.nn.parallel.distributed import DistributedDataParallel
from typing_extensions import override

from lightning_netsense._ddp_arguments import START_METHODS, check_backend, check_ddp_kwargs, check_devices
from lightning_netsense._validation import check_bool, check_choice, check_instance, check_number, check_timedelta
from lightning_netsense.adaptive import NetSensePolicy
from lightning_netsense.hook import NetSenseState, netsense_hook
from lightning_netsense.policy import Policy
from lightning_netsense.sensing import LinkEstimator
from lightning_netsense.update_error import SecondMoments

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.types import STEP_OUTPUT

__all__ = ["DEFAULT_TIMEOUT", "NetSenseStrategy"]

log = logging.getLogger(__name__)

_CHECKPOINT_KEY = "netsense"

#: Failure-detection budget: the process-group timeout :class:`NetSenseStrategy` uses unless ``timeout=`` is given.
#: See the strategy's ``timeout`` argument and ``docs/faults.md``.
DEFAULT_TIMEOUT = timedelta(minutes=5)


class NetSenseStrategy(DDPStrategy):
    r"""Data-parallel training that compresses gradients only as much as the network forces it to.

    A :class:`~lightning.pytorch.strategies.DDPStrategy` whose gradient buckets go through
    :func:`~lightning_netsense.hook.netsense_hook`, on CPU/gloo as on CUDA/NCCL (Lightning's own DDP strategy
    registers communication hooks on CUDA only). After each synchronising backward pass the ranks agree on
    what they measured and the ``policy`` picks the next step's mode, identically on every rank.

    Args:
        policy: decides the mode of each step (default: :class:`~lightning_netsense.NetSensePolicy`, the
            adaptive policy; ``FixedPolicy()`` gives plain DDP through the hook).
        error_feedback: add what lossy codecs did not send to the next step.
        warmup_steps: steps at the start in which only codecs without per-bucket state may run (>= 1: DDP
            rebuilds its buckets after step 1); see :class:`~lightning_netsense.hook.NetSenseState`.
        probe_every: while a lossy mode runs, probe the link's bandwidth at most every this many steps, >= 0 (0:
            never; compressed payloads alone cannot show that a slow link has recovered).
        probe_fraction: share of the training time bandwidth probes may take, in (0, 1].
        estimator: the link estimator and its settings (default: :class:`~lightning_netsense.sensing.LinkEstimator`
            with its defaults).
        find_unused_parameters: passed to ``DistributedDataParallel``.
        static_graph: passed to ``DistributedDataParallel``.
        bucket_cap_mb: DDP bucket size in MiB, a finite number > 0 (``None``: DDP's default of 25).
        gradient_as_bucket_view: passed to ``DistributedDataParallel``.
        start_method: ``"popen"``, ``"spawn"``, ``"fork"`` or ``"forkserver"``, as for DDP.
        process_group_backend: a backend torch knows (``"gloo"``, ``"nccl"``, ``"mpi"``, ``"ucc"``, ...; one a
            plugin registers is known once the plugin is imported), ``"device:backend,..."`` pairs of them, or
            ``None`` (by device: gloo on CPU, NCCL on CUDA).
        timeout: the failure-detection budget: how long a rank waits in one collective (or barrier) before it
            raises, a ``datetime.timedelta`` > 0. The default, :data:`DEFAULT_TIMEOUT` (5 minutes, where Lightning's
            ``DDPStrategy`` and torch's gloo default wait 30), bounds how long a dead or frozen rank, or a dead
            link, stalls every other rank before all of them raise; a rank that dies outright is usually seen at
            once (its sockets close). The budget must exceed the longest stall you want to survive: TCP backs off
            exponentially while a link is down, so an outage stalls a collective for up to about twice its length
            (see ``docs/faults.md``): the budget must be about twice the outage to survive. It also bounds
            work one rank does while the others wait at a barrier: ``prepare_data`` on rank 0 (a dataset download)
            and checkpoint writes. Raise it for those (``timeout=timedelta(minutes=30)``); ``None`` leaves it to
            torch (30 minutes for gloo, 10 for NCCL). What happens in each case: ``docs/faults.md``.
        \**kwargs: any other ``DistributedDataParallel`` keyword (checked against its signature; bool flags must be
            bools).

    Raises:
        ValueError: if an argument is of the wrong type or out of range (naming it); if a communication hook,
            state or wrapper of your own is passed (this strategy owns the hook); for a keyword that
            ``DistributedDataParallel`` does not accept, or one that cannot work with this strategy:
            ``model_averaging_period`` (post-local SGD averages through a hook state of its own),
            ``device_ids``, ``process_group``, ``device_mesh``.

    Example::

        import lightning_netsense  # registers "netsense_ddp" and friends
        trainer = Trainer(accelerator="cpu", devices=2, strategy="netsense_ddp")
        trainer = Trainer(strategy=NetSenseStrategy(timeout=timedelta(minutes=30)))  # long prepare_data
    """

    strategy_name = "netsense_ddp"

    def __init__(
        self,
        policy: Policy | None = None,
        error_feedback: bool = True,
        warmup_steps: int = 1,
        probe_every: int = 2,
        probe_fraction: float = 0.05,
        estimator: LinkEstimator | None = None,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        bucket_cap_mb: float | None = None,
        gradient_as_bucket_view: bool = False,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        ddp_comm_state: object | None = None,
        ddp_comm_hook: Callable | None = None,
        ddp_comm_wrapper: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("ddp_comm_hook", ddp_comm_hook),
            ("ddp_comm_state", ddp_comm_state),
            ("ddp_comm_wrapper", ddp_comm_wrapper),
        ):
            if value is not None:
                raise ValueError(
                    f"NetSenseStrategy registers its own communication hook; `{name}` must be None, but got "
                    f"{value!r}. Choose compression through `policy=` (e.g. FixedPolicy(mode='fp16')), or use "
                    "DDPStrategy for a hook of your own."
                )
        if policy is None:
            policy = NetSensePolicy()
        # Everything is checked here, in the main process, before any rank starts: DDP and gloo would otherwise
        # fail later, in every rank, with messages that do not name the argument.
        check_bool("find_unused_parameters", find_unused_parameters)
        check_bool("static_graph", static_graph)
        check_bool("gradient_as_bucket_view", gradient_as_bucket_view)
        check_number("bucket_cap_mb", bucket_cap_mb, low=0, low_open=True, allow_none=True, why="MiB")
        check_choice("start_method", start_method, START_METHODS)
        check_backend(process_group_backend)
        check_timedelta("timeout", timeout, allow_none=True)
        check_instance("accelerator", accelerator, Accelerator, allow_none=True)
        check_devices(parallel_devices)
        check_instance("cluster_environment", cluster_environment, ClusterEnvironment, allow_none=True)
        check_instance("checkpoint_io", checkpoint_io, CheckpointIO, allow_none=True)
        check_instance("precision_plugin", precision_plugin, Precision, allow_none=True)
        kwargs = check_ddp_kwargs(kwargs)
        if bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = bucket_cap_mb
        # Validates the state's arguments now, with the state's own messages.
        self._netsense_config = {
            "policy": policy,
            "error_feedback": error_feedback,
            "warmup_steps": warmup_steps,
            "estimator": estimator,
            "probe_every": probe_every,
            "probe_fraction": probe_fraction,
        }
        NetSenseState(**self._netsense_config)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            **kwargs,
        )
        self._netsense_state: NetSenseState | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def policy(self) -> Policy:
        return self._netsense_config["policy"]

    @property
    def netsense_state(self) -> NetSenseState | None:
        """The hook's state in this process (``None`` until the model is wrapped by DDP in ``fit``)."""
        return self._netsense_state

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self._netsense_state is not None:
            # the optimizers' moments: the update error is measured with the optimizer's own statistics
            self._netsense_state.second_moments = SecondMoments(self.optimizers)

    @override
    def configure_ddp(self) -> None:
        # Lightning's DDPStrategy registers a communication hook only when the root device is CUDA; this one
        # registers its own on every device. The state is built here, in the worker, because it binds to the
        # process group (a process-group-bound state built in the parent fails to unpickle under spawn).
        super().configure_ddp()
        assert isinstance(self.model, DistributedDataParallel)
        if self._netsense_state is None:
            self._netsense_state = NetSenseState(**self._netsense_config)
            if self._pending_state is not None:
                self._netsense_state.load_state_dict(self._pending_state)
                self._pending_state = None
        log.debug("Registering DDP comm hook: netsense_hook")
        self.model.register_comm_hook(state=self._netsense_state, hook=netsense_hook)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        if self._netsense_state is not None:
            # the optimizer step belongs to the training step's time; what runs between steps (validation,
            # checkpoints) does not
            self._netsense_state.end_optimizer_step()
        return out

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        # the start of the forward: the first step (no boundary before it) is timed from here
        if self._netsense_state is not None:
            self._netsense_state.begin_step()
        return super().training_step(*args, **kwargs)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._netsense_state is not None:
            self._netsense_state.begin_backward()

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        # DDP has waited for every bucket's future before backward() returned, so no collective of the hook
        # is in flight: the small agreement collective cannot interleave with bucket traffic.
        if self._netsense_state is not None:
            self._netsense_state.end_step()

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._netsense_state is not None:
            checkpoint[_CHECKPOINT_KEY] = self._netsense_state.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # passed through as given: Lightning 2.5 takes the path alone, 2.6 also `weights_only`
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            if self._netsense_state is not None:
                self._netsense_state.load_state_dict(state)
            else:
                self._pending_state = state
        return checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        # Do not call super(): DDPStrategy's version registers "ddp" again and the registry raises.
        for name, start_method in (
            ("netsense_ddp", "popen"),
            ("netsense_ddp_spawn", "spawn"),
            ("netsense_ddp_fork", "fork"),
            ("netsense_ddp_notebook", "fork"),
        ):
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=f"Network-sensing compressed DDP with `start_method` '{start_method}'",
                start_method=start_method,
            )

