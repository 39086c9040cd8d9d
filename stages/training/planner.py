"""What a QLoRA run will cost, from the base model's config alone (no weights are read or downloaded).

`plan(params, paths)` builds the model on PyTorch's meta device (shapes, no memory) and returns
trainable LoRA parameters per target module and in total, adapter size (fp32 and bf16), base weight
memory in 4-bit NF4 and in 16-bit, and training FLOPs per token; `plan_text` formats it.
The config comes from, in order: `base_model.source` when it is a local folder; models/base/config.json
when the base_model stage has run; the embedded GGUF's metadata (slower: transformers parses the whole file);
the Hub's config.json for a Hub id (HF_TOKEN for gated models).

Run: `python -m stages.train_qlora --plan` (or `make plan`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.config import Params
from stages.common.embedded import EMBEDDED_SMOLLM2, embedded_gguf_path
from stages.common.errors import StageError
from stages.common.paths import Paths

NF4_BITS = 4
BLOCK = 64  # bitsandbytes 4-bit block size: one absmax constant per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantization: the absmax constants in 8 bits, one fp32 constant per 256


@dataclass
class TargetModule:
    name: str
    layers: int = 0
    in_features: int = 0
    out_features: int = 0
    parameters: int = 0  # LoRA A and B over all layers: r * (in + out) each


@dataclass
class Plan:
    source: str
    config_from: str
    rank: int
    targets: list[TargetModule] = field(default_factory=list)
    trainable: int = 0
    base_parameters: int = 0
    nf4_bytes: float = 0.0
    bf16_bytes: float = 0.0
    flops_per_token: float = 0.0
    context: int = 0
    matmul_weights: int = 0  # weights of every linear layer, lm_head included: each token multiplies them all
    layers: int = 0
    attention_width: int = 0  # heads x head dimension

    def training_flops_per_token(self, context: int) -> float:
        """FLOPs to train on one token with the base frozen, ~ 4 N + 12 L d T: each weight costs 2 in the forward
        pass and 2 more in the backward pass for the activation gradient, and only LoRA weights need weight
        gradients (2 more each); attention over `context` tokens costs 4 L T d forward (scores and mix) and
        twice that backward (gradients for both operands of each product)."""
        attention_forward = 4 * self.layers * context * self.attention_width
        return 4 * (self.matmul_weights + self.trainable) + 2 * self.trainable + 3 * attention_forward


def nf4_bits_per_weight(double_quant: bool) -> float:
    """Bits per quantized weight including the block constants: 4.5 plain, ~4.127 with double quantization."""
    if double_quant:
        return NF4_BITS + 8 / BLOCK + 32 / (BLOCK * DOUBLE_QUANT_BLOCK)
    return NF4_BITS + 32 / BLOCK


def hub_config_file(repo_id: str, revision: str) -> Path:
    """The config.json of a Hub model (or its copy in the local HF cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, token=os.environ.get("HF_TOKEN")))
    except LocalEntryNotFoundError as exc:
        raise StageError(
            f"base_model.source={repo_id!r}: config.json is not in the local Hugging Face cache and the Hub "
            "cannot be reached; run base_model first or point base_model.source at a folder with config.json"
        ) from exc
    except HfHubHTTPError as exc:
        refused = exc.__class__.__name__
        raise StageError(f"base_model.source={repo_id!r}: the Hub refused config.json ({refused})") from exc


def built_from(base: Path) -> str | None:
    """The `base_model.source` that models/base was built from (its source.json), if known."""
    record = base / "source.json"
    return json.loads(record.read_text(encoding="utf-8")).get("source") if record.is_file() else None


def load_config(params: Params, paths: Paths):
    """(transformers config, where it was read) for `base_model.source`, without any weights."""
    from transformers import AutoConfig

    source = params.base_model.source
    local = paths.root / Path(source).expanduser()
    if source != EMBEDDED_SMOLLM2 and local.is_dir():
        return AutoConfig.from_pretrained(local), str(local / "config.json")
    saved = paths.base_model / "config.json"
    if saved.is_file() and built_from(paths.base_model) == source:
        return AutoConfig.from_pretrained(paths.base_model), str(saved)
    if source == EMBEDDED_SMOLLM2:
        gguf = embedded_gguf_path()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name), f"GGUF metadata of {gguf}"
    config_file = hub_config_file(source, params.base_model.revision)
    return AutoConfig.from_pretrained(config_file.parent), f"{source}@{params.base_model.revision} config.json"


def meta_model(config):
    """The model for `config` on the meta device: every shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan(params: Params, paths: Paths) -> Plan:
    """Count LoRA parameters, adapter size, base memory and training FLOPs for the configured run."""
    from torch import nn

    config, config_from = load_config(params, paths)
    model = meta_model(config)
    lora, wanted = params.lora, set(params.lora.target_modules)
    result = Plan(source=params.base_model.source, config_from=config_from, rank=lora.r)
    targets = {name: TargetModule(name) for name in lora.target_modules}
    matmul_weights = quantized = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        matmul_weights += module.in_features * module.out_features
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "lm_head":  # bitsandbytes keeps the output layer in 16-bit
            quantized += module.in_features * module.out_features
        if leaf in wanted:
            target = targets[leaf]
            target.layers += 1
            target.in_features, target.out_features = module.in_features, module.out_features
            target.parameters += lora.r * (module.in_features + module.out_features)
    missing = sorted(n for n, t in targets.items() if t.layers == 0)
    if missing:
        raise StageError(f"lora.target_modules: {missing} not found among the linear layers of {result.source}")
    result.targets = list(targets.values())
    result.trainable = sum(t.parameters for t in result.targets)
    result.base_parameters = sum(p.numel() for p in model.parameters())
    result.bf16_bytes = 2.0 * result.base_parameters
    bits = nf4_bits_per_weight(params.quantization.double_quant)
    result.nf4_bytes = quantized * bits / 8 + 2.0 * (result.base_parameters - quantized)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    result.matmul_weights, result.layers = matmul_weights, config.num_hidden_layers
    result.attention_width = config.num_attention_heads * head_dim
    result.context = params.prompt.max_length
    result.flops_per_token = result.training_flops_per_token(result.context)
    return result


def size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:,.1f} MB"


def plan_text(p: Plan) -> str:
    """The plan as the console shows it."""
    lines = [
        f"QLoRA plan for {p.source} (config from {p.config_from}; no weights loaded)",
        f"LoRA r={p.rank} on {', '.join(t.name for t in p.targets)}",
        f"{'module':<12} {'layers':>6} {'in -> out':>15} {'per layer':>12} {'parameters':>14}",
    ]
    for t in p.targets:
        shape = f"{t.in_features} -> {t.out_features}"
        lines.append(f"{t.name:<12} {t.layers:>6} {shape:>15} {t.parameters // t.layers:>12,} {t.parameters:>14,}")
    share = p.trainable / p.base_parameters if p.base_parameters else 0.0
    lines += [
        f"trainable parameters: {p.trainable:,} ({share:.2%} of the base's {p.base_parameters:,})",
        f"adapter size: {p.trainable * 4 / 1e6:,.1f} MB in fp32, {p.trainable * 2 / 1e6:,.1f} MB in bf16",
        f"base weights: {size(p.nf4_bytes)} in 4-bit NF4 (embeddings, norms and lm_head in 16-bit), "
        f"{size(p.bf16_bytes)} in 16-bit",
        f"training FLOPs per token: {p.flops_per_token:.3g} (at {p.context} tokens of context, base frozen)",
    ]
    return "\n".join(lines)
