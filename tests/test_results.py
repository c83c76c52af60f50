import math

import pytest
import torch

from layer_probe.models import build_model
from layer_probe.measurement import ProbeConfig, measure_images
from layer_probe.results import Responses, format_table
from conftest import stored_activations, trained_like


def test_sites_in_network_order_and_sorted_view(responses):
    assert [s.index for s in responses.sites] == list(range(1, 8))
    stds = [s.std for s in responses.sorted()]
    assert stds == sorted(stds, reverse=True) and [s.rank for s in responses.sorted()] == list(range(1, 8))
    assert responses["layer1.0.bn2"] is responses[3]
    assert responses.meta["images"] == 24 and responses.meta["arch"] == "resnet8"
    assert [b.name for b in responses.blocks] == ["layer1.0", "layer2.0", "layer3.0"]


def test_channel_axes_reports_the_mean_per_channel_std():
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    model = trained_like("resnet8")
    pooled = measure_images(model, images, labels, (0.5,) * 3, (0.25,) * 3, progress=False)
    channel = measure_images(model, images, labels, (0.5,) * 3, (0.25,) * 3, ProbeConfig(axes="channel"),
                                progress=False)
    from layer_probe.data import batches

    stored, _ = stored_activations(model, [s.name for s in pooled.sites],
                                   list(batches(images, labels, 256, (0.5,) * 3, (0.25,) * 3)))
    for a, b in zip(pooled.sites, channel.sites):  # independently: torch.std per channel, then their mean
        per_channel = stored[a.name].transpose(0, 1).flatten(1).std(1)
        assert math.isclose(b.std, float(per_channel.mean()), rel_tol=1e-7)
        assert math.isclose(a.std, float(stored[a.name].std()), rel_tol=1e-7)
    assert channel.meta["axes"] == "channel"


def test_json_round_trip_and_required_keys(responses, tmp_path):
    again = Responses.from_json(responses.to_json())
    assert again == responses
    json_path, csv_path = responses.save(tmp_path)
    assert Responses.load(json_path) == responses
    header = csv_path.read_text().splitlines()[0].split(",")
    assert {"index", "name", "role", "channels", "std", "mean", "rank"} <= set(header)
    df = responses.to_dataframe()
    assert list(df["name"]) == [s.name for s in responses.sites]


def test_table_lists_every_site(responses):
    table = format_table(responses)
    assert all(s.name in table for s in responses.sites) and "top-1" in table and "||F(x)||/||x||" in table


def test_nan_sites_are_counted_exactly():
    model = build_model("resnet8").eval()
    with torch.no_grad():
        model.layer3[0].bn2.bias[1] = float("nan")
    images, labels = torch.zeros(4, 32, 32, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    r = measure_images(model, images, labels, (0.5,) * 3, (0.25,) * 3, progress=False)
    assert r["layer3.0.bn2"].nonfinite == 4 * 8 * 8 and math.isnan(r["layer3.0.bn2"].std)
    assert r["layer3.0.bn1"].nonfinite == 0 and r["layer3.0.bn2"].rank == 7
