"""Hostile and broken input: nothing executed, nothing lost, one clear error.

Checkpoints from strangers, half-copied data, full disks, kills mid-run: every case ends in
one line naming the file and exit code 2 (or loads correctly), leaves old files whole, and
leaves the model as it was.
"""

import contextlib
import errno
import importlib
import io
import json
import os
import pickle
import pickletools
import random
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import types
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from conftest import png_bytes, synthetic_images, write_tree
from layer_probe.checkpoint import load_checkpoint, save_checkpoint, torch_load
from layer_probe.cli import main
from layer_probe.data import CLASSES, load_cifar10, to_tensors
from layer_probe.errors import LayerProbeError
from layer_probe.plots import plot_responses, save_figure
from layer_probe.probe import run_probe
from layer_probe.measurement import ProbeConfig, measure_images
from layer_probe.sites import find_sites
from layer_probe.train import RECIPES, TrainConfig, epochs_path, history_path, train
from conftest import run
from conftest import batches, trained_like
from conftest import config as train_config


def assert_one_line_error(code, err, *fragments):
    """Exit code 2 and one line on stderr that says each fragment (the file's name among them), no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("layer-probe: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def cli(*argv):
    """`python -m layer_probe ARGV` in a fresh process; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "layer_probe", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------------------------------
# Checkpoints that would run code


