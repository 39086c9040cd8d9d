"""What a QLoRA run will cost, from the base model's config alone (no weights are read or downloaded).

`plan(params, paths)` builds the model on PyTorch's meta device (shapes, no memory) and returns
trainable LoRA parameters per target module and in total, adapter size (fp32 and bf16), base weight
memory in 4-bit NF4 and in 16-bit, training FLOPs per token, and an estimate of the peak memory of a
training step for the configured batch (`Plan.peak_memory` gives the formula); `plan_text` formats it.
`plan_for_config(config, params)` does the same from a transformers config object, with no paths (the
memory benchmark plans its randomly initialised 1B model this way).
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
FP32 = 4  # bytes: prepare_model_for_kbit_training casts every parameter that is not 4-bit to float32, so the
# embeddings, norms, lm_head, hidden states and every saved activation are float32 in training
ADAM_STATE_PER_PARAMETER = 2  # AdamW's two moments (exp_avg, exp_avg_sq), float32 like the adapter
LOSS_COPIES = 3  # logits, log-softmax's output (saved for the backward pass) and the logits' gradient
# Resident memory of a training process before any weight is read: Python, torch, transformers, peft, bitsandbytes
# and datasets imported. It is the same in both modes, does not grow with the model, and is most of a 135M model's
# peak. bench/memory.py measures it as `rss_after_imports_mb` (figure, machine and date in docs/performance.md);
# this is that measurement, rounded.
RUNTIME_OVERHEAD_BYTES = 515 * 2**20


@dataclass
class TargetModule:
    name: str
    layers: int = 0
    in_features: int = 0
    out_features: int = 0
    parameters: int = 0  # LoRA A and B over all layers: r * (in + out) each


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident memory of one training step, in bytes, by what holds it (`Plan.peak_memory` says how each
    part is computed)."""

    quantized: bool
    rows: int
    length: int
    scored_positions: int
    checkpointing: bool
    base_weights: float
    adapter_state: float  # the adapter, its gradients and AdamW's two moments
    activations: float
    logits: float
    dequantized_weight: float
    runtime: float = RUNTIME_OVERHEAD_BYTES

    def parts(self) -> dict[str, float]:
        """{part: bytes} of the estimate, the parts that `total` adds up."""
        names = ("base_weights", "adapter_state", "activations", "logits", "dequantized_weight", "runtime")
        return {name: float(getattr(self, name)) for name in names}

    @property
    def total(self) -> float:
        return sum(self.parts().values())


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
    # What the memory estimate needs from the config and params:
    hidden: int = 0
    heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    quantized_weights: int = 0  # weights of the linear layers bitsandbytes quantizes (all but lm_head)
    largest_quantized_weight: int = 0
    nf4_bits: float = 0.0
    lora_dropout: bool = True
    dropout_mask_bytes: int = FP32  # on the CPU torch keeps dropout's mask in float32; on CUDA a 1-byte bool
    memory: MemoryEstimate | None = None  # for the configured run

    def training_flops_per_token(self, context: int) -> float:
        """FLOPs to train on one token with the base frozen, ~ 4 N + 12 L d T: each weight costs 2 in the forward
        pass and 2 more in the backward pass for the activation gradient, and only LoRA weights need weight
        gradients (2 more each); attention over `context` tokens costs 4 L T d forward (scores and mix) and
        twice that backward (gradients for both operands of each product)."""
        attention_forward = 4 * self.layers * context * self.attention_width
        return 4 * (self.matmul_weights + self.trainable) + 2 * self.trainable + 3 * attention_forward

    def peak_memory(
        self, *, quantized: bool, checkpointing: bool, rows: int, length: int, scored_positions: int | None = None
    ) -> MemoryEstimate:
        """Peak memory of a training step on `rows` rows of `length` tokens (n = rows x length), in bytes:

            runtime + base weights + 16 P + activations + logits + dequantized weight

        - runtime: RUNTIME_OVERHEAD_BYTES, the resident memory after the imports.
        - base weights: QLoRA (`quantized`): the quantized linear layers at NF4's bits per weight (block constants
          included) and every other parameter (embeddings, norms, lm_head) at 4 bytes; LoRA: every parameter at 4
          bytes. peft's prepare_model_for_kbit_training casts whatever is not 4-bit to float32, even when it was
          loaded in 16-bit.
        - 16 P for P trainable parameters: the adapter, its gradients and AdamW's two moments, all float32.
        - activations: what autograd saves in each Llama block with the base frozen (the frozen linear layers save
          nothing; LoRA saves its inputs), all float32, per token:
            a = 4 [2 (d + 1) + 4 h + H + T + 3 I] + sum over adapted modules of (4 (k + r) + m k)
          with d the hidden size, h heads x head dimension, H heads, I the MLP width, T = `length`, and k the adapted
          module's input width: each RMSNorm's input and inverse root; the query, key and value (repeated to every
          query head when the batch is padded) and the attention output that SDPA keeps, its logsumexp, and one row
          of its float attention mask; the MLP's gate, SiLU(gate) and up; for each LoRA module its dropout's mask
          (m bytes an element), dropout's output (lora_A's input, k) and lora_A's output (r). Without dropout LoRA
          keeps only its input (4 (k + r)). Over L layers that is L n a; with gradient checkpointing, each layer
          keeps only its input, L n 4 d, plus one layer's n a recomputed during the backward pass.
        - logits: 4 V x 3 per scored position (the logits, log-softmax's output, their gradient), V the vocabulary.
          `scored_positions` defaults to every position, an upper bound: train_qlora projects only the positions whose
          next token is labelled (stages/training/batching.py).
        - dequantized weight: QLoRA only, the largest quantized weight in float32, which bitsandbytes dequantizes for
          one matmul at a time (forward and backward).
        Not counted: the first layer saves less (its input needs no gradient), the final norm, the gradients in flight
        during the backward pass, what loading leaves behind and the allocator's slack, so read the total as a floor
        (measured peaks beside it: docs/performance.md#memory). On CUDA the runtime is host memory, the rest GPU
        memory.
        """
        tokens = rows * length
        scored = tokens if scored_positions is None else scored_positions
        block = FP32 * (2 * (self.hidden + 1) + 4 * self.attention_width + self.heads + length + 3 * self.intermediate)
        adapted = sum(t.layers * self.lora_saved_bytes(t.in_features) for t in self.targets)
        every_layer = self.layers * block + adapted  # per token
        if checkpointing:
            activations = tokens * (self.layers * FP32 * self.hidden + every_layer / self.layers)
        else:
            activations = tokens * every_layer
        return MemoryEstimate(
            quantized=quantized,
            rows=rows,
            length=length,
            scored_positions=scored,
            checkpointing=checkpointing,
            base_weights=self.training_weight_bytes(quantized),
            adapter_state=FP32 * (2 + ADAM_STATE_PER_PARAMETER) * self.trainable,
            activations=activations,
            logits=FP32 * LOSS_COPIES * scored * self.vocab,
            dequantized_weight=FP32 * self.largest_quantized_weight if quantized else 0.0,
        )

    def training_weight_bytes(self, quantized: bool) -> float:
        """The base's bytes once prepared for training: float32 but for the NF4 linear layers when `quantized`."""
        if not quantized:
            return FP32 * self.base_parameters
        return self.quantized_weights * self.nf4_bits / 8 + FP32 * (self.base_parameters - self.quantized_weights)

    def lora_saved_bytes(self, in_features: int) -> float:
        """Bytes one LoRA module saves per token: dropout's mask and output, lora_A's output (without dropout, its
        input and output)."""
        mask = self.dropout_mask_bytes * in_features if self.lora_dropout else 0
        return FP32 * (in_features + self.rank) + mask


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
    """Count LoRA parameters, adapter size, base memory, training FLOPs and peak training memory for the configured
    run, from the config of `base_model.source` (see `load_config`)."""
    config, config_from = load_config(params, paths)
    return plan_for_config(config, params, config_from)


