"""The merged model as GGUF, for llama.cpp and Ollama, written with the `gguf` package.

`write_gguf(merged, out, file_type, prompt)` reads a merged Llama-architecture checkpoint (export/merged/, which
export_hub checked against the evaluated adapter) and writes one GGUF file: the hyperparameters, the tokenizer
(byte-level BPE tokens, token types, merges, BOS/EOS/pad ids, whether a BOS is added, the chat template) and
every weight: 2-D weights in F16 or Q8_0 (`file_type`), norms in F32. The query and key projections are
re-ordered for llama.cpp's rotary layout (GGUF keeps the two halves of each head's rotary pairs interleaved,
Hugging Face keeps them in halves). `modelfile(...)` is an Ollama Modelfile that carries the prompt template,
greedy decoding and the stop token, so `ollama create pricer -f Modelfile` gives a model that answers a bare
description with a price.

Limits: Llama-architecture models (SmolLM2, Llama 2/3/3.1) whose rope type is "default" or "llama3". For
"llama3" (Llama 3.1's scaling) the rotary frequency factors are written as the F32 tensor `rope_freqs.weight`,
one per rotary pair, as llama.cpp's own converter writes them (and, like it, no rope-scaling metadata keys);
llama.cpp divides each base frequency by its factor. Any other rope type (linear, dynamic, yarn, longrope...)
is refused with that reason. The tokenizer's pre-tokenizer name (how llama.cpp splits text before BPE) is
known for SmolLM2 and Llama 3; for other tokenizers "default" is written, with a warning.

Run: `export.gguf: [f16, q8_0]` with `export.merge: true` (export_hub writes export/gguf/), then
`python -m bench.gguf_scores` scores the files with llama.cpp (llama-cpp-python).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from stages.common.errors import StageError

# llama.cpp's name for a tokenizer's pre-tokenizer, for the tokenizers it can be told apart from here: a
# token only that tokenizer has, and its vocabulary size.
PRE_TOKENIZERS = {("<|im_start|>", 49152): "smollm", ("<|begin_of_text|>", 128256): "llama-bpe"}


def rotary_permute(weights, heads: int):
    """A q or k projection (rows: heads x head_dim) with each head's rows re-ordered from Hugging Face's
    rotary layout (first half, second half) to GGUF's (pairs interleaved)."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def tensor_type(name: str, data, file_type: str):
    """(GGML type, data ready to write): 1-D tensors stay float32; 2-D ones become F16 or Q8_0."""
    import gguf
    import numpy as np

    if data.ndim == 1:
        return gguf.GGMLQuantizationType.F32, data.astype(np.float32)
    if file_type == "q8_0" and data.shape[-1] % 32 == 0:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        return gguf.GGMLQuantizationType.Q8_0, quantized
    return gguf.GGMLQuantizationType.F16, data.astype(np.float16)


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """The GGUF tokenizer metadata of a Hugging Face byte-level BPE tokenizer."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        for i in range(vocab_size)
    ]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise StageError(f"GGUF export: the tokenizer is {model.get('type')}, and only byte-level BPE is written")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pre = next(
        (name for (token, size), name in PRE_TOKENIZERS.items() if token in by_id.values() and size == vocab_size), None
    )
    if pre is None:
        print("warning: GGUF export: unknown pre-tokenizer; writing 'default', which llama.cpp may split differently")
    adds_bos = bool(tokenizer("a")["input_ids"]) and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre or "default", "add_bos": adds_bos}


def rope(config) -> dict:
    """The rotary settings (transformers 5 keeps rope_theta and the scaling type together in a dict)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


# The rope types whose rotary frequencies this writer reproduces in llama.cpp.
ROPE_TYPES = ("default", "llama3")


def rope_type(config) -> str:
    """The config's rope type ("type" is the older key for it)."""
    settings = rope(config)
    return settings.get("rope_type") or settings.get("type") or "default"


def rope_theta(config) -> float:
    return rope(config).get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0


