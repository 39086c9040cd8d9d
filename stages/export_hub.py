"""Stage `export_hub`: package the adapter for the Hugging Face Hub, and push it only when asked.

Writes one folder: the adapter (adapter_config.json names the base by its Hub id, from the base's
source.json, not a local path), the tokenizer, the charts, a model card (README.md named after
`export.repo_id`, or else the registered model, with Hub metadata, how to load it, the metrics table, data
hashes and hyperparameters) and, with `export.merge`, the adapter merged into the unquantized base in
merged/ after checking it against the unmerged model on a few test items. With `export.push: true`
and HF_TOKEN in the environment the folder is uploaded to `export.repo_id` (private by default, or as a
pull request); the token is read from the environment only and is never written anywhere.
Inputs, outputs and params: `SPEC` below.

Run: `python -m stages.export_hub` (or `dvc repro export_hub`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from stages.common.cli import run_stage
from stages.common.config import CHAT, PRICE, Params
from stages.common.errors import StageError
from stages.common.generation import build_prompts, generate, parse_price
from stages.common.io import atomic_path, read_json, read_jsonl
from stages.common.modeling import compute_dtype, device, load_adapter_model, load_tokenizer
from stages.common.paths import Paths
from stages.common.report import comparison_markdown, is_text
from stages.common.spec import StageSpec

CHARTS = (Paths.scatter_chart, Paths.loss_chart)
SPEC = StageSpec(
    "export_hub",
    params=(
        "base_model", "data.source", "prompt", "quantization", "lora", "train", "evaluate", "export",
        "tracking.registered_model",
    ),
    reads=(
        Paths.base_model, Paths.adapter, Paths.predictions, Paths.eval_metrics, Paths.data_metrics,
        Paths.train_metrics, *CHARTS,
    ),
    writes=(Paths.export,),
)  # fmt: skip


@dataclass(frozen=True)
class Result:
    folder: str
    pushed_to: str | None


def copy_adapter(adapter: Path, out: Path, hub_id: str) -> None:
    """Copy adapter and tokenizer files into `out`, naming the base model by its Hub id."""
    shutil.copytree(adapter, out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def last_token_logits(model, tokenizer, prompts: list[str], add_special_tokens: bool = True):
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    batch = batch.to(model.device)
    with torch.inference_mode():
        return model(**batch).logits[:, -1, :].float()


def relative_gap(a: float | None, b: float | None) -> float:
    """|a - b| relative to b; infinite when only one of them parsed."""
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return abs(a - b) / max(abs(b), 1.0)


def answer_gap(merged, adapter) -> float:
    """How far the merged model's answer is from the adapter's: relative for prices, 0 or infinite for text."""
    if isinstance(adapter, str):
        return 0.0 if merged == adapter else float("inf")
    return relative_gap(merged, adapter)


def merge_check_inputs(tokenizer, params: Params, evaluated: list[dict], shape: str):
    """For the merge check: the evaluated prompts, the adapter's evaluated answers (prices, or output text
    for prompt/completion and chat data), how to read an answer from an output, and generation options."""
    if shape == PRICE:
        prompts = build_prompts(tokenizer, evaluated, params.prompt, params.evaluate.max_new_tokens)
        return prompts, [row["adapter_prediction"] for row in evaluated], parse_price, {}
    options = {"stop_at_number": False, "add_special_tokens": shape != CHAT}
    return [row["prompt"] for row in evaluated], [row["adapter_output"] for row in evaluated], str, options


def base_for_merging(paths: Paths, params: Params, quantized_adapter_model):
    """The base to merge into, unquantized in the compute dtype (float32 on CPU, bfloat16 on CUDA).

    `export.merge_into: dequantized` copies in the NF4 weights the adapter was trained against, dequantized
    from `quantized_adapter_model` (the 4-bit base with the adapter, as evaluated), so the merged model is
    the evaluated one; `unquantized` keeps the original weights, which the adapter never saw (on a small
    model this changes its predictions, and the check in `export_merged` then fails).
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(params.quantization.compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(paths.base_model, dtype=dtype, device_map={"": device()})
    if params.export.merge_into == "dequantized":
        linear = dict(base.named_modules())
        for name, module in quantized_adapter_model.get_base_model().named_modules():
            if isinstance(module, bnb.nn.Linear4bit):  # LoRA-wrapped ones sit at "<name>.base_layer"
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                linear[name.removesuffix(".base_layer")].weight.data.copy_(weight.to(dtype))
    return base


def export_merged(paths: Paths, params: Params, out: Path, shape: str = PRICE) -> dict:
    """Merge the adapter into an unquantized base (see `base_for_merging`), check the merged model against
    the adapter as evaluate_adapter scored it on `export.merge_check_items` test items, then save it in `out`.

    Merging into the 4-bit base itself would re-quantize the sum and stay 4-bit, hence the reload. Raises
    StageError with the numbers, before anything is saved, when a price differs beyond merge_tolerance
    (for prompt/completion and chat data: when any greedy output differs).
    """
    from peft import PeftModel

    cfg = params.export
    tokenizer = load_tokenizer(paths.base_model)
    evaluated = read_jsonl(paths.predictions)[: cfg.merge_check_items]
    prompts, adapter, answer, options = merge_check_inputs(tokenizer, params, evaluated, shape)
    special = options.get("add_special_tokens", True)
    evaluated_model = load_adapter_model(paths.base_model, paths.adapter, params.quantization)
    reference_logits = last_token_logits(evaluated_model, tokenizer, prompts, special)
    base = base_for_merging(paths, params, evaluated_model)
    del evaluated_model
    merged_model = PeftModel.from_pretrained(base, paths.adapter).merge_and_unload()
    merged_model.eval()
    outputs = generate(merged_model, tokenizer, prompts, params.evaluate, "merged check", **options)
    merged = [answer(o) for o in outputs]
    check = {
        "merged_into": cfg.merge_into,
        "items": len(prompts),
        "identical_predictions": sum(a == b for a, b in zip(merged, adapter, strict=True)),
        "max_relative_price_difference": max(answer_gap(a, b) for a, b in zip(merged, adapter, strict=True)),
        "max_logit_difference": float(
            (last_token_logits(merged_model, tokenizer, prompts, special) - reference_logits).abs().max()
        ),
        "merged_predictions": merged,
        "adapter_predictions": adapter,
    }
    if check["max_relative_price_difference"] > cfg.merge_tolerance:
        raise StageError(
            f"the merged model ({cfg.merge_into} base) disagrees with the evaluated adapter: {merged} vs "
            f"{adapter} on the first {len(prompts)} test items (largest relative gap "
            f"{check['max_relative_price_difference']:.4f} > export.merge_tolerance={cfg.merge_tolerance}; largest "
            f"next-token logit gap {check['max_logit_difference']:.2e}); nothing was exported"
        )
    merged_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return check


GGUF_FOLDER = "gguf"


def export_gguf(params: Params, folder: Path, shape: str) -> None:
    """`export.gguf` files of the merged model in <folder>/gguf/, with an Ollama Modelfile for the smallest:
    the prompt template for prices and prompt/completion data (the description or prompt is the message),
    greedy decoding and the end-of-sequence stop; for chat data Ollama reads the GGUF's chat template."""
    from transformers import AutoTokenizer

    from serving.gguf import modelfile, write_gguf

    out = folder / GGUF_FOLDER
    out.mkdir()
    name = (params.export.repo_id or params.tracking.registered_model).split("/")[-1]
    for kind in params.export.gguf:
        write_gguf(folder / "merged", out / f"model-{kind}.gguf", kind, name)
        print(f"GGUF ({kind}): {(out / f'model-{kind}.gguf').stat().st_size / 1e6:,.1f} MB")
    smallest = "q8_0" if "q8_0" in params.export.gguf else params.export.gguf[0]
    template = params.prompt.template if shape == PRICE else None if shape == CHAT else "{text}"
    stop = AutoTokenizer.from_pretrained(folder / "merged").eos_token
    text = modelfile(f"model-{smallest}.gguf", template, params.evaluate.max_new_tokens, stop)
    (out / "Modelfile").write_text(text, encoding="utf-8")


def gguf_section() -> str:
    """The card's lines on the GGUF files, when there are any (export.gguf)."""
    return """
`gguf/` holds the merged model as GGUF for llama.cpp and Ollama (`gguf/Modelfile` carries the prompt):
`ollama create pricer -f gguf/Modelfile`, then `ollama run pricer "<a description>"`.
"""


def merged_section(name: str, check: dict | None, gguf: bool = False) -> str:
    """The card's paragraph on the merged model, with the agreement measured before export (and the GGUF
    files, when `gguf`)."""
    if check is None:
        return ""
    return f"""
The adapter merged into the unquantized base is in `merged/` and loads without PEFT:

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{name}", subfolder="merged")
```

It was merged into the {check["merged_into"]} base. Before export it predicted the same price as the
evaluated adapter on {check["identical_predictions"]} of {check["items"]} test items (largest next-token
logit difference {check["max_logit_difference"]:.2e}).
{gguf_section() if gguf else ""}"""


def front_matter(params: Params, hub_id: str, evaluation: dict, name: str) -> str:
    """The card's YAML metadata as the Hub reads it: base model, library, license, tags, and the test
    metrics in model-index form."""
    import yaml

    adapter = evaluation["adapter"]
    if is_text(evaluation):
        task, tags = "Text generation", ["qlora", "lora", "peft", evaluation["shape"].replace("_", "-")]
        metrics = [
            {"type": "loss", "name": "test loss per completion token", "value": round(adapter["loss"], 4)},
            {"type": "perplexity", "name": "perplexity", "value": round(adapter["perplexity"], 3)},
            {"type": "exact_match", "name": "exact match", "value": round(adapter["exact_match"], 4)},
        ]
    else:
        task, tags = "Price prediction", ["qlora", "lora", "peft", "price-prediction"]
        metrics = [
            {"type": "mae", "name": "average absolute error ($)", "value": round(adapter["avg_error"], 2)},
            {"type": "rmsle", "name": "RMSLE", "value": round(adapter["rmsle"], 4)},
            {"type": "accuracy", "name": "hit rate (within $40 or 20%)", "value": round(adapter["hit_rate"], 4)},
        ]
    result = {
        "task": {"type": "text-generation", "name": task},
        "dataset": {"type": params.data.source, "name": params.data.source, "split": "test"},
        "metrics": metrics,
    }
    meta = {
        "base_model": hub_id,
        "library_name": "peft",
        "license": params.base_model.license,
        "pipeline_tag": "text-generation",
        "tags": tags,
        "model-index": [{"name": name.split("/")[-1], "results": [result]}],
    }
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


TASK_TEXT = {
    "price": (
        "a QLoRA price predictor",
        "to complete a product description prompt with its price. Prompt (the description goes in `{text}`):",
    ),
    "prompt_completion": (
        "a QLoRA adapter",
        "on prompt/completion pairs: the prompt is given as it is and the loss covered the completion only.",
    ),
    "chat": (
        "a QLoRA chat adapter",
        "on conversations rendered with the base model's chat template; the loss covered the assistant turns only.",
    ),
}
EVALUATION_NOTE = {
    True: (
        "Test loss is the mean cross-entropy per completion (assistant) token, as in training; perplexity is "
        "exp(loss); exact match compares the greedy output with the reference completion, whitespace stripped."
    ),
    False: "An item is a hit when the prediction is within $40 or 20% of the true price. RMSLE uses log(x+1).",
}
LIMITS = {
    True: "The adapter knows only the kind of tasks in its training data; outside them its answers are guesses.",
    False: (
        "The adapter knows only the price range and kinds of products in its training data; outside them its\n"
        "numbers are guesses."
    ),
}


def model_card(
    params: Params, hub_id: str, evaluation: dict, data: dict, training: dict, merge_check: dict | None = None
) -> str:
    """The README.md of the exported folder: Hub metadata, usage, metrics, lineage, hyperparameters, limits.

    Its wording and metrics follow the data's shape: prices for the price task, loss, perplexity and exact
    match for prompt/completion and chat data.
    """
    lora, train, repo_id = params.lora, params.train, params.export.repo_id
    name = repo_id or params.tracking.registered_model
    load_from = repo_id or "export"  # without a Hub repo: the exported folder in the project
    text = is_text(evaluation)
    title, purpose = TASK_TEXT[evaluation.get("shape", "price")]
    prompt_block = "" if text else f"\n```\n{params.prompt.template}\n```\n"
    chart = "test loss per item, base against adapter" if text else "truth against prediction"
    hashes = "\n".join(
        f"| {split} | {data[split]['n']} | `{data[split]['sha256'][:16]}` |" for split in ("train", "val", "test")
    )
    return f"""{front_matter(params, hub_id, evaluation, name)}
# {name.split("/")[-1]}: {title} on {hub_id}

LoRA adapter trained on `{hub_id}` loaded in 4-bit NF4 (QLoRA) {purpose}
{prompt_block}
## How to load it

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{load_from}")
tokenizer = AutoTokenizer.from_pretrained("{load_from}")
```
{merged_section(load_from, merge_check, bool(params.export.gguf))}
## Evaluation on the held-out test set ({evaluation["adapter"]["n"]} items)

{comparison_markdown(evaluation)}

{EVALUATION_NOTE[text]}

![{chart}](scatter.png)

## Training

| setting | value |
|---|---|
| LoRA r / alpha / dropout | {lora.r} / {lora.alpha} / {lora.dropout} |
| target modules | {", ".join(lora.target_modules)} |
| quantization | 4-bit {params.quantization.quant_type}, double quantization {params.quantization.double_quant} |
| epochs / max steps | {train.epochs} / {train.max_steps} |
| batch size x accumulation | {train.batch_size} x {train.grad_accum} |
| learning rate / schedule / warmup | {train.learning_rate} / {train.lr_scheduler} / {train.warmup_ratio} |
| optimizer steps / tokens seen | {training.get("steps")} / {training.get("tokens_seen")} |
| final train / validation loss | {training.get("train_loss") or 0:.4f} / {training.get("val_loss") or 0:.4f} |
| trainable parameters | {training.get("trainable_parameters"):,} |

![loss curve](loss_curve.png)

## Data

Source: `{params.data.source}`; {data["rows_in"]} rows in, {data["rows_kept"]} kept after cleaning and
deduplication. Each split's sha256 (of its JSONL file):

| split | rows | sha256 (first 16) |
|---|---:|---|
{hashes}

## Limits

{LIMITS[text]} It was trained for {training.get("steps")} steps and is a pipeline demonstration first.
"""


WHOAMI_TIMEOUT_S = 30  # huggingface_hub's HTTP client has no timeout: a silent Hub would hang the stage


def hub_user(api) -> str:
    """The account HF_TOKEN belongs to; StageError when the Hub refuses the token, fails or stays silent."""
    answer: dict = {}

    def ask() -> None:
        try:
            answer["name"] = api.whoami()["name"]
        except Exception as exc:  # reported below without the token
            answer["error"] = exc

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(WHOAMI_TIMEOUT_S)
    if thread.is_alive():
        raise StageError(f"the Hub at {api.endpoint} did not answer within {WHOAMI_TIMEOUT_S} s; nothing was uploaded")
    error = answer.get("error")
    if error is not None:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            raise StageError("the Hub refused HF_TOKEN (401 Unauthorized); nothing was uploaded")
        raise StageError(
            f"cannot reach the Hub at {api.endpoint} ({error.__class__.__name__}); nothing was uploaded"
        ) from error
    return answer["name"]


def push(folder: Path, repo_id: str | None, private: bool, create_pr: bool = False) -> str:
    """Upload `folder` to the Hub repo `repo_id` with the token in HF_TOKEN; return the repo or PR URL.

    What can fail early fails before any file is sent: no repo id, no token, a Hub that is unreachable,
    silent or refuses the token, and a repo that exists and is public when `private` is asked for.
    HF_ENDPOINT, read at call time, points at another Hub (or a local stand-in). With `create_pr` the
    files go to a pull request instead of the main branch. A repo created just before a failed upload
    stays (empty).
    """
    token = os.environ.get("HF_TOKEN")
    if not repo_id:
        raise StageError("export.push is true but export.repo_id is empty; set it to owner/name")
    if not token:
        raise StageError("export.push is true but HF_TOKEN is not set in the environment; nothing was uploaded")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    user = hub_user(api)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise StageError(
                f"{repo_id} already exists and is public, but export.private is true; nothing was uploaded "
                "(set export.private: false to publish to it)"
            )
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, create_pr=create_pr, commit_message="Upload QLoRA adapter"
        )
    except StageError:
        raise
    except Exception as exc:  # network and permission errors; never echo the token
        raise StageError(f"upload to {repo_id} as {user} failed: {exc.__class__.__name__}: {exc}") from exc
    return getattr(commit, "pr_url", None) or f"{api.endpoint}/{repo_id}"