def plan_for_config(config, params: Params, config_from: str = "a config object") -> Plan:
    """The plan for a transformers config (e.g. a LlamaConfig built in code) with the `lora`, `quantization`,
    `train` and `prompt` sections of `params`; no paths, no weights."""
    from torch import nn

    from stages.common.modeling import device

    model = meta_model(config)
    lora, wanted = params.lora, set(params.lora.target_modules)
    result = Plan(source=params.base_model.source, config_from=config_from, rank=lora.r)
    targets = {name: TargetModule(name) for name in lora.target_modules}
    matmul_weights = quantized = largest = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weights = module.in_features * module.out_features
        matmul_weights += weights
        leaf = name.rsplit(".", 1)[-1]
        if leaf != "lm_head":  # bitsandbytes keeps the output layer in 16-bit
            quantized += weights
            largest = max(largest, weights)
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
    result.nf4_bits = nf4_bits_per_weight(params.quantization.double_quant)
    result.nf4_bytes = quantized * result.nf4_bits / 8 + 2.0 * (result.base_parameters - quantized)
    result.quantized_weights, result.largest_quantized_weight = quantized, largest
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    result.matmul_weights, result.layers = matmul_weights, config.num_hidden_layers
    result.hidden, result.heads = config.hidden_size, config.num_attention_heads
    result.attention_width = config.num_attention_heads * head_dim
    result.intermediate, result.vocab = config.intermediate_size, config.vocab_size
    result.lora_dropout = lora.dropout > 0
    result.dropout_mask_bytes = 1 if device() == "cuda" else FP32
    result.context = params.prompt.max_length
    result.flops_per_token = result.training_flops_per_token(result.context)
    result.memory = configured_peak_memory(result, params)
    return result


