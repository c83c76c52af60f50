"""The notebooks' answers, in English and Korean, rendered from one dictionary of measured values.

Each answer is a pair of Markdown templates, `templates/<question>.en.md` and `<question>.ko.md`,
with the same `{name:spec}` fields. A spec is a format spec (`.3f`, `+.2f`, `.0%`) or a choice
`?text if true|text if false` for a boolean verdict, so a sentence such as "holds" follows the
measurement in both languages. A notebook computes the values once, renders both languages from
them, and saves them (`save_answer`) for `layer-probe report --lang`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path

from .checkpoint import checkpoints_dir, repository_root
from .errors import LayerProbeError
from .files import sha256, write_text

LANGS = ("en", "ko")
QUESTIONS = {"fig7": "01 Fig. 7 from the five networks", "small_std": "02 Why a small std means F(x) near zero",
             "rise": "03 Why the std rises in the last layers", "identity": "04 The identity construction"}


class _Formatter(string.Formatter):
    def get_value(self, key, args, kwargs):  # noqa: ANN001, ANN201 - string.Formatter's signature
        if key not in kwargs:
            raise LayerProbeError(f"the answer needs the value {key!r}, which was not measured")
        return kwargs[key]

    def format_field(self, value, spec: str) -> str:  # noqa: ANN001 - any formattable value
        if spec.startswith("?"):
            if not isinstance(value, bool):
                raise LayerProbeError(f"a choice field needs a boolean, got {value!r}")
            yes, _, no = spec[1:].partition("|")
            return yes if value else no
        return super().format_field(value, spec)


def template(question: str, lang: str) -> str:
    """The answer template of one question (one of QUESTIONS) in one language (one of LANGS)."""
    if question not in QUESTIONS or lang not in LANGS:
        raise LayerProbeError(f"no answer for {question!r} in {lang!r}: questions {', '.join(QUESTIONS)}; "
                              f"languages {', '.join(LANGS)}")
    return files("layer_probe").joinpath("templates", f"{question}.{lang}.md").read_text(encoding="utf-8")


def fields(text: str) -> set[str]:
    """The names of the values a template uses, those inside a choice's text included."""
    return {found for _, name, spec, _ in string.Formatter().parse(text) if name
            for found in {name} | fields(spec or "")}


def plain(values: Mapping[str, object]) -> dict[str, object]:
    """`values` with numpy scalars made Python's (bool, int, float), as JSON and the choice fields need."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}


def render(question: str, values: Mapping[str, object], lang: str = "en") -> str:
    """The answer to `question` in `lang`, with every number and verdict taken from `values`."""
    return _Formatter().format(template(question, lang), **plain(values))


def provenance(data, checkpoints: Sequence[str | Path]) -> dict[str, object]:  # noqa: ANN001 - data.ImageSet
    """What an answer's values were measured on: the test data (file name, sha256) and each checkpoint's sha256,
    by its path below `checkpoints/` (the number of images is one of the values)."""
    root = checkpoints_dir().resolve()
    return {"data": Path(data.source).name, "data_sha256": data.sha256,
            "checkpoints": {Path(p).resolve().relative_to(root).as_posix(): sha256(Path(p)) for p in checkpoints}}


def changed_checkpoints(record: Mapping) -> list[str]:
    """The checkpoints behind a saved answer that are missing or differ from the ones it was measured on."""
    root = checkpoints_dir()
    return [name for name, digest in record["provenance"].get("checkpoints", {}).items()
            if not (root / name).exists() or sha256(root / name) != digest]


def save_answer(path: str | Path, question: str, values: Mapping[str, object],
                provenance: Mapping[str, object]) -> Path:
    """Write the values behind one answer, with what they were measured on, as JSON."""
    record = {"question": question, "provenance": dict(provenance), "values": plain(values)}
    render(question, values)  # refuse to save values the template cannot use
    write_text(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return Path(path)


def load_answer(path: str | Path) -> dict:
    """A record written by `save_answer`."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        return {"question": record["question"], "provenance": record["provenance"], "values": record["values"]}
    except (OSError, ValueError, KeyError) as e:
        raise LayerProbeError(f"cannot read the answer values in {path}: {e}") from None


def answers_dir() -> Path:
    """Where the notebooks save their answers' values: `notebooks/answers/` of the repository."""
    return (repository_root() or Path.cwd()) / "notebooks" / "answers"


def stored_answers(langs: Sequence[str], folder: str | Path | None = None) -> str:
    """The notebooks' saved answers, each in every language of `langs`, as Markdown. An answer that is missing,
    or whose checkpoints changed since it was measured, is left out with one line saying so."""
    folder = Path(folder) if folder else answers_dir()
    parts = ["# The notebooks' answers"]
    for question, title in QUESTIONS.items():
        parts.append(f"## Notebook {title}")
        path = folder / f"{question}.json"
        if not path.exists():
            parts.append(f"*Left out: no saved values in {path} (run the notebooks with `make notebooks`).*")
            continue
        record = load_answer(path)
        if changed := changed_checkpoints(record):
            parts.append(f"*Left out: measured on other versions of {', '.join(changed)}; rerun the notebook.*")
            continue
        source = record["provenance"]
        parts.append(f"*Values saved by the notebook's run on {record['values']['images']:,} test images of "
                     f"{source.get('data')} (sha256 {str(source.get('data_sha256'))[:12]}).*")
        parts += ["#" + render(question, record["values"], lang) for lang in langs]  # "## Answer" one level down
    return "\n\n".join(parts) + "\n"