def run(params: Params, paths: Paths) -> Result:
    """Build export/ atomically from the adapter, metrics and charts; push it when params ask."""
    if not (paths.adapter / "adapter_config.json").is_file():
        raise StageError(f"{paths.adapter}: no adapter found; run train_qlora first")
    evaluation, data = read_json(paths.eval_metrics), read_json(paths.data_metrics)
    training = read_json(paths.train_metrics)
    hub_id = read_json(paths.base_model / "source.json")["hub_id"]
    with atomic_path(paths.export) as tmp:
        copy_adapter(paths.adapter, tmp, hub_id)
        for chart in CHARTS:
            source = chart.at(paths)
            if source.is_file():
                shutil.copy2(source, tmp / source.name)
        shape = evaluation.get("shape", PRICE)
        merge_check = export_merged(paths, params, tmp / "merged", shape) if params.export.merge else None
        if merge_check:
            (tmp / "merge_check.json").write_text(json.dumps(merge_check, indent=2) + "\n", encoding="utf-8")
            print(
                f"merged model: {merge_check['identical_predictions']}/{merge_check['items']} identical "
                f"predictions, max logit difference {merge_check['max_logit_difference']:.2e}"
            )
        if params.export.gguf:
            export_gguf(params, tmp, shape)
        card = model_card(params, hub_id, evaluation, data, training, merge_check)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    cfg = params.export
    pushed = push(paths.export, cfg.repo_id, cfg.private, cfg.create_pr) if cfg.push else None
    print(f"exported to {paths.export}" + (f" and pushed to {pushed}" if pushed else " (export.push is off)"))
    return Result(folder=str(paths.export), pushed_to=pushed)


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
