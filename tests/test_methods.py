"""The method table's promises, as sets of tensor groups."""

import pytest

from cmrfed.errors import UsageError
from cmrfed.fed.methods import HEAD, METHODS, REFERENCE, resolve_method


def test_every_method_shares_only_what_it_trains_and_private_is_the_rest():
    for spec in METHODS.values():
        assert spec.shared <= spec.groups
        assert spec.trained <= spec.groups
        assert spec.private == (spec.trained - spec.shared) | spec.kept
        assert not (spec.private & spec.shared)
        assert spec.kept == ({REFERENCE} if spec.mixing else set())


def test_table_matches_the_definitions():
    dual = METHODS["duallora"]
    assert dual.shared == {"global.A", "global.B", HEAD}
    assert dual.private == {"local.A", "local.B"}
    ffa = METHODS["ffalora"]
    assert "global.A" not in ffa.trained and ffa.frozen == {"global.A"}
    assert ffa.shared == {"global.B", HEAD}
    fedsa = METHODS["fedsa"]
    assert fedsa.shared == {"global.A", HEAD} and fedsa.private == {"global.B"}
    assert METHODS["local"].shared == frozenset() and not METHODS["local"].federated
    assert METHODS["fedlora"].private == frozenset()
    assert METHODS["central"].pooled


def test_local_head_moves_head_to_private_and_unknown_names_fail():
    spec = resolve_method("duallora", head="local")
    assert HEAD in spec.private and HEAD not in spec.shared
    with pytest.raises(UsageError, match="unknown --method 'fedprox'"):
        resolve_method("fedprox")
    with pytest.raises(UsageError, match="--head"):
        resolve_method("duallora", head="both")
