import pytest
import torch

from utils.metrics import accuracy, der


def test_accuracy_counts_matches():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    assert accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 0.0


@pytest.mark.parametrize("before,after,expected", [
    # (acc, asr) before -> after: DER = (max(0, dASR) - max(0, dACC) + 1) / 2
    ((0.9132, 0.9503), (0.9077, 0.0074), (0.9429 - 0.0055 + 1) / 2),  # the paper's BadNets/D3 row: 96.87%
    ((0.90, 0.95), (0.90, 0.95), 0.5),        # nothing changes
    ((0.90, 0.95), (0.92, 0.00), 0.975),      # accuracy gain is not rewarded
    ((0.90, 0.10), (0.80, 0.20), 0.45),       # ASR rise is not penalised, accuracy drop is
    ((1.0, 1.0), (1.0, 0.0), 1.0),
    ((1.0, 0.0), (0.0, 0.0), 0.0),
])
def test_der_hand_computed(before, after, expected):
    assert der(before[0], before[1], after[0], after[1]) == pytest.approx(expected)


def test_der_paper_value_rounds_to_table():
    assert round(100 * der(0.9132, 0.9503, 0.9077, 0.0074), 2) == 96.87
