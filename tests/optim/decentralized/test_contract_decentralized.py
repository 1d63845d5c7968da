"""The optimizer contract of ``tests/optim/test_contract.py`` for the decentralized optimizers.

Every check of its :data:`~test_contract.CHECKS` runs for every decentralized optimizer
(``is_decentralized``) in a gloo group of two processes, as gossip needs at least two.
Both ranks see the same batches and start equal, so a neighbour's tensors equal one's
own (the weights are 1/2) and the single-process expectations hold exactly while every
step goes through the gossip; what the gossip does with ranks that differ is checked in
``test_gossip_processes.py``. SlowMo also runs with an exact average every 2 steps, so
that the checks' few steps include its slow steps.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from gloo_group import run_in_gloo_group
from test_contract import CHECKS
from torch.multiprocessing import ProcessRaisedException

from largebatch.optim import list_optimizers
from largebatch.optim.registry import get_spec, is_decentralized

SLOWMO = get_spec("slowmo")
SPECS = {spec.name: spec for spec in list_optimizers() if is_decentralized(spec.name)}
SPECS["slowmo-every-2"] = dataclasses.replace(SLOWMO, defaults={**SLOWMO.defaults, "slow_every": 2})

#: (optimizer, check) pairs that do not hold: why, and what the check fails with instead
EXCLUDED: dict[tuple[str, str], tuple[str, str]] = {
    ("decentlam", "lr-scheduler"): (
        "DecentLaM divides by the learning rate, so a schedule that reaches 0 is refused",
        "ValueError: Invalid learning rate: 0.0 (DecentLaM divides by it",
    ),
    ("slowmo-every-2", "late-parameter"): (
        "SlowMo's slow step moves every parameter by its slow momentum, so a parameter "
        "whose gradients stopped keeps moving at each average",
        "assert torch.equal(a, a_before)",
    ),
}


def test_every_decentralized_optimizer_is_here_and_every_exclusion_is_a_real_pair():
    assert set(SPECS) >= {"dmsgd", "decentlam", "slowmo"}
    assert all(name in SPECS and check in CHECKS for name, check in EXCLUDED)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", SPECS)
def test_contract_in_a_gloo_group_of_two(name, check, tmp_path):
    """The check passes on both ranks; an excluded one fails as :data:`EXCLUDED` says."""
    spec = SPECS[name]
    if (name, check) not in EXCLUDED:
        run_in_gloo_group(lambda rank, out: CHECKS[check](spec), tmp_path)
        return
    _, failure = EXCLUDED[name, check]
    with pytest.raises(ProcessRaisedException, match=re.escape(failure)):
        run_in_gloo_group(lambda rank, out: CHECKS[check](spec), tmp_path)
