from pathlib import Path

import pytest

from stages.core.config import ConfigError, load_params, params_from_dict

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