class Payload:
    """Unpickling this calls `func(*args)`: what a hostile checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@dataclass
class Traps:
    """Detectors for what a payload could do: create a file, connect a socket, import a module."""

    created: Path  # a payload would create this file
    server: socket.socket  # listening on 127.0.0.1, non-blocking: accept() succeeds only after a connection
    module: str  # importable from a temporary folder; importing it creates `imported`
    imported: Path

    def sprung(self) -> list[str]:
        found = ["file"] if self.created.exists() else []
        with contextlib.suppress(BlockingIOError):
            self.server.accept()[0].close()
            found.append("socket")
        if self.module in sys.modules or self.imported.exists():
            found.append("import")
        return found

    def payload(self, kind: str, monkeypatch) -> Payload:
        if kind == "file":
            return Payload(os.system, f"touch {self.created}")
        if kind == "socket":
            return Payload(socket.create_connection, self.server.getsockname())
        if kind == "import":
            return Payload(importlib.import_module, self.module)
        # "global": the pickle names a function of the module itself, so plain unpickling imports it
        stand_in = types.ModuleType(self.module)
        stand_in.run = lambda: None
        stand_in.run.__module__, stand_in.run.__qualname__ = self.module, "run"
        monkeypatch.setitem(sys.modules, self.module, stand_in)  # only while the file is written
        return Payload(stand_in.run)


@pytest.fixture
def traps(tmp_path, monkeypatch):
    module = f"lp_hostile_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    imported = tmp_path / "imported"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / f"{module}.py").write_text(f"from pathlib import Path\nPath({str(imported)!r}).touch()\n\n\n"
                                      "def run():\n    return None\n")
    monkeypatch.syspath_prepend(str(lib))
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    yield Traps(tmp_path / "created", server, module, imported)
    server.close()
    sys.modules.pop(module, None)


def write_container(path: Path, obj, container: str) -> None:
    if container == "zip":
        torch.save({"state_dict": {}, "payload": obj}, path)
    elif container == "legacy":  # the pre-1.6 format of many public checkpoints (e.g. akamaster's)
        torch.save({"state_dict": {}, "payload": obj}, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle renamed .pt
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("kind", ["file", "socket", "import", "global"])
def test_code_in_a_checkpoint_is_refused_and_nothing_happens(kind, container, traps, tmp_path, capsys, monkeypatch):
    path = tmp_path / "evil.pt"
    write_container(path, traps.payload(kind, monkeypatch), container)
    monkeypatch.delitem(sys.modules, traps.module, raising=False)
    assert traps.sprung() == []
    code, _, err = run(capsys, "responses", path)
    assert_one_line_error(code, err, path, "refused")
    assert traps.sprung() == []
    # control: the same file read without weights_only does spring the trap, so the detectors work
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=False)
    assert traps.sprung() == ["import" if kind == "global" else kind]


# ---------------------------------------------------------------------------------------------
# Damaged, wrong and crafted checkpoints


def _state(arch="resnet8", **changes):
    """A state_dict with some entries replaced; `changes` values are functions of the original entry."""
    state = trained_like(arch).state_dict()
    return state | {k: change(state[k]) for k, change in changes.items()}


def _saved(make):
    """Write what `make()` returns with torch.save (built when the test runs, not when it is collected)."""
    return lambda path: torch.save(make(), path)


def _written(make):
    return lambda path: path.write_bytes(make())


def _zip_of_text(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/notes.txt", "not a checkpoint")


def _truncated(path):
    save_checkpoint(path, trained_like("resnet8"), "resnet8")
    path.write_bytes(path.read_bytes()[:5000])


def _file(**fields):
    """A layer-probe style file: a resnet8 state_dict plus `fields`."""
    return _saved(lambda: {"state_dict": _state(), **fields})


RUN_FILES = ["state.epochs.csv", "state.history.csv", "state.pt"]  # a run folder: its state and its logs

BROKEN = {  # name: (how to make the file, extra CLI arguments, what the error says)
    "empty": (_written(lambda: b""), [], "empty file"),
    "directory": (lambda path: path.mkdir(), [], "is a directory"),
    "random bytes": (_written(lambda: random.Random(0).randbytes(4096)), [], "not a readable PyTorch checkpoint"),
    "PNG renamed .pt": (_written(lambda: png_bytes(synthetic_images(1)[0][0])), [],
                        "not a readable PyTorch checkpoint"),
    "zip of text": (_zip_of_text, [], "not a readable PyTorch checkpoint"),
    "truncated": (_truncated, [], "not a readable PyTorch checkpoint"),
    "a list": (_saved(lambda: [1, 2, 3]), [], "holds a list without a 'state_dict'"),
    "wrong architecture": (_saved(lambda: _state("resnet20")), ["--arch", "resnet8"], "weights do not fit resnet8"),
    "wrong shape": (_saved(lambda: _state(**{"linear.weight": lambda w: w[:5]})), ["--arch", "resnet8"],
                    "wrong shapes: ['linear.weight (5, 64) != (10, 64)']"),
    "NaN weight": (_saved(lambda: _state(**{"layer1.0.bn1.weight": lambda w: w * float("nan")})), ["--arch", "resnet8"],
                   "NaN or Inf, e.g. layer1.0.bn1.weight"),
    "Inf weight": (_saved(lambda: _state(**{"conv1.weight": lambda w: torch.full_like(w, float("inf"))})),
                   ["--arch", "resnet8"],
                   "NaN or Inf, e.g. conv1.weight"),
    "complex weight": (_saved(lambda: _state(**{"linear.weight": lambda w: w.to(torch.complex64)})),
                       ["--arch", "resnet8"], "wrong dtypes: ['linear.weight torch.complex64']"),
    "sparse weight": (_saved(lambda: _state(**{"linear.weight": lambda w: w.to_sparse()})), ["--arch", "resnet8"],
                      "'linear.weight' is not a plain dense tensor"),
    "list as weight": (_saved(lambda: {"state_dict": {"conv1.weight": [1.0, 2.0]}}), [],
                       "'conv1.weight' is not a plain dense tensor"),
    "integer key": (_saved(lambda: {"state_dict": {1: torch.zeros(3)}}), [], "key 1 is not a string"),
    # 10**12 values over one stored float: a shape check alone would pass it on to allocate 4 TB
    "broadcast view": (_saved(lambda: _state(**{"linear.weight": lambda w: w[0, :1].expand(10**12)})),
                       ["--arch", "resnet8"], "'linear.weight' claims more values than the file stores"),
    "arch_kwargs not a dict": (_file(arch="resnet8", arch_kwargs=[1]), [], "'arch_kwargs' must be a dict"),
    # a 2 TB classifier: the file is checked against a skeleton on the meta device before anything is allocated
    "huge arch_kwargs": (_file(arch="resnet18", arch_kwargs={"num_classes": 10**9}), [], "weights do not fit resnet18"),
    "negative arch_kwargs": (_file(arch="resnet18", arch_kwargs={"num_classes": -1}), [], "cannot build resnet18"),
    "unknown arch": (_file(arch="resnet9"), [], "unknown architecture 'resnet9'"),
    "normalization not numbers": (_file(arch="resnet8", meta={"normalization": {"mean": "abc"}}), [],
                                  "meta 'normalization' must be"),
    "zero std": (_file(arch="resnet8", meta={"normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}), [],
                 "meta 'normalization' must be"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_checkpoints_give_one_line_naming_the_file(name, tmp_path, capsys):
    make, extra, message = BROKEN[name]
    path = tmp_path / "ckpt.pt"
    make(path)
    code, out, err = run(capsys, "responses", path, *extra)
    assert_one_line_error(code, err, path, message)
    assert out == ""


def _span(raw: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Byte range of a stored zip record's data (the local header's extra field may differ from the central one)."""
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def _pickles_end(raw: bytes, count: int) -> int:
    """Where the first `count` pickles of a byte string end."""
    f = io.BytesIO(raw)
    for _ in range(count):
        for _ in pickletools.genops(f):
            pass
    return f.tell()


