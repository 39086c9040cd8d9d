"""Params override files: a YAML file with some keys of params.yaml's sections (configs/llama-3.1-8b.yaml is
the course's GPU run), checked against the declared params, planned with, or written into params.yaml.

`params_with(params_file, override_file)` is the validated result without writing anything;
`apply(params_file, override_file)` writes the new values into params.yaml in place, changing only the
lines of the keys it sets (DVC reads params.yaml alone, so that is where a run's values must be for `dvc repro`
to see them).

Run: `qlora-pipeline params apply configs/llama-3.1-8b.yaml`, `qlora-pipeline plan --with FILE`.
"""

from __future__ import annotations

from pathlib import Path

from stages.common.config import Params, params_from_dict, read_yaml
from stages.common.errors import ConfigError
from stages.common.io import atomic_path


def read_overrides(path: Path) -> dict[str, dict]:
    """{section: {key: value}} of an override file; ConfigError naming the file and the entry that is not so."""
    raw = read_yaml(path, "override file not found")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections of params.yaml (section: {{key: value}}), got {raw!r}")
    for section, values in raw.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{path}: section {section!r} must map keys to values (e.g. train: {{epochs: 1}})")
    return raw


def merged(base: dict, overrides: dict[str, dict]) -> dict:
    """params.yaml's mapping with each overridden key replaced (other keys and sections as they were)."""
    out = {section: dict(values or {}) for section, values in base.items()}
    for section, values in overrides.items():
        out.setdefault(section, {}).update(values)
    return out


def params_with(params_file: Path, override_file: Path) -> Params:
    """The params params.yaml would hold once the override file is applied, validated; nothing is written."""
    base = read_yaml(params_file)
    overrides = read_overrides(override_file)
    try:
        return params_from_dict(merged(base, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{params_file} with {override_file}: {exc}") from exc


def round_trip_editor():
    """ruamel.yaml in round-trip mode, set so that a dump changes no line it was not asked to: comments, order,
    quotes and the spelling of numbers survive, null stays `null`, and long lines are not re-wrapped."""
    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    editor.width = 4096
    editor.indent(mapping=2, sequence=4, offset=2)  # params.yaml's block lists: "    - item"
    editor.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return editor


def apply(params_file: Path, override_file: Path) -> list[str]:
    """Write the override file's values into params.yaml (comments, order and every other line kept) once the
    result is valid; return the "section.key" names whose value changed. A bad file leaves params.yaml as it was."""
    params_with(params_file, override_file)  # the file's form and the whole result validate before any write
    editor = round_trip_editor()
    document = editor.load(Path(params_file).read_text(encoding="utf-8"))
    overrides = editor.load(Path(override_file).read_text(encoding="utf-8"))  # values as the file spells them
    changed = []
    for section, values in overrides.items():
        if document.get(section) is None:
            document[section] = {}
        for key, value in values.items():
            if document[section].get(key) != value or key not in document[section]:
                document[section][key] = value
                changed.append(f"{section}.{key}")
    with atomic_path(Path(params_file)) as tmp, tmp.open("w", encoding="utf-8") as out:
        editor.dump(document, out)
    return changed
