"""The answers in two languages: one template pair per question, the same values, the same numbers."""

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import pytest

from layer_probe.answers import LANGS, QUESTIONS, fields, load_answer, render, save_answer, stored_answers, template
from layer_probe.errors import LayerProbeError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


def numbers(text: str) -> set[str]:
    """The numbers written in a text, as strings: 1,000 and 1000 differ, so both languages must write them alike."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    return set(NUMBER.findall(text))


def synthetic(names: set[str]) -> dict[str, object]:
    """Distinct values for every field: booleans where a choice needs one, numbers elsewhere."""
    return {name: (i % 2 == 0 if any(f"{{{name}:?" in template(q, "en") for q in QUESTIONS) else 1000 + i + 0.123)
            for i, name in enumerate(sorted(names))}


def test_numbers_are_read_as_written():
    assert numbers("r = +0.78, p = 0.00085, 10,000 images, ρ −0.39, 87%, resnet56, x") == {
        "+0.78", "0.00085", "10,000", "-0.39", "87", "56"}


def test_a_choice_follows_its_boolean_and_a_spec_formats_its_number():
    from layer_probe import answers

    f = answers._Formatter()
    assert f.format("{h:?holds|does not hold}, {x:.2f}, {s:.0%}", h=False, x=1.005, s=0.126) == "does not hold, 1.00, 13%"
    assert f.format("{h:?성립한다|성립하지 않는다}", h=True) == "성립한다"
    with pytest.raises(LayerProbeError, match="boolean"):
        f.format("{h:?a|b}", h=0.3)
    with pytest.raises(LayerProbeError, match="'missing'"):
        f.format("{missing:.2f}")


@pytest.mark.parametrize("question", QUESTIONS)
def test_both_languages_use_the_same_values(question):
    assert fields(template(question, "en")) == fields(template(question, "ko"))


def test_fields_finds_the_values_inside_a_choice():
    assert fields("{a:.2f} {b:?up by {c:.1%}|flat}.") == {"a", "b", "c"}


@pytest.mark.parametrize("question", QUESTIONS)
def test_both_languages_write_the_same_numbers(question):
    values = synthetic(fields(template(question, "en")))
    en, ko = (render(question, values, lang) for lang in LANGS)
    assert numbers(en) == numbers(ko)
    assert re.search(r"[\uac00-\ud7a3]", ko) and not re.search(r"[\uac00-\ud7a3]", en)


def test_a_changed_value_changes_both_languages():
    names = fields(template("identity", "en"))
    values = synthetic(names)
    changed = values | {"train_error_plain56": 31.41}
    for lang in LANGS:
        assert "31.41" in render("identity", changed, lang) and "31.41" not in render("identity", values, lang)


def test_saved_answers_render_in_the_chosen_languages_and_stale_ones_are_left_out(tmp_path, monkeypatch):
    from layer_probe import answers

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "resnet20.pt").write_bytes(b"weights")
    monkeypatch.setattr(answers, "checkpoints_dir", lambda: root)
    values = synthetic(fields(template("identity", "en")))
    source = {"data": "cifar10-jpeg.tar.gz", "data_sha256": "ab" * 32,
              "checkpoints": {"resnet20.pt": hashlib.sha256(b"weights").hexdigest()}}
    save_answer(tmp_path / "identity.json", "identity", values, source)
    assert load_answer(tmp_path / "identity.json")["provenance"] == source
    both = stored_answers(LANGS, tmp_path)
    assert "#" + render("identity", values, "en") in both and "#" + render("identity", values, "ko") in both
    assert render("identity", values, "ko") not in stored_answers(["en"], tmp_path)
    assert "no saved values" in both  # the other three questions
    (root / "resnet20.pt").write_bytes(b"retrained")
    stale = stored_answers(LANGS, tmp_path)
    assert "Left out: measured on other versions of resnet20.pt" in stale and render("identity", values, "en") not in stale
    with pytest.raises(LayerProbeError, match="was not measured"):
        save_answer(tmp_path / "b.json", "identity", {"images": 10}, {})
    assert not (tmp_path / "b.json").exists()


def _markdown_outputs(cell) -> list[str]:
    return ["".join(o["data"]["text/markdown"]) for o in cell.get("outputs", []) if "text/markdown" in o.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_each_notebook_answers_in_english_then_korean_with_the_same_numbers(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    shown = _markdown_outputs(cells[-1])
    assert len(shown) == 2, "the last cell shows the English answer, then the Korean one"
    en, ko = shown
    assert en.startswith("## Answer") and re.search(r"[\uac00-\ud7a3]", ko)
    assert numbers(en) == numbers(ko)
    assert re.search(r"[\uac00-\ud7a3]", "".join(cells[0]["source"])), "the question is stated in Korean too"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_each_notebook_shows_its_saved_values_rendered_by_the_current_templates(path):
    """The committed outputs, the saved values and the templates agree: a template edited after the run fails here."""
    last = json.loads(path.read_text(encoding="utf-8"))["cells"][-1]
    question = re.search(r'render\("(\w+)"', "".join(last["source"])).group(1)
    record = load_answer(ROOT / "notebooks" / "answers" / f"{question}.json")
    assert _markdown_outputs(last) == [render(question, record["values"], lang) for lang in LANGS]
