from pathlib import Path

import pytest

from stages.common.config import load_params, params_from_dict
from stages.common.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_repository_params_load_with_course_defaults():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.lora.r == 32 and params.lora.alpha == 64 and params.lora.dropout == 0.1
    assert params.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert params.prompt.template.endswith("Price is $") and "{text}" in params.prompt.template
    assert params.quantization.quant_type == "nf4" and params.quantization.double_quant


def test_empty_file_takes_defaults(tmp_path):
    (tmp_path / "params.yaml").write_text("", encoding="utf-8")
    assert load_params(tmp_path / "params.yaml").train.batch_size == 4


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"'train'.*learning_rte"):
        params_from_dict({"train": {"learning_rte": 0.1}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="trian"):
        params_from_dict({"trian": {}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got 'four'"):
        params_from_dict({"train": {"batch_size": "four"}})
    with pytest.raises(ConfigError, match=r"lora\.target_modules"):
        params_from_dict({"lora": {"target_modules": "q_proj"}})


def test_float_written_as_string_by_yaml_1_1_is_accepted():
    assert params_from_dict({"train": {"learning_rate": "2e-4"}}).train.learning_rate == pytest.approx(2e-4)


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(bad)):
        load_params(bad)


def test_params_yaml_holds_exactly_the_declared_defaults():
    """params.yaml and the dataclasses state the same defaults, key for key: a section left out of a user's
    params.yaml takes what the repository's file says."""
    import dataclasses

    import yaml

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = params_from_dict({})
    assert list(raw) == [f.name for f in dataclasses.fields(defaults)]
    for section in dataclasses.fields(defaults):
        declared = dataclasses.asdict(getattr(defaults, section.name))
        assert list(raw[section.name]) == list(declared), f"params.yaml section {section.name}: keys differ"
        for key, value in declared.items():
            written = raw[section.name][key]
            assert written == value, f"{section.name}.{key}: params.yaml says {written!r}, config.py {value!r}"


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("data", {"shape": "regression"}, r"data\.shape: expected one of \['price'"),
        ("data", {"n_train": 0}, r"data\.n_train: expected -1 or a number of at least 1"),
        ("data", {"max_price": 0.001}, r"data\.max_price"),
        ("prompt", {"template": "no slot here"}, r"prompt\.template: .*\{text\}"),
        ("prompt", {"completion": "{cost}"}, r"prompt\.completion"),
        ("quantization", {"quant_type": "nf5"}, r"quantization\.quant_type: expected one of \['nf4', 'fp4'\]"),
        ("quantization", {"compute_dtype": "fp8"}, r"quantization\.compute_dtype"),
        ("lora", {"dropout": 1.0}, r"lora\.dropout"),
        ("lora", {"target_modules": []}, r"lora\.target_modules: expected a non-empty list"),
        ("train", {"optimizer": "sgd"}, r"train\.optimizer: expected one of"),
        ("train", {"lr_scheduler": "cosine_restarts"}, r"train\.lr_scheduler"),
        ("train", {"learning_rate": 0}, r"train\.learning_rate: expected a number above 0"),
        ("train", {"grad_accum": 0}, r"train\.grad_accum"),
        ("train", {"early_stopping_patience": 2, "eval_steps": 5, "save_steps": 7}, r"train\.save_steps: .*multiple"),
        ("train", {"launcher": "slurm"}, r"train\.launcher"),
        ("evaluate", {"batch_size": 0}, r"evaluate\.batch_size: expected a number of at least 1"),
        ("export", {"merge_into": "dequantised"}, r"export\.merge_into: expected one of \['dequantized'"),
        ("export", {"push": True}, r"export\.repo_id"),
        ("flow", {"remote": "s3://bucket/x"}, r"flow\.remote"),
    ],
)
def test_every_choice_and_range_is_checked_at_load_naming_the_key(section, values, named):
    with pytest.raises(ConfigError, match=named):
        params_from_dict({section: values})


def test_a_stage_reading_an_undeclared_section_or_key_fails_naming_it():
    params = params_from_dict({}).only(("train", "tracking.registered_model"), "export_hub")
    assert params.train.batch_size == 4 and params.tracking.registered_model == "qlora-price-adapter"
    with pytest.raises(ConfigError, match=r"export_hub read params data\.source without declaring it"):
        _ = params.data.source
    with pytest.raises(ConfigError, match=r"tracking\.experiment"):
        _ = params.tracking.experiment
