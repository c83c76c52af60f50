"""Several processes (gloo on the CPU): shares of the data, exact merges, `torchrun` for responses and train."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from layer_probe.checkpoint import load_checkpoint, save_checkpoint
from layer_probe.cli import main
from layer_probe.data import CIFAR_MEAN, CIFAR_STD, batches, load_cifar10, normalize, subset, to_tensors
from layer_probe.distributed import Processes, process_group
from layer_probe.errors import LayerProbeError
from layer_probe.models import build_model
from layer_probe.probe import run_probe
from layer_probe.results import summarize
from layer_probe.sites import find_sites
from layer_probe.stats import Moments
from layer_probe.train import RECIPES, augment, epochs_path, history_path, lr_at
from conftest import stored_activations, trained_like

NORM = {"mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.mark.parametrize("n, size, batch_size", [(59, 2, 10), (60, 2, 10), (7, 3, 1), (10000, 8, 256), (5, 5, 1)])
def test_shares_hold_every_image_once_and_cut_at_batches(n, size, batch_size):
    shares = [Processes(rank, size).shard(n, batch_size) for rank in range(size)]
    assert [i for s in shares for i in range(n)[s]] == list(range(n))
    assert all(s.start % batch_size == 0 and s.stop > s.start for s in shares)


def test_uneven_last_share_and_too_few_batches():
    assert [Processes(rank, 2).shard(59, 10) for rank in (0, 1)] == [slice(0, 30), slice(30, 59)]
    with pytest.raises(LayerProbeError, match="fewer than the 4 processes"):
        Processes(3, 4).shard(25, 10)


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("cpu") as processes:
        assert not dist.is_initialized()
    assert processes == Processes() and processes.main and not processes.active
    model = trained_like("resnet8")
    result = run_probe(model, find_sites(model), [], progress=False)
    assert processes.merge(result) is result


def _merge_worker(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: merge uneven shares of float64 data and of a probe pass; rank 0 saves them."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        processes = Processes(rank, 2)
        data = torch.randn(19, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
        mine = slice(0, 7) if rank == 0 else slice(7, 19)
        moments = processes.merge_moments(Moments.of(data[mine]))
        gathered = processes.gather(data[mine].T)
        model = trained_like("resnet8")
        images, labels = _images(23)
        part = processes.shard(len(labels), 5)  # 5 batches of 5 (the last one 3): 2 and 3 batches
        local = run_probe(model, find_sites(model), batches(images[part], labels[part], 5, *NORM.values()), ratios=True,
                          progress=False)
        merged = summarize(processes.merge(local))
        if rank == 0:
            torch.save({"moments": moments, "gathered": gathered, "json": merged.to_json()}, out)
    finally:
        dist.destroy_process_group()


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.slow
def test_two_processes_merge_exactly(tmp_path):
    out = tmp_path / "merged.pt"
    mp.spawn(_merge_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    data = torch.randn(19, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(got["moments"].std(), data.std(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(got["moments"].mean, data.mean(0), rtol=1e-12, atol=0)
    assert got["moments"].count.tolist() == [19.0] * 4 and torch.equal(got["gathered"], data.T)

    from layer_probe.results import Responses
    merged = Responses.from_json(got["json"])
    model = trained_like("resnet8")
    layout = find_sites(model)
    images, labels = _images(23)
    data = list(batches(images, labels, 5, *NORM.values()))
    stored, logits = stored_activations(model, [s.name for s in layout.sites], data)
    assert merged.meta["images"] == 23
    assert merged.top1 == pytest.approx(100 * (logits.argmax(1) == labels).sum().item() / 23)
    for s in merged.sites:  # against torch.std over every stored activation
        a = stored[s.name]
        assert s.std == pytest.approx(a.std().item(), rel=1e-6)
        assert s.channel_std == pytest.approx(a.transpose(0, 1).reshape(a.shape[1], -1).std(1).tolist(), rel=1e-6)
    one = summarize(run_probe(model, layout, data, ratios=True, progress=False))  # the same batches, one process
    assert [s.std for s in merged.sites] == pytest.approx([s.std for s in one.sites], rel=1e-12)
    block_stats = lambda r: [v for b in r.blocks  # noqa: E731
                             for v in (b.ratio_mean, b.ratio_p05, b.ratio_p95, b.cosine_mean)]
    assert len(merged.blocks) == 3 and block_stats(merged) == pytest.approx(block_stats(one), rel=1e-12)


def torchrun(*argv: object) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m layer_probe ARGV` (gloo on the CPU), one thread per process
    whatever OMP_NUM_THREADS the caller set (torchrun keeps a set one), so bf16 rounds as the tests expect."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "layer_probe",
               *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
def test_torchrun_responses_equal_one_process(tree, tmp_path, capsys):
    ckpt = tmp_path / "resnet8.pt"
    save_checkpoint(ckpt, trained_like("resnet8"), "resnet8", meta={"normalization": NORM})
    args = ["responses", ckpt, "--data", tree, "--limit", 59, "--batch-size", 10, "--format", "json", "--device", "cpu"]
    run = torchrun(*args, "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    two = json.loads(run.stdout)  # one JSON document: rank 0 alone printed
    assert json.loads((tmp_path / "out" / "responses.json").read_text())["sites"] == two["sites"]
    assert main([str(a) for a in args]) == 0
    one = json.loads(capsys.readouterr().out)
    assert two["images"] == one["images"] == 59 and two["processes"] == 2 and two["top1"] == one["top1"]
    for a, b in zip(two["sites"], one["sites"]):
        assert a["name"] == b["name"] and a["std"] == pytest.approx(b["std"], rel=1e-9)
        assert a["channel_std"] == pytest.approx(b["channel_std"], rel=1e-9)
    for a, b in zip(two["blocks"], one["blocks"]):
        assert [a[k] for k in ("ratio_mean", "ratio_p05", "ratio_p95")] == pytest.approx(
            [b[k] for k in ("ratio_mean", "ratio_p05", "ratio_p95")], rel=1e-9)
    images, labels = to_tensors(load_cifar10(tree, "test"), 59)  # independently: torch.std over all activations
    model = load_checkpoint(ckpt).model
    names = [s["name"] for s in two["sites"]]
    stored, _ = stored_activations(model, names, list(batches(images, labels, 59, *NORM.values())))
    assert [s["std"] for s in two["sites"]] == pytest.approx([stored[n].std().item() for n in names], rel=1e-6)


@pytest.mark.slow
def test_torchrun_train_takes_one_ddp_step_over_the_whole_batch(tree, tmp_path):
    """41 images, one step: ranks train on 20 and 21 of them; rank 0 writes. Checked against the step computed here."""
    out = tmp_path / "r8.pt"
    run = torchrun("train", "--arch", "resnet8", "--epochs", 1, "--limit", 41, "--data", tree, "--out", out,
                   "--run-dir", tmp_path / "run", "--device", "cpu", "--precision", "bf16")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("wrote") == 1 and run.stdout.count("epoch 1/1") == 1
    ckpt = load_checkpoint(out)
    assert ckpt.meta["processes"] == 2 and ckpt.meta["epochs"] == 1
    assert pd.read_csv(epochs_path(out))["epoch"].tolist() == [1]
    assert pd.read_csv(history_path(out)).groupby("epoch").size().to_dict() == {0: 14, 1: 14}  # both BN modes

    recipe, seed = RECIPES["fast"], 0
    data = load_cifar10(tree, "train")
    index = subset(len(data), 41, seed)
    x_all, y_all = torch.from_numpy(data.images[index]), torch.from_numpy(data.labels[index])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(41, generator=generator)  # the whole (only) batch, in the recipe's order
    x = normalize(augment(x_all[idx], generator), CIFAR_MEAN, CIFAR_STD).contiguous(memory_format=torch.channels_last)
    y = y_all[idx]
    torch.manual_seed(seed)
    init = build_model("resnet8").to(memory_format=torch.channels_last).train()
    halves = [init, build_model("resnet8").to(memory_format=torch.channels_last).train()]
    halves[1].load_state_dict(init.state_dict())
    before = {k: v.clone() for k, v in init.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process, so the bf16 forward rounds the same way
    try:
        total = 0
        for model, part in zip(halves, (slice(0, 20), slice(20, 41))):  # BN statistics per process, as in DDP
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[part]), y[part], label_smoothing=recipe.label_smoothing, reduction="sum")
            total = total + loss / 41  # the mean loss over the whole batch
        total.backward()
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(init.parameters(), halves[1].parameters()):
        p.grad += q.grad
    params = [{"params": [p for p in init.parameters() if p.ndim > 1], "weight_decay": recipe.weight_decay},
              {"params": [p for p in init.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    lr = lr_at(recipe, 0, 1, "resnet8")  # iteration 0 of 1
    torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov).step()
    trained, expected = ckpt.model.state_dict(), init.state_dict()  # rank 0's BN buffers: its 20 images
    for name, value in expected.items():
        if value.is_floating_point():  # the change in one step, so that the tolerance means something
            torch.testing.assert_close(trained[name] - before[name], value - before[name], rtol=1e-5, atol=1e-7)