def _legacy_bytes(model: nn.Module) -> bytes:
    """A pre-1.6 checkpoint (the format of akamaster's and other public files), the same bytes on every run.

    The legacy writer keys each storage by its memory address; here all weights are views of one
    storage, and its key is renamed to "0" inside the pickles (the first five: magic number,
    protocol, system info, the object, the storage keys).
    """
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    flat = torch.cat([v.flatten() for v in weights.values()])
    offsets = np.cumsum([0] + [v.numel() for v in weights.values()])
    state = {k: flat[a:b].view(v.shape) for (k, v), a, b in zip(weights.items(), offsets, offsets[1:])}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "arch": "resnet8"}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    end = _pickles_end(raw, 5)
    [key] = pickle.loads(raw[_pickles_end(raw, 4):end])
    address = b"X" + struct.pack("<I", len(key)) + key.encode()  # BINUNICODE, as the legacy writer spells it
    return raw[:end].replace(address, b"X" + struct.pack("<I", 1) + b"0") + raw[end:]


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the loader can hide it."""


@pytest.mark.slow  # 300 loads: 3-12 s on 2 CPU cores, depending on what else runs
def test_fuzzed_checkpoints_load_correctly_or_fail_with_one_clear_error(tmp_path):
    """Mutate a valid resnet8 checkpoint 300 times: each loads, or raises LayerProbeError naming the file.

    torch's zip archives carry CRCs but torch.load does not check them, and the legacy format has none,
    so mutations reach the unpickler. They are aimed at each part: anywhere in the zip, its pickle
    (data.pkl, the only place an unpickler reads), its central directory, and the legacy format's
    pickles and whole file.
    """
    good, again = tmp_path / "good.pt", tmp_path / "again.pt"
    for path in (good, again):
        save_checkpoint(path, trained_like("resnet8"), "resnet8", meta={"normalization": {"mean": [0.5] * 3,
                                                                                         "std": [0.25] * 3}})
    zipped, legacy = good.read_bytes(), _legacy_bytes(trained_like("resnet8"))
    # the same bytes on every run, so that a failing case reproduces
    assert zipped == again.read_bytes() and legacy == _legacy_bytes(trained_like("resnet8"))
    archive = zipfile.ZipFile(io.BytesIO(zipped))
    pkl = _span(zipped, archive.getinfo("archive/data.pkl"))
    assert zipped[pkl[0]:pkl[0] + 2] == b"\x80\x02"  # the pickle's first opcode: the span is right
    (tmp_path / "legacy.pt").write_bytes(legacy)
    assert load_checkpoint(tmp_path / "legacy.pt").arch == "resnet8"
    regions = {"zip anywhere": (zipped, 0, len(zipped)), "zip pickle": (zipped, *pkl),
               "zip directory": (zipped, archive.start_dir, len(zipped)),
               "legacy pickles": (legacy, 0, _pickles_end(legacy, 5)), "legacy anywhere": (legacy, 0, len(legacy))}
    rng = random.Random(7)
    path, names = tmp_path / "fuzzed.pt", trained_like("resnet8").state_dict().keys()
    outcomes = Counter()

    def alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for case in range(300):
                region = list(regions)[case % len(regions)]
                raw, lo, hi = regions[region]
                data, kind = bytearray(raw), rng.choice(["flip", "truncate", "insert", "zero"])
                at = rng.randrange(lo, hi)
                if kind == "flip":
                    for i in [at] + [rng.randrange(lo, hi) for _ in range(rng.randint(0, 3))]:
                        data[i] ^= rng.randrange(1, 256)
                elif kind == "truncate":
                    del data[at:]
                elif kind == "insert":
                    data[at:at] = rng.randbytes(rng.randint(1, 8))
                else:
                    end = min(len(data), at + rng.randint(1, 64))
                    data[at:end] = bytes(end - at)
                path.write_bytes(bytes(data))
                signal.setitimer(signal.ITIMER_REAL, 20)
                try:
                    loaded = load_checkpoint(path)
                except LayerProbeError as e:
                    assert str(e).startswith(f"{path}: ") and "\n" not in str(e), (case, region, kind, str(e))
                    outcomes[region, "error"] += 1
                except _Hang:
                    pytest.fail(f"case {case} ({region}, {kind} at {at}) took more than 20 s")
                except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
                    pytest.fail(f"case {case} ({region}, {kind} at {at}): {type(e).__name__}: {e}")
                else:
                    state = loaded.model.state_dict()
                    assert loaded.arch == "resnet8" and state.keys() == names
                    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
                    outcomes[region, "loaded"] += 1
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        assert not caught, [str(w.message) for w in caught[:3]]  # a warning would be a second line on stderr
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert all(outcomes[region, "error"] for region in regions), outcomes  # every part was reached and defended
    assert outcomes["zip anywhere", "loaded"], outcomes  # most of the file is tensor data, and loads as such


# ---------------------------------------------------------------------------------------------
# Data


def _tar(tree: Path, path: Path) -> bytes:
    with tarfile.open(path, "w") as tar:
        tar.add(tree, arcname="cifar")
    return path.read_bytes()


def test_truncated_or_damaged_tar_archives_are_errors(tree, tmp_path, capsys, ckpt):  # noqa: F811
    """A plain tar cut at a member boundary or inside a header used to end quietly with fewer images."""
    raw = _tar(tree, tmp_path / "whole.tar")
    with tarfile.open(tmp_path / "whole.tar") as tar:
        offsets = [m.offset for m in tar.getmembers()]
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tar:
        tar.add(tree, arcname="cifar")
    bad_header = bytearray(raw)
    bad_header[offsets[len(offsets) // 2] + 148] ^= 0x55  # the header's checksum field
    cases = {"cut at a member": raw[:offsets[len(offsets) // 2]], "cut inside a header": raw[:offsets[-5] + 100],
             "cut inside data": raw[:offsets[-5] + 700], "damaged header": bytes(bad_header),
             "gzip cut in half": gz.getvalue()[:len(gz.getvalue()) // 2],
             "random bytes": random.Random(1).randbytes(9000)}
    for name, data in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.tar"
        path.write_bytes(data)
        for split in ("train", "test"):
            code, _, err = run(capsys, "responses", ckpt, "--data", path, "--split", split)
            assert_one_line_error(code, err, path, "not a readable tar archive")
    assert len(load_cifar10(tmp_path / "whole.tar", "train")) == len(load_cifar10(tmp_path / "whole.tar", "test")) == 60


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "dataset not found"),
    (lambda root: root.mkdir(), "no 'test/' folder"),
    (lambda root: (root / "test").mkdir(parents=True), "no readable images in the test split"),
    (lambda root: [(root / "test" / c).mkdir(parents=True) for c in CLASSES], "no readable images in the test split"),
    (lambda root: [(root / "test" / "cat").mkdir(parents=True), (root / "test" / "cat" / "a.png").write_bytes(b"x")],
     "no readable images in the test split (1 unreadable or non-32x32, e.g. "),
])
def test_missing_or_empty_data_is_one_line(make, message, tmp_path, capsys, ckpt):  # noqa: F811
    root = tmp_path / "data"
    make(root)
    code, _, err = run(capsys, "responses", ckpt, "--data", root)
    assert_one_line_error(code, err, root, message)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header that claims width x height pixels (PIL refuses to open more than ~179M)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_unreadable_and_wrongly_sized_images_are_skipped_counted_and_named(tmp_path, capsys, ckpt):  # noqa: F811
    """Skipped with a warning that counts them and names one, on the first run and on cached runs;
    files without an image suffix are not images and are ignored."""
    from PIL import Image

    root = write_tree(tmp_path / "data", n_per_class=2)
    (root / "test" / "cat" / "0000-text.jpg").write_text("a text file renamed .jpg")
    Image.new("RGB", (40, 40)).save(root / "test" / "dog" / "0000-big.png")
    Image.new("L", (32, 32)).save(root / "test" / "dog" / "0001-grey.png")  # grey but 32x32: converted, kept
    (root / "test" / "frog" / "0000-bomb.png").write_bytes(_bomb_png(30000, 30000))
    (root / "test" / "frog" / "notes.txt").write_text("ignored")
    skipped = {str(root / "test" / c / n) for c, n in [("cat", "0000-text.jpg"), ("dog", "0000-big.png"),
                                                        ("frog", "0000-bomb.png")]}
    for attempt in ("decoded", "cached"):
        code, out, err = run(capsys, "responses", ckpt, "--data", root, "--format", "json")
        assert code == 0 and json.loads(out)["images"] == 21, attempt
        [warning] = err.splitlines()
        assert warning.startswith(f"warning: {root}: skipped 3 unreadable or non-32x32 image(s) in the test split, ")
        assert warning.split("e.g. ")[1] in skipped, attempt
    assert set(load_cifar10(root, "test").skipped) == skipped


def test_a_class_without_images_is_named_in_a_warning(tmp_path, capsys, ckpt):  # noqa: F811
    root = write_tree(tmp_path / "data", n_per_class=2)
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    for f in (root / "test" / "cat").iterdir():
        f.write_bytes(b"broken")  # every cat unreadable: the class is missing as well
    for attempt in ("decoded", "cached"):
        code, out, err = run(capsys, "responses", ckpt, "--data", root, "--format", "json")
        assert code == 0 and json.loads(out)["images"] == 16, attempt
        assert err.splitlines()[-1] == f"warning: {root}: no test images of class(es) cat, dog", attempt


@pytest.mark.parametrize("argv, message", [
    (["responses", "x.pt", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["responses", "x.pt", "--limit", "-3"], "argument --limit: must be at least 1, got -3"),
    (["responses", "x.pt", "--limit", "ten"], "argument --limit: expected a whole number, got 'ten'"),
    (["responses", "x.pt", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["train", "--arch", "resnet8", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["train", "--arch", "resnet8", "--epochs", "-1"], "argument --epochs: must be at least 1, got -1"),
])
def test_bad_numbers_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_bad_numbers_in_the_library_are_errors(tree):
    model, data = trained_like("resnet8"), load_cifar10(tree, "test")
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    with pytest.raises(LayerProbeError, match="batch_size must be at least 1, got 0"):
        measure_images(model, images, labels, (0.5,) * 3, (0.25,) * 3, ProbeConfig(batch_size=0), progress=False)
    for limit in (0, -5):
        with pytest.raises(LayerProbeError, match=f"limit must be a positive number of images, got {limit}"):
            to_tensors(data, limit)


# ---------------------------------------------------------------------------------------------
# Activations


def test_non_finite_activations_are_reported_by_site_with_exact_counts(tree, tmp_path, capsys):
    """A negative running variance makes one channel of layer2.0.bn1 NaN at every position; the next
    3x3 conv spreads it to every element after it. Counts follow from the shapes: 60 test images,
    layer2 at 16x16 (32 channels), layer3 at 8x8 (64 channels)."""
    model = trained_like("resnet8")
    with torch.no_grad():
        model.layer2[0].bn1.running_var[0] = -1.0
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model, "resnet8")
    code, out, err = run(capsys, "responses", path, "--data", tree, "--format", "json")
    expected = {"layer2.0.bn1": 60 * 1 * 16 * 16, "layer2.0.bn2": 60 * 32 * 16 * 16,
                "layer3.0.bn1": 60 * 64 * 8 * 8, "layer3.0.bn2": 60 * 64 * 8 * 8}
    assert code == 1
    assert err.splitlines() == [f"warning: site {name} produced {n} non-finite value(s); its std is undefined"
                                for name, n in expected.items()]
    sites = {s["name"]: s for s in json.loads(out)["sites"]}
    assert {name: s["nonfinite"] for name, s in sites.items() if s["nonfinite"]} == expected
    assert all(np.isnan(sites[name]["std"]) for name in expected)
    assert all(np.isfinite(s["std"]) for name, s in sites.items() if name not in expected)


# ---------------------------------------------------------------------------------------------
# Outputs: old file or new file, never half of one


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _io_error(*args, **kwargs):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _half_then(fail):
    """A writer (to a path or an open file) that writes half of its output, then fails."""
    def write(target, data: bytes):
        if hasattr(target, "write"):
            target.write(data[:len(data) // 2])
        else:
            Path(target).write_bytes(data[:len(data) // 2])
        fail()

    return write


def _break_writer(m, output: str, fail) -> None:
    """Make the writer behind `output` write half of its file and then fail."""
    if output == "responses":
        m.setattr(Path, "write_text", lambda self, text, **kw: _half_then(fail)(self, text.encode()))
    elif output == "plot":
        m.setattr(Figure, "savefig", lambda self, fname, **kw: _half_then(fail)(fname, b"<svg>" * 100))
    else:
        m.setattr(torch, "save", lambda obj, f, **kw: _half_then(fail)(f, b"PK" * 100))


@pytest.mark.parametrize("failure", ["full disk", "interrupt", "rename fails"])
@pytest.mark.parametrize("output", ["responses", "plot", "checkpoint"])
def test_a_failed_write_leaves_the_old_file_and_no_debris(output, failure, responses, tmp_path,  # noqa: F811
                                                          monkeypatch):
    names = {"responses": ["responses.csv", "responses.json"], "plot": ["fig7.svg"], "checkpoint": ["m.pt"]}[output]
    first = {"responses": "responses.json", "plot": "fig7.svg", "checkpoint": "m.pt"}[output]  # the one that fails
    for name in names:
        (tmp_path / name).write_bytes(f"old {name}".encode())
    write = {"responses": lambda: responses.save(tmp_path),
             "plot": lambda: save_figure(plot_responses([responses]), tmp_path / "fig7.svg"),
             "checkpoint": lambda: save_checkpoint(tmp_path / "m.pt", trained_like("resnet8"), "resnet8")}[output]
    with monkeypatch.context() as m:
        if failure == "rename fails":  # the whole new file was written; only the rename fails
            m.setattr(os, "replace", _io_error)
        else:
            _break_writer(m, output, _interrupt if failure == "interrupt" else _full_disk)
        expected = {"full disk": (LayerProbeError, f"cannot write {tmp_path / first}: No space left on device"),
                    "rename fails": (LayerProbeError, f"cannot write {tmp_path / first}: Input/output error"),
                    "interrupt": (KeyboardInterrupt, None)}[failure]
        with pytest.raises(expected[0], match=expected[1]):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert [(tmp_path / n).read_bytes() for n in names] == [f"old {n}".encode() for n in names]


def test_full_disk_through_the_cli_is_one_line_and_keeps_old_results(ckpt, tree, tmp_path, capsys,  # noqa: F811
                                                                     monkeypatch):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "responses", ckpt, "--data", tree, "--out", out, "--plot", tmp_path / "fig7.png")
    assert code == 0
    before = {p: p.read_bytes() for p in [out / "responses.json", out / "responses.csv", tmp_path / "fig7.png"]}
    for output, argv, target in [("responses", ["--out", out], out / "responses.json"),
                                 ("plot", ["--plot", tmp_path / "fig7.png"], tmp_path / "fig7.png")]:
        with monkeypatch.context() as m:
            _break_writer(m, output, _full_disk)
            code, _, err = run(capsys, "responses", ckpt, "--data", tree, "--limit", "10", *argv)
        assert_one_line_error(code, err, f"cannot write {target}: No space left on device")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["responses.csv", "responses.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig7.png", "out"]


@pytest.mark.slow  # two short trainings: 6-13 s on 2 shared CPU cores
def test_training_state_cut_mid_write_is_whole_and_resumable(tree, tmp_path, monkeypatch):
    """A kill while epoch 2's state is being written leaves epoch 1's state, from which --resume finishes."""
    config = train_config(tmp_path, tree)  # two epochs
    real_save, saves = torch.save, []

    def save_then_die(obj, f, **kw):
        saves.append(obj.get("epoch"))
        if len(saves) == 2:  # epoch 2's state
            _half_then(_interrupt)(f, b"PK" * 1000)
        real_save(obj, f, **kw)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(torch, "save", save_then_die)
        train(config)
    assert saves == [1, 2] and torch_load(tmp_path / "run" / "state.pt")["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == RUN_FILES
    assert pd.read_csv(epochs_path(tmp_path / "run" / "state.pt"))["epoch"].tolist() == [1]
    assert not epochs_path(config.out).exists()
    train(config, resume=True)
    assert pd.read_csv(epochs_path(config.out))["epoch"].tolist() == [1, 2]
    assert load_checkpoint(config.out).meta["epochs"] == 2


@pytest.mark.parametrize("argv, where", [
    (["train", "--arch", "resnet8", "--out", "{blocker}/r8.pt"], "{blocker}"),
    (["train", "--arch", "resnet8", "--out", "{tmp}/r8.pt", "--run-dir", "{blocker}/run"], "{blocker}/run"),
    (["responses", "{ckpt}", "--out", "{blocker}/out"], "{blocker}/out"),
    (["responses", "{ckpt}", "--plot", "{blocker}/fig7.png"], "{blocker}"),
])
def test_unwritable_outputs_are_reported_before_any_work(argv, where, tmp_path, capsys, ckpt):  # noqa: F811
    """The data does not exist: an error about writing proves the check came first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fill = {"blocker": blocker, "tmp": tmp_path, "ckpt": ckpt}
    code, _, err = run(capsys, *[a.format(**fill) for a in argv], "--data", tmp_path / "no-data")
    assert_one_line_error(code, err, f"cannot write to {where.format(**fill)}: ")


