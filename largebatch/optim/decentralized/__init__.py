"""Decentralized training: gossip over a topology instead of an all-reduce (docs/decentralized.md).

Each process keeps its own parameters and averages them with its neighbours in a
:class:`Topology` once per step (:class:`Gossip`, on ``torch.distributed``);
:class:`DmSGD` and :class:`DecentLaM` are the optimizers that do so; :class:`SlowMo`
adds an exact average and a slow momentum step every few of their steps. They keep the
gradients local (``StepProtocol(local_gradients=True)``), which the training loop
reads to skip DDP's all-reduce, checkpoint every rank and evaluate the ranks' average.
"""

from largebatch.optim.decentralized.decentlam import DecentLaM, decentlam
from largebatch.optim.decentralized.dmsgd import DmSGD, dmsgd
from largebatch.optim.decentralized.gossip import Gossip
from largebatch.optim.decentralized.slowmo import SlowMo, slowmo
from largebatch.optim.decentralized.topology import TOPOLOGIES, Topology, make_topology

__all__ = [
    "TOPOLOGIES",
    "DecentLaM",
    "DmSGD",
    "Gossip",
    "SlowMo",
    "Topology",
    "decentlam",
    "dmsgd",
    "make_topology",
    "slowmo",
]
