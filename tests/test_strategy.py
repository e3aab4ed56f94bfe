"""FedAvg aggregation maths on tiny tensors (Prepare / Execute / Assert)."""

import pytest
import torch

from cmrfed.errors import DataError
from cmrfed.fed.strategy import FedAvg, FitResult, weighted_average
from cmrfed.fed.wire import decode, encode, num_params, tensor_bytes


def test_weighted_average_is_exact_weighting_by_examples():
    # Prepare: three clients with 1, 2 and 5 training subjects
    states = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([4.0, 2.0])},
              {"w": torch.tensor([0.0, 8.0])}]
    results = [FitResult(f"c{i}", s, n, 0.0) for i, (s, n) in enumerate(zip(states, [1, 2, 5], strict=True))]
    # Execute
    averaged = FedAvg().aggregate(results)
    # Assert: (1*1 + 2*4 + 5*0)/8 and (0 + 2*2 + 5*8)/8
    assert torch.allclose(averaged["w"], torch.tensor([9 / 8, 44 / 8]), atol=0, rtol=1e-7)
    assert averaged["w"].dtype == torch.float32


def test_weighted_average_equal_weights_is_mean_and_keeps_keys():
    states = [{"a": torch.full((2, 3), float(i)), "b": torch.ones(4) * i} for i in range(4)]
    averaged = weighted_average(states, [3, 3, 3, 3])
    assert set(averaged) == {"a", "b"}
    assert torch.equal(averaged["a"], torch.full((2, 3), 1.5))


def test_weighted_average_refuses_mismatched_states_and_zero_weights():
    with pytest.raises(DataError, match="different shared tensors"):
        weighted_average([{"a": torch.ones(1)}, {"b": torch.ones(1)}], [1, 1])
    with pytest.raises(DataError, match="sum to zero"):
        weighted_average([{"a": torch.ones(1)}], [0])


def test_wire_round_trip_and_sizes():
    state = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
             "y": torch.arange(4, dtype=torch.float32)}
    payload = encode(state)
    back = decode(payload)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert num_params(state) == 19
    assert tensor_bytes(state) == 19 * 4
    # safetensors = 8-byte header length + JSON header + raw tensor bytes
    header = int.from_bytes(payload[:8], "little")
    assert len(payload) == 8 + header + tensor_bytes(state)
