"""export_hub: the folder loads with PEFT and predicts what evaluate_adapter predicted; push is gated."""

import json

import pytest
import yaml

from stages import export_hub
from stages.common.config import params_from_dict
from stages.common.io import read_jsonl
from tests.conftest import copy_outputs


@pytest.fixture(scope="module")
def exported(pipeline_project):
    paths, params, _ = pipeline_project  # export_hub is one of the stages it ran
    return paths, params


def test_folder_holds_adapter_tokenizer_card_and_charts(exported):
    paths, params = exported
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "README.md",
        "scatter.png",
        "loss_curve.png",
    ):
        assert (paths.export / name).is_file(), name
    config = json.loads((paths.export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == params.base_model.hub_id == "test-org/tiny-llama"


def test_model_card_has_metadata_metrics_and_lineage(exported):
    paths, _params = exported
    card = (paths.export / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: test-org/tiny-llama" in front and "library_name: peft" in front
    meta = yaml.safe_load(front)
    (result,) = meta["model-index"][0]["results"]
    evaluation = json.loads(paths.eval_metrics.read_text())
    assert result["metrics"][0]["value"] == round(evaluation["adapter"]["avg_error"], 2)
    assert "fine-tuned adapter" in card and "constant mean price" in card
    data = json.loads(paths.data_metrics.read_text())
    assert data["test"]["sha256"][:16] in card
    assert "scatter.png" in card and "loss_curve.png" in card


def test_exported_adapter_reproduces_evaluation_predictions(exported):
    from peft import PeftModel

    from stages.common.generation import build_prompts, generate, parse_price
    from stages.common.modeling import load_base, load_tokenizer

    paths, params = exported
    test = read_jsonl(paths.split("test"))
    tokenizer = load_tokenizer(paths.export)
    model = PeftModel.from_pretrained(load_base(paths.base_model, params.quantization), paths.export)
    outputs = generate(
        model,
        tokenizer,
        build_prompts(tokenizer, test, params.prompt, params.evaluate.max_new_tokens),
        params.evaluate,
        "export",
    )
    expected = [r["adapter_prediction"] for r in read_jsonl(paths.predictions)]
    assert [parse_price(o) for o in outputs] == expected


def test_push_without_token_fails_before_upload(exported, monkeypatch):
    paths, _ = exported
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(export_hub.StageError, match="HF_TOKEN is not set"):
        export_hub.push(paths.export, "someone/adapter", private=True)
    with pytest.raises(export_hub.StageError, match="repo_id is empty"):
        export_hub.push(paths.export, None, private=True)


def test_push_is_off_by_default():
    assert params_from_dict({}).export.push is False


def test_merged_export_loads_without_peft_and_agrees_with_the_adapter(pipeline_project, tmp_path):
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from stages.common.generation import build_prompts, generate
    from stages.common.modeling import load_tokenizer

    paths, params, _ = pipeline_project
    copy = copy_outputs(paths, tmp_path)
    merged_params = dataclasses.replace(params, export=dataclasses.replace(params.export, merge=True))
    export_hub.run(merged_params, copy)

    check = json.loads((copy.export / "merge_check.json").read_text())
    assert check["identical_predictions"] == check["items"] == params.export.merge_check_items
    assert check["max_logit_difference"] < 1e-3
    model = AutoModelForCausalLM.from_pretrained(copy.export / "merged", dtype=torch.float32)
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = load_tokenizer(copy.export / "merged")
    test = read_jsonl(copy.split("test"))[: check["items"]]
    prompts = build_prompts(tokenizer, test, params.prompt, params.evaluate.max_new_tokens)
    from stages.common.generation import parse_price

    predictions = [parse_price(o) for o in generate(model, tokenizer, prompts, params.evaluate, "merged")]
    assert predictions == check["merged_predictions"] == check["adapter_predictions"]
    assert 'subfolder="merged"' in (copy.export / "README.md").read_text()


def test_disagreeing_merge_fails_before_anything_is_written(pipeline_project, tmp_path, monkeypatch):
    import dataclasses

    paths, params, _ = pipeline_project
    copy = copy_outputs(paths, tmp_path)
    # The tiny model's merged and unmerged answers agree; make every answer "disagree" to take the failure path.
    monkeypatch.setattr(export_hub, "answer_gap", lambda merged, adapter: float("inf"))
    merged_params = dataclasses.replace(params, export=dataclasses.replace(params.export, merge=True))
    with pytest.raises(export_hub.StageError, match="disagree"):
        export_hub.run(merged_params, copy)
    assert not copy.export.exists()
