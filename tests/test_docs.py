"""docs/configuration.md is generated from the config models and must be up to date."""

from __future__ import annotations

from catena_mito import config
from catena_mito.docs import DEFAULT_PATH, JOBS, format_type, main, render


def test_configuration_md_is_up_to_date():
    assert DEFAULT_PATH.exists(), "run: python -m catena_mito.docs"
    assert DEFAULT_PATH.read_text() == render(), "docs/configuration.md is stale; run: python -m catena_mito.docs"
    assert main(["--check"]) == 0


def test_every_field_is_documented():
    text = render()
    for _, cls, _ in JOBS:
        for name, *_ in config.field_docs(cls):
            assert f"| `{name}` |" in text
            assert cls.model_fields[name].description, f"{cls.__name__}.{name} has no description"


def test_format_type():
    assert format_type(config.PositiveTriple) == "(int > 0, int > 0, int > 0)"
    assert format_type(config.LabelType) == "`'mito'` or `'neuron'`"
    assert format_type(int | None) == "int or null"


def test_check_reports_stale(tmp_path):
    stale = tmp_path / "c.md"
    stale.write_text("old")
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0
    assert main(["--check", "--out", str(stale)]) == 0
