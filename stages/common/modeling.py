"""Loading the base model in 4-bit NF4 (bitsandbytes) and its tokenizer, on CUDA when present, else CPU."""

from __future__ import annotations

import os
from pathlib import Path

from stages.common.config import QuantizationConfig


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(name: str):
    """torch dtype for 4-bit matmuls: "auto" is bfloat16 on CUDA and float32 on CPU (bf16 is slow there)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device() == "cuda" else torch.float32
    return getattr(torch, name)  # config.COMPUTE_DTYPES: float32, bfloat16 or float16


def cores() -> int:
    """The CPU threads this process may use: $OMP_NUM_THREADS when set (a sweep running trials side by side
    shares the cores out that way), else one per core."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(os.cpu_count() or 1, 1)


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads for torch (0: `cores()`)."""
    import torch

    torch.set_num_threads(threads if threads > 0 else cores())


def load_tokenizer(path: Path, padding_side: str = "right"):
    """The base model's tokenizer with a pad token (EOS when it has none) and the given padding side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def bnb_config(cfg: QuantizationConfig, sharded: bool = False):
    """BitsAndBytesConfig for NF4 (or FP4) 4-bit weights with optional double quantization; `sharded` (training
    under FSDP) packs the 4-bit weights in the compute dtype instead of bitsandbytes' default uint8."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(cfg.compute_dtype)
    # FSDP shards floating-point tensors only: 4-bit weights packed in uint8 stay whole on every GPU
    # (accelerate 1.15's FSDP2 leaves them out of sharding). Packed in a float dtype they shard like the
    # rest. That dtype must be the compute dtype, for two reasons. bitsandbytes' FSDP-QLoRA guide asks for
    # the model's `dtype` (load_base passes the compute dtype), so that FSDP wraps the 4-bit layers like the
    # others. And under the Trainer's bf16 or fp16 (train_qlora.trainer_precision: the compute dtype again)
    # FSDP casts every float tensor it gathers to that dtype, which scrambles weights packed in another one
    # (float32-packed weights fail to unpack under bf16: checked with torch 2.13's fully_shard, 2 CPU ranks).
    storage = {"bnb_4bit_quant_storage": dtype} if sharded else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        **storage,
    )


def base_loading_kwargs(cfg: QuantizationConfig, sharded: bool = False) -> dict:
    """`from_pretrained` arguments for the base: the compute dtype, this machine's device and, when
    `cfg.load_in_4bit`, the 4-bit config; `sharded`: for training under FSDP, where the compute dtype is also
    the 4-bit storage dtype, as bitsandbytes asks (`bnb_config`). bench/memory.py loads its random 1B base
    with these too."""
    kwargs = {"dtype": compute_dtype(cfg.compute_dtype), "device_map": {"": device()}}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(cfg, sharded)
    return kwargs


def load_base(path: Path, cfg: QuantizationConfig, sharded: bool = False):
    """The base model from `path`, in 4 bits when `cfg.load_in_4bit`, on this machine's device, in eval mode;
    `sharded`: for training under FSDP (see `base_loading_kwargs`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **base_loading_kwargs(cfg, sharded))
    keep_compute_dtype_on_cpu(model)
    if cfg.load_in_4bit:
        release_weights_file(model)
    model.eval()
    return model


def release_weights_file(model) -> None:
    """Copy the tensors a 4-bit model still reads from the memory-mapped weights file (embeddings, norms,
    lm_head: bitsandbytes quantizes only the linear layers) into memory of their own, so the mapping closes.

    Quantizing reads every weight, and on a CPU those file pages then stay in the process's resident memory
    for as long as one tensor maps them, so without this copy a 4-bit model would hold more resident memory
    than the unquantized one (figures in docs/performance.md).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for _, tensor in tensors:
            if tensor.device.type == "cpu" and not isinstance(tensor, bnb.nn.Params4bit):
                tensor.data = tensor.data.clone()


def load_adapter_model(base: Path, adapter: Path, cfg: QuantizationConfig, dequantize_on_cpu: bool = False):
    """The base from `base` (4-bit when `cfg.load_in_4bit`) with the LoRA adapter in `adapter`, in eval mode;
    FileNotFoundError when `adapter` holds no adapter.

    `dequantize_on_cpu` (evaluate.dequantize_on_cpu, for generation: evaluation, serving, batch prediction):
    on a CPU, the 4-bit weights are dequantized once into plain Linear layers (`dequantize_linear4bit`), with
    the LoRA layers left unmerged on top, so the answers are the 4-bit model's; on CUDA the weights stay in
    4 bits.
    """
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json; run train_qlora first")
    model = load_base(base, cfg)
    if dequantize_on_cpu and cfg.load_in_4bit and device() == "cpu":
        dequantize_linear4bit(model)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def dequantized_bytes(model) -> int:
    """Bytes the 4-bit linear layers of `model` take once dequantized (their weights in the compute dtype)."""
    import bitsandbytes as bnb

    return sum(
        m.in_features * m.out_features * m.weight.quant_state.dtype.itemsize
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def dequantize_linear4bit(model) -> bool:
    """Replace every bitsandbytes Linear4bit of `model` by a torch Linear holding its weight dequantized (exactly
    the NF4 values, in the compute dtype) and its bias; True when done, False (with a warning) when the
    dequantized weights would not fit in the memory this machine has free.

    Why: bitsandbytes' CPU path dequantizes every 4-bit weight on every forward call (its fused kernel needs
    AVX512-BF16 and computes in bfloat16, which `keep_compute_dtype_on_cpu` turns off), so generation pays a
    dequantization per layer per token. Dequantized once, the same matmul runs on the same values: a Linear4bit
    on a CPU multiplies by `dequantize_4bit(weight).to(x.dtype)` itself, so the outputs are the same. The cost
    is memory: the linear layers grow from 4 bits to the compute dtype (the base's float32 size on a CPU).
    """
    import bitsandbytes as bnb
    import psutil
    import torch

    needed, free = dequantized_bytes(model), psutil.virtual_memory().available
    if needed > free * 0.8:
        print(
            f"warning: keeping the base in 4 bits: its dequantized weights would take {needed / 2**30:.1f} GiB, "
            f"and {free / 2**30:.1f} GiB is free (evaluate.dequantize_on_cpu: false skips this check)"
        )
        return False
    parents = dict(model.named_modules())
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = torch.nn.Parameter(weight.to(module.compute_dtype or weight.dtype), requires_grad=False)
        if module.bias is not None:
            plain.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, attribute = name.rpartition(".")
        setattr(parents[parent], attribute, plain)
    return True


def keep_compute_dtype_on_cpu(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its bf16 CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights the first time it runs in eval
    mode and from then on multiplies in bfloat16, whatever the compute dtype, and that kernel has no
    backward. Its logits differ visibly from the float32 path, it was slower at prefill where measured
    (docs/decisions.md), and training that resumes after an evaluation would run through it. With it
    off, training, evaluation and export all compute the same way, in the configured dtype.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
