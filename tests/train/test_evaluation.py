"""The Table-1 report: exact margins, percentiles, units, mode restoration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rollnet
from rollnet.data import Split
from rollnet.models import MLP
from rollnet.train import DataInfo, region_report, to_markdown
from rollnet.train.evaluation import all_margins
from rollnet.train.metrics import classify, percentiles


def test_all_margins_equal_the_public_margin_for_each_norm():
    torch.manual_seed(0)
    net = MLP((1, 4, 4), 3, [20, 20]).double()
    x = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    got = all_margins(net, x)
    for name, p in (("l1", 1), ("l2", 2), ("linf", "inf")):
        assert torch.allclose(got[name], rollnet.margin(net, x, p=p), rtol=1e-12, atol=0)


def test_percentiles_interpolate_and_handle_infinity():
    assert percentiles(torch.arange(101.0)) == {"P25": 25.0, "P50": 50.0, "P75": 75.0, "P100": 100.0}
    p = percentiles(torch.tensor([1.0, 2.0, math.inf]))
    assert p["P25"] == 1.5 and p["P50"] == 2.0 and p["P75"] == math.inf and p["P100"] == math.inf
    assert math.isnan(percentiles(torch.zeros(0))["P50"])


def test_region_report_units_accuracy_and_restored_mode():
    torch.manual_seed(0)
    net = MLP((1, 4, 4), 3, [16, 16], dropout=0.5).train()
    x, y = torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))
    info = DataInfo("digits", (1, 4, 4), 3, (0.3, 0.4), True, "normalized")
    report = region_report(net, x, y, info, label="m", split="val", batch_size=7)
    assert net.training and net.layers[3].training, "train/eval mode must be restored"
    with torch.no_grad():
        expected = float((net.eval()(x).argmax(1) == y).float().mean())
    assert report.accuracy == pytest.approx(expected)
    assert report.n == 30 and report.precision == "float64" and report.split == "val"
    assert report.n_jacobians <= report.n_patterns <= 30
    exact = rollnet.margin(net.double(), x.double(), p=2)
    assert report.margins["normalized"]["l2"] == pytest.approx(percentiles(exact), rel=1e-12)
    assert report.margins["pixel"]["l2"]["P50"] == pytest.approx(report.margins["normalized"]["l2"]["P50"] * 0.4)
    rows = to_markdown([report, report]).splitlines()
    assert len(rows) == 2 + 2 * 2  # header, rule, (2 models) x (2 units)


def test_classify_restores_mode_and_counts():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net[0].weight.data = torch.eye(2)
    net[0].bias.data.zero_()
    split = Split(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), torch.tensor([0, 0, 0]))
    net.train()
    loss, acc = classify(net, split, batch_size=2)
    assert net.training and acc == pytest.approx(2 / 3) and loss > 0
