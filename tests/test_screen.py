"""bench/screen.py's configurations: a baseline's with the named fields changed, anything else refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import screen  # noqa: E402

from adapruner.errors import AdaPrunerError
from adapruner.importance import Mixture
from adapruner.plan import Allocation
from adapruner.repair import Repair
from adapruner.session import PruneConfig

FLAP = PruneConfig(Mixture.single("flap"), (0, 1, 2), Allocation(scope="global"), Repair("bias"))


def test_a_changed_configuration_keeps_what_it_does_not_name():
    config = screen.changed(FLAP, "repair=pool,ridge=0.01,scope=layer,first=1,drop_layers=2,iterations=3")
    assert config.allocation == Allocation(first=1, drop_layers=2, scope="layer")
    assert config.repair == Repair("pool", 0.01)
    assert config.iterations == 3
    assert (config.mixture, config.subset) == (FLAP.mixture, FLAP.subset)
    assert screen.changed(FLAP, "") == FLAP
    assert screen.changed(FLAP, "repair=pool").repair == Repair("pool")  # the rule's ridge


@pytest.mark.parametrize("spec, message", [("heads=3", "cannot change 'heads'"),
                                           ("scope=wide", "unknown allocation scope"),
                                           ("iterations=0", "iterations must be")])
def test_a_field_it_cannot_change_is_refused(spec, message):
    with pytest.raises(AdaPrunerError, match=message):
        screen.changed(FLAP, spec)
