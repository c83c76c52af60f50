"""Integration tests on the files in ../shared (skipped when they are absent)."""

import json

import pytest

from conftest import AKAMASTER20, JPEG_TAR, needs_shared
from layer_probe.cli import main

pytestmark = [needs_shared, pytest.mark.slow]


def test_akamaster_resnet20_on_jpeg_test_images(capsys):
    code = main(["responses", str(AKAMASTER20), "--arch", "resnet20", "--data", str(JPEG_TAR), "--limit", "500",
                 "--format", "json", "--device", "cpu"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["images"] == 500
    assert 76 <= payload["top1"] <= 86  # 81.0% on all 10,000 JPEG test images
    assert len(payload["sites"]) == 19 and payload["sites"][-1]["name"] == "layer3.2.bn2"
    assert payload["mean"] == [0.485, 0.456, 0.406]
    # Fig. 7's rise in the last layers: the last block's F(x) has the largest std of the network
    assert payload["sites"][-1]["rank"] == 1
