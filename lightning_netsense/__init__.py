"""lightning_netsense: compress DDP gradients only as much as the network forces it to.

``import lightning_netsense`` registers the strategies ``netsense_ddp``, ``netsense_ddp_spawn``,
``netsense_ddp_fork`` and ``netsense_ddp_notebook`` with Lightning, so ``Trainer(strategy="netsense_ddp")``
works (Lightning has no entry point for third-party strategies; the Trainer reads the registry when it is
constructed, so import this package first).

The names below are what a Lightning user needs; everything else is importable from its module
(``lightning_netsense.hook.NetSenseState``, ``lightning_netsense.codecs.CODECS``, ...).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_netsense.adaptive import NetSensePolicy
from lightning_netsense.aimd import AIMDPolicy
from lightning_netsense.callback import NetSenseMonitor
from lightning_netsense.observation import Decision, Observation
from lightning_netsense.policy import FixedPolicy, Policy
from lightning_netsense.strategy import NetSenseStrategy

__version__ = "0.2.0.dev0"

__all__ = [
    "AIMDPolicy",
    "Decision",
    "FixedPolicy",
    "NetSenseMonitor",
    "NetSensePolicy",
    "NetSenseStrategy",
    "Observation",
    "Policy",
]

NetSenseStrategy.register_strategies(StrategyRegistry)