def checkpointing_applies(params: Params, quantized: bool) -> bool:
    """Whether train_qlora's model checkpoints its layers: `train.gradient_checkpointing` on a 4-bit base only,
    because peft's prepare_model_for_kbit_training (stages/train_qlora.py `attach_lora`) turns it on for quantized
    models alone."""
    return params.train.gradient_checkpointing and quantized


def configured_peak_memory(p: Plan, params: Params) -> MemoryEstimate:
    """`peak_memory` for the configured run: `train.batch_size` rows of `prompt.max_length` tokens (one row of them
    all with `train.padding_free`), 4-bit as `quantization.load_in_4bit` says, checkpointing as it applies."""
    rows, length = params.train.batch_size, params.prompt.max_length
    if params.train.padding_free:
        rows, length = 1, rows * length
    quantized = params.quantization.load_in_4bit
    return p.peak_memory(
        quantized=quantized, checkpointing=checkpointing_applies(params, quantized), rows=rows, length=length
    )


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
    if p.memory:
        lines += memory_lines(p.memory, p)
    return "\n".join(lines)


def memory_lines(m: MemoryEstimate, p: Plan) -> list[str]:
    """The peak memory estimate `m` of plan `p`, part by part, as `plan_text` prints it."""
    mode = "QLoRA, NF4 base" if m.quantized else "LoRA, fp32 base"
    checkpointing = "on" if m.checkpointing else "off"
    weights = "NF4 linear layers, the rest in fp32" if m.quantized else "every parameter in fp32"
    tokens = m.rows * m.length
    logits = f"{m.scored_positions:,} positions x {p.vocab:,} x 4 bytes x {LOSS_COPIES}"
    if m.scored_positions == tokens:  # train_qlora projects only the positions whose next token is labelled
        logits += " (every position: an upper bound)"
    parts = [
        ("base weights", m.base_weights, weights),
        ("adapter state", m.adapter_state, "adapter, gradients, AdamW moments: 16 bytes per trainable parameter"),
        ("activations", m.activations, f"{p.layers} layers x {tokens:,} tokens"),
        ("logits", m.logits, logits),
        ("dequantized", m.dequantized_weight, "the largest 4-bit weight in fp32, during one matmul"),
        ("runtime", m.runtime, "Python and the libraries, before any weight (bench/memory.py)"),
    ]
    lines = [
        f"peak training memory: ~{size(m.total)} ({mode}, {m.rows} x {m.length} tokens, "
        f"gradient checkpointing {checkpointing})"
    ]
    lines += [f"  {name:<14} {size(n):>10}  {why}" for name, n, why in parts if n]
    return lines
