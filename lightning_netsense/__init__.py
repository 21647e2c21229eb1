"""lightning_netsense: compress DDP gradients only as much as the network forces it to.

``import lightning_netsense`` registers the strategies ``netsense_ddp``, ``netsense_ddp_spawn``,
``netsense_ddp_fork`` and ``netsense_ddp_notebook`` with Lightning, so ``Trainer(strategy="netsense_ddp")``
works (Lightning has no entry point for third-party strategies; the Trainer reads the registry when it is
constructed, so import this package first).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_netsense.adaptive import NetSensePolicy
from lightning_netsense.aimd import AIMDPolicy
from lightning_netsense.callback import NetSenseMonitor
from lightning_netsense.codecs import CODECS, Codec
from lightning_netsense.hook import NetSenseState, netsense_hook
from lightning_netsense.observation import MODE_CODES, CodecProfile, Decision, LinkEstimate, Observation
from lightning_netsense.policy import FixedPolicy, Policy
from lightning_netsense.sensing import LinkEstimator
from lightning_netsense.strategy import NetSenseStrategy

__version__ = "0.1.0"

__all__ = [
    "AIMDPolicy",
    "CODECS",
    "MODE_CODES",
    "Codec",
    "CodecProfile",
    "Decision",
    "FixedPolicy",
    "LinkEstimate",
    "LinkEstimator",
    "NetSenseMonitor",
    "NetSensePolicy",
    "NetSenseState",
    "NetSenseStrategy",
    "Observation",
    "Policy",
    "netsense_hook",
]

NetSenseStrategy.register_strategies(StrategyRegistry)