@pytest.mark.parametrize("state, message", [
    (b"PK\x03\x04 half a state", "not a readable PyTorch checkpoint"),
    ({"config": {"arch": "plain8"}, "epoch": 1}, "holds a run of plain8, not of resnet8"),
    ([1, 2], "holds no training run, not of resnet8"),
])
def test_a_damaged_or_foreign_run_is_refused_on_resume(state, message, tree, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    if isinstance(state, bytes):
        (tmp_path / "run" / "state.pt").write_bytes(state)
    else:
        torch.save(state, tmp_path / "run" / "state.pt")
    code, _, err = run(capsys, "train", "--arch", "resnet8", "--epochs", "1", "--data", tree,
                       "--out", tmp_path / "r8.pt", "--run-dir", tmp_path / "run", "--resume")
    assert_one_line_error(code, err, tmp_path / "run" / "state.pt", message)


@pytest.mark.parametrize("state, message", [
    (b"PK\x03\x04 half a state", "not a readable PyTorch checkpoint"),
    ({"epoch": 1}, "not a saved training run (it holds no response history)"),
    ({"history_csv": Payload(os.getcwd)}, "refused: it asks to import posix.getcwd"),
])
def test_a_damaged_run_folder_is_one_line_for_dynamics(state, message, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    if isinstance(state, bytes):
        (tmp_path / "run" / "state.pt").write_bytes(state)
    else:
        torch.save(state, tmp_path / "run" / "state.pt")
    code, _, err = run(capsys, "dynamics", tmp_path / "run")
    assert_one_line_error(code, err, tmp_path / "run" / "state.pt", message)


# ---------------------------------------------------------------------------------------------
# The model is left as it was


class FailOn(nn.Module):
    """Wraps a module and raises on its n-th call: a failure deep inside a forward pass."""

    def __init__(self, inner: nn.Module, n: int):
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("boom")
        return self.inner(x)


def _hooks(model: nn.Module) -> dict:
    """Every hook dictionary of every module, and torch's global module hooks, by name."""
    import torch.nn.modules.module as module_hooks

    per_module = {(name, attr): list(value) for name, m in model.named_modules() for attr, value in vars(m).items()
                  if "hook" in attr and isinstance(value, dict)}
    return per_module | {attr: list(value) for attr, value in vars(module_hooks).items()
                         if attr.startswith("_global") and "hook" in attr and isinstance(value, dict)}


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("failure", ["forward raises", "interrupt between batches", "bad batch size"])
def test_a_failed_probe_leaves_the_model_as_it_was(failure, bn_mode):
    model = trained_like("resnet8").train()
    model.layer1.eval()  # a mixed mode, so that restoring "train" or "eval" everywhere would be caught
    layout = find_sites(model).select("all-bn")
    model.layer3[0].conv1 = FailOn(model.layer3[0].conv1, 2)  # not a site: the layout still holds
    calls = []
    model.layer2.register_forward_hook(lambda m, a, out: calls.append(1))  # the user's own hook must stay
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes, hooks = {n: m.training for n, m in model.named_modules()}, _hooks(model)
    data = batches(3)
    if failure == "forward raises":
        with pytest.raises(RuntimeError, match="boom"):
            run_probe(model, layout, data, bn_mode=bn_mode, ratios=True, progress=False)
    elif failure == "interrupt between batches":
        def interrupted():
            yield data[0]
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_probe(model, layout, interrupted(), bn_mode=bn_mode, ratios=True, progress=False)
    else:
        images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
        with pytest.raises(LayerProbeError, match="batch_size must be at least 1"):
            measure_images(model, images, torch.zeros(6, dtype=torch.long), (0.5,) * 3, (0.25,) * 3,
                              ProbeConfig(bn_mode=bn_mode, batch_size=0), progress=False, layout=layout)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert _hooks(model) == hooks
    assert len(model.layer2._forward_hooks) == 1 and calls == [1] * (model.layer3[0].conv1.calls or 0)


# ---------------------------------------------------------------------------------------------
# Training killed by SIGTERM


@pytest.mark.slow
def test_sigterm_during_training_then_resume_loses_only_the_unfinished_epoch(tmp_path):
    data = write_tree(tmp_path / "data", n_per_class=20)
    for folder in (data / "test").iterdir():  # 20 test images: evaluation and probes are quick
        for f in sorted(folder.iterdir())[2:]:
            f.unlink()
    out, run_dir, epochs = tmp_path / "r8.pt", tmp_path / "run", 8  # epochs enough that the signal lands mid-run
    argv = [sys.executable, "-u", "-m", "layer_probe", "train", "--arch", "resnet8", "--limit", "100",
            "--epochs", str(epochs), "--data", str(data), "--out", str(out), "--run-dir", str(run_dir),
            "--device", "cpu", "--precision", "fp32"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline() == "resnet8: precision fp32 (as requested)\n"
        first = proc.stdout.readline()
        assert first.startswith(f"resnet8 epoch 1/{epochs}: "), first + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.splitlines()[-1] == "layer-probe: interrupted" and "Traceback" not in err
    assert f"epoch {epochs}/{epochs}" not in rest
    assert not out.exists() and not epochs_path(out).exists()  # logs come with the .pt
    finished = pd.read_csv(epochs_path(run_dir / "state.pt"))["epoch"].tolist()
    assert finished == list(range(1, len(finished) + 1)) and len(finished) < epochs  # whole epochs only: the one
    # running at the signal is not recorded
    assert torch_load(run_dir / "state.pt")["epoch"] == finished[-1]
    assert sorted(p.name for p in run_dir.iterdir()) == RUN_FILES  # no half-written temporary file
    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resnet8 epoch {finished[-1]}/{epochs}" not in resumed.stdout
    assert f"resnet8 epoch {epochs}/{epochs}" in resumed.stdout
    log, history = pd.read_csv(epochs_path(out)), pd.read_csv(history_path(out))
    assert log["epoch"].tolist() == list(range(1, epochs + 1))
    assert history.groupby("epoch").size().to_dict() == {e: 2 * 7 for e in range(epochs + 1)}  # both BN modes
    # nothing lost: the same weights and epoch log as a run never interrupted
    whole = TrainConfig(arch="resnet8", out=tmp_path / "whole" / "r8.pt",
                        recipe=replace(RECIPES["fast"], epochs=epochs), data=str(data), run_dir=tmp_path / "whole-run",
                        limit=100, progress=False, precision="fp32")
    train(whole)
    a, b = load_checkpoint(out).model.state_dict(), load_checkpoint(whole.out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    columns = ["epoch", "train_loss", "train_error", "test_error"]
    assert log[columns].equals(pd.read_csv(epochs_path(whole.out))[columns])


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.slow
def test_same_checkpoint_data_and_settings_give_bitwise_identical_std_on_the_cpu(ckpt, tmp_path, capsys,  # noqa: F811
                                                                                 monkeypatch):
    """Once in this process decoding the images, once in a fresh process reading them from the cache."""
    data = write_tree(tmp_path / "data", n_per_class=6)
    monkeypatch.setenv("LAYER_PROBE_CACHE", str(tmp_path / "cache"))
    argv = ["responses", ckpt, "--data", data, "--device", "cpu", "--batch-size", "25", "--format", "json"]
    code, out, _ = run(capsys, *argv)
    fresh = cli(*argv)
    assert code == 0 and fresh.returncode == 0, fresh.stderr
    a, b = json.loads(out), json.loads(fresh.stdout)
    fields = ["std", "mean", "rms", "channel_std"]
    assert [[s[f] for f in fields] for s in a["sites"]] == [[s[f] for f in fields] for s in b["sites"]]
    assert a["blocks"] == b["blocks"] and a["top1"] == b["top1"]
    assert len(a["sites"]) == 7 and all(s["std"] > 0 for s in a["sites"])
