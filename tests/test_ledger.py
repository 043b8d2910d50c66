"""count_macs: exact multiply-adds per layer type, and only what dynamic constructs executed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import adaptnet

B = 3


def macs(fn) -> int:
    with adaptnet.count_macs() as m:
        fn()
    return m.total


@pytest.mark.parametrize(
    ("module", "inputs", "expected"),
    [
        (nn.Linear(10, 20), (torch.randn(B, 10),), B * 10 * 20),
        (nn.Linear(10, 20), (torch.randn(B, 7, 10),), B * 7 * 10 * 20),
        (nn.Conv1d(4, 8, 3), (torch.randn(B, 4, 16),), B * 8 * 14 * 4 * 3),
        (nn.Conv2d(3, 8, 3, groups=1), (torch.randn(B, 3, 10, 10),), B * 8 * 8 * 8 * 3 * 9),
        (nn.Conv2d(4, 8, 3, groups=2), (torch.randn(B, 4, 6, 6),), B * 8 * 4 * 4 * 2 * 9),
        (nn.RNNCell(10, 20), (torch.randn(B, 10),), B * 20 * (10 + 20)),
        (nn.LSTMCell(10, 20), (torch.randn(B, 10),), B * 4 * 20 * (10 + 20)),
        (nn.GRUCell(10, 20), (torch.randn(B, 10),), B * 3 * 20 * (10 + 20)),
        (nn.LSTM(10, 20, batch_first=True), (torch.randn(B, 5, 10),), B * 5 * 4 * 20 * 30),
        (nn.GRU(10, 20), (torch.randn(5, B, 10),), 5 * B * 3 * 20 * 30),
        (nn.RNN(10, 20, num_layers=2), (torch.randn(5, B, 10),),
         5 * B * 20 * (10 + 20) + 5 * B * 20 * (20 + 20)),
        (nn.LSTM(10, 20, bidirectional=True), (torch.randn(5, B, 10),), 2 * 5 * B * 4 * 20 * 30),
        (nn.LSTM(10, 20, proj_size=6), (torch.randn(5, B, 10),),
         5 * B * (4 * 20 * (10 + 6) + 20 * 6)),
    ],
    ids=["linear", "linear-3d", "conv1d", "conv2d", "conv2d-groups", "rnncell", "lstmcell",
         "grucell", "lstm", "gru", "rnn-2-layers", "lstm-bidirectional", "lstm-proj"],
)
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_layer_formulas(module, inputs, expected):
    assert macs(lambda: module(*inputs)) == expected


def test_attention_counts_projections_and_both_matmuls():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(B, 6, 16)
    expected = B * (3 * 6 * 16 * 16 + 2 * 6 * 6 * 16 + 6 * 16 * 16)  # qkv, QKᵀ and AV, out
    assert macs(lambda: mha(x, x, x)) == expected


def test_fused_lstm_equals_its_unrolled_cells():
    lstm, cell = nn.LSTM(6, 9, batch_first=True), nn.LSTMCell(6, 9)
    x = torch.randn(B, 4, 6)

    def unrolled():
        h = c = torch.zeros(B, 9)
        for t in range(4):
            h, c = cell(x[:, t], (h, c))

    assert macs(lambda: lstm(x)) == macs(unrolled)


def test_packed_sequences_count_real_steps_only():
    lstm = nn.LSTM(6, 9, batch_first=True)
    x = torch.randn(B, 5, 6)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 1]), batch_first=True)
    assert macs(lambda: lstm(packed)) == (5 + 3 + 1) * 4 * 9 * (6 + 9)


def test_by_module_and_nesting():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6))
    with adaptnet.count_macs() as m:
        net(torch.randn(2, 4))
    assert m.total == 2 * (4 * 5 + 5 * 6)
    assert m.by_module == {"Sequential": m.total, "Sequential.0": 40, "Sequential.2": 60}


def test_branch_pays_only_for_paths_taken():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    x = torch.randn(10, 8)
    everyone_a = macs(lambda: adaptnet.branch(torch.ones(10, dtype=torch.bool), a, b, x))
    split = macs(lambda: adaptnet.branch(torch.arange(10) < 3, a, b, x))
    masked = macs(lambda: torch.where((torch.arange(10) < 3)[:, None], a(x), b(x)))
    assert everyone_a == split == 10 * 64 and masked == 2 * 10 * 64


def test_adaptive_depth_pays_for_executed_steps():
    policy = adaptnet.dynamic.ThresholdHalting(nn.Linear(4, 1))
    depth = adaptnet.AdaptiveDepth(nn.Linear(4, 4), policy, max_steps=6)
    with adaptnet.count_macs() as m:
        r = depth(torch.randn(12, 4))
    assert m.total == int(r.steps.sum()) * (16 + 4)  # block + halting head per executed step


def test_moe_pays_for_k_experts_per_token():
    moe = adaptnet.MoE([nn.Linear(8, 8) for _ in range(6)], nn.Linear(8, 6), k=2)
    assert macs(lambda: moe(torch.randn(20, 8))) == 20 * 8 * 6 + 20 * 2 * 64


# --------------------------------------------------------------------------- per sample


def test_per_sample_charges_each_row_for_its_own_path():
    pre, a, b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 16),
                                                             nn.Linear(16, 8))
    x = torch.randn(6, 8)
    pred = torch.tensor([True, False, True, True, False, False])
    with adaptnet.count_macs(batch_size=6) as m:
        adaptnet.branch(pred, a, b, pre(x))
    expected = torch.where(pred, 64.0, 256.0).double() + 64  # its path + its share of `pre`
    torch.testing.assert_close(m.per_sample, expected)
    assert m.per_sample.sum().item() == m.total


def test_per_sample_follows_adaptive_depth_and_nesting():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small, self.big = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 8),
                                                                  nn.Linear(8, 4))

        def forward(self, s):
            return s + adaptnet.branch(s[:, 0] > 0, self.small, self.big, s)

    torch.manual_seed(0)
    policy = adaptnet.dynamic.ThresholdHalting(nn.Linear(4, 1), 0.6)
    depth = adaptnet.AdaptiveDepth(Branchy(), policy, max_steps=5)
    x = torch.randn(10, 4)
    with adaptnet.count_macs(batch_size=10) as m:
        r = depth(x)
    for i in range(10):  # replay sample i alone and count what it ran
        with adaptnet.count_macs() as alone:
            ri = depth(x[i:i + 1])
        assert ri.steps.item() == r.steps[i].item()
        assert m.per_sample[i].item() == alone.total
    assert m.per_sample.sum().item() == m.total


def test_per_sample_for_early_exit_and_moe():
    torch.manual_seed(1)
    net = adaptnet.EarlyExit([nn.Linear(6, 6), nn.Linear(6, 6)], [nn.Linear(6, 3)] * 2,
                             threshold=0.45).eval()
    x = torch.randn(12, 6)
    with adaptnet.count_macs(batch_size=12) as m:
        r = net(x)
    costs = net.exit_macs(x[:1])
    assert m.per_sample.tolist() == [float(costs[i]) for i in r.exit_index.tolist()]
    assert 0 < r.exit_index.sum() < 12  # both exits used

    moe = adaptnet.MoE([nn.Linear(6, 6) for _ in range(4)], nn.Linear(6, 4), k=2)
    with adaptnet.count_macs(batch_size=12) as m:
        moe(x)
    assert m.per_sample.tolist() == [6.0 * 4 + 2 * 36] * 12  # router + two experts each
    with adaptnet.count_macs(batch_size=3) as m:  # (batch, tokens, features): rows are samples
        moe(torch.randn(3, 4, 6))
    assert m.per_sample.tolist() == [4 * (6.0 * 4 + 2 * 36)] * 3


def test_without_batch_size_there_is_no_per_sample_tensor():
    with adaptnet.count_macs() as m:
        adaptnet.branch(torch.tensor([True, False]), torch.neg, torch.exp, torch.randn(2, 3))
    assert m.per_sample is None