def head_size(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config):
    """Llama 3.1's rotary scaling as llama.cpp reads it: one float32 factor per rotary pair, by which llama.cpp
    divides that pair's base frequency theta**(-2i/head_dim). Wavelengths shorter than
    original_max_position_embeddings / high_freq_factor keep their frequency (1), those longer than
    original_max_position_embeddings / low_freq_factor are slowed by `factor`, and those between are
    interpolated smoothly (the same frequencies as transformers' `_compute_llama3_parameters`)."""
    import math

    import numpy as np

    settings = rope(config)
    missing = [
        key
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if settings.get(key) is None
    ]
    if missing:
        raise StageError(f"GGUF export: the llama3 rope scaling has no {', '.join(missing)}")
    factor, low, high = settings["factor"], settings["low_freq_factor"], settings["high_freq_factor"]
    context = settings["original_max_position_embeddings"]
    dim, base = head_size(config), rope_theta(config)
    long_wavelength, short_wavelength = context / low, context / high
    factors = []
    for pair in range(dim // 2):
        wavelength = 2 * math.pi * base ** (2 * pair / dim)
        if wavelength < short_wavelength:
            factors.append(1.0)
        elif wavelength > long_wavelength:
            factors.append(factor)
        else:  # between the two (an empty band when low_freq_factor == high_freq_factor)
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_metadata(writer, config, tokenizer, name: str, file_type: str) -> None:
    import gguf

    head_dim = head_size(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # llama.cpp takes a head's size as hidden size / heads unless told: a config's own head_dim may differ
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    fields = tokenizer_fields(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(fields["add_bos"])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def checkpoint_arrays(merged: Path):
    """(name, numpy array) of every tensor in `merged`'s safetensors files, read one at a time. bfloat16 (what a
    merge on CUDA saves) has no numpy type, so it becomes float32, which holds it exactly."""
    import torch
    from safetensors import safe_open

    for file in sorted(merged.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open has no iterator)
                tensor = tensors.get_tensor(name)
                yield name, (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def gguf_tensors(merged: Path, config):
    """(GGUF name, float array) of every weight of the checkpoint in `merged`, q/k re-ordered; the output layer
    left out when it is tied to the embeddings (llama.cpp then reuses token_embd)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, data in checkpoint_arrays(merged):
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise StageError(f"GGUF export: no GGUF name for the checkpoint's tensor {hf_name!r}")
        if hf_name.endswith("q_proj.weight"):
            data = rotary_permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = rotary_permute(data, config.num_key_value_heads)
        yield name, data


def write_gguf(merged: Path, out: Path, file_type: str, name: str) -> None:
    """Write the merged checkpoint in `merged` as one GGUF file `out` with 2-D weights in `file_type`."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(merged)
    if config.model_type != "llama":
        raise StageError(f"GGUF export writes Llama-architecture models; this one is {config.model_type!r}")
    if rope_type(config) not in ROPE_TYPES:
        raise StageError(
            f"GGUF export: rope scaling {rope_type(config)!r} ({rope(config)}) is not written; only rope types "
            f"{' and '.join(map(repr, ROPE_TYPES))} are; use llama.cpp's converter (convert_hf_to_gguf.py)"
        )
    tokenizer = AutoTokenizer.from_pretrained(merged)
    writer = gguf.GGUFWriter(str(out), "llama")
    write_metadata(writer, config, tokenizer, name, file_type)
    tensors = gguf_tensors(merged, config)
    if rope_type(config) == "llama3":
        rope_freqs = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"
        tensors = itertools.chain(tensors, [(rope_freqs, llama3_rope_factors(config))])
    for tensor_name, data in tensors:
        ggml_type, payload = tensor_type(tensor_name, data, file_type)
        writer.add_tensor(tensor_name, payload, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_name: str, template: str | None, max_new_tokens: int, stop: str | None) -> str:
    """An Ollama Modelfile: the GGUF file, the prompt with the description as the user's message (no TEMPLATE
    when `template` is None: Ollama then uses the GGUF's chat template), greedy decoding, as many new tokens
    as evaluation allows, and the end-of-sequence stop."""
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        body = template.replace("{text}", "{{ .Prompt }}").replace('"""', '\\"\\"\\"')
        lines.append(f'TEMPLATE """{body}"""')
    lines += ["PARAMETER temperature 0", f"PARAMETER num_predict {max_new_tokens}"]
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
