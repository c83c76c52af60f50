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
    assert code == 0 and payload["images"] == 500 and payload["mean"] == [0.485, 0.456, 0.406]
    assert len(payload["sites"]) == 19 and payload["sites"][-1]["name"] == "layer3.2.bn2"
    # independently: the same 500 images through a plain forward with torchvision's normalisation and hooks
    from torchvision.transforms.functional import normalize

    from layer_probe.checkpoint import load_checkpoint
    from layer_probe.data import load_cifar10, to_tensors
    from conftest import stored_activations

    model = load_checkpoint(AKAMASTER20, "resnet20").model
    images, labels = to_tensors(load_cifar10(JPEG_TAR, "test"), 500)
    x = normalize(images.permute(0, 3, 1, 2).float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    names = [s["name"] for s in payload["sites"]]
    stored, logits = stored_activations(model.eval(), names, [(x, labels)])
    assert payload["top1"] == pytest.approx(100 * float((logits.argmax(1) == labels).double().mean()), abs=1e-9)
    assert [s["std"] for s in payload["sites"]] == pytest.approx([float(stored[n].std()) for n in names], rel=1e-6)
