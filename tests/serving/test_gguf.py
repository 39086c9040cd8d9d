"""The GGUF writer, read back with gguf's own reader: every weight (q/k re-ordered for llama.cpp's rotary
layout), F16 and Q8_0 within their rounding, the hyperparameters, the tokenizer, Llama 3.1's rope scaling
(`rope_freqs.weight`) and the Ollama Modelfile. One test runs the written file in llama.cpp (llama-cpp-python,
which `make gguf-check` builds) and compares it with transformers past the original context."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from serving.gguf import modelfile, rotary_permute, write_gguf
from stages.common.config import params_from_dict
from stages.common.errors import ConfigError, StageError
from tests.conftest import TINY_LLAMA, copy_outputs, price_rows, save_random_llama

# Llama 3.1's rope scaling with its original context cut to 64 positions (of 256): with head_dim 16 and theta
# 10000 the 8 rotary wavelengths (6.3, 19.9, 62.8, 199, ...) fall in all three of its bands (shorter than
# 64 / 4 = 16: kept; between 16 and 64: interpolated; longer than 64: slowed 8 times).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LLAMA_CPP_MISSING = "llama-cpp-python is not installed: `make gguf-check` builds it (cached wheel) and runs this file"


def tensors_of(path):
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    arrays = {t.name: dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape))) for t in reader.tensors}
    return reader, arrays, {t.name: t.tensor_type.name for t in reader.tensors}


def undo_rotary(weights, heads: int):
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def with_rope(source, folder, rope_parameters: dict):
    """A copy of the checkpoint in `source` whose config has `rope_parameters` instead of its own."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = rope_parameters
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory):
    """A tiny random Llama shaped like Llama 3.1 (rope type "llama3", original context 64 of 256) with the
    suite's tokenizer. Its weights are drawn wide (std 0.1) so that attention depends on position, and are
    rounded to float16 before saving, so that the F16 GGUF holds them exactly."""
    folder = tmp_path_factory.mktemp("llama31")
    return save_random_llama(
        folder, TINY_LLAMA, float16_exact=True, rope_parameters=dict(LLAMA3_ROPE), initializer_range=0.1
    )


def transformers_inv_freq(folder, rope_parameters: dict | None = None):
    """transformers' own rotary inverse frequencies for the checkpoint's config (or with `rope_parameters`)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(folder)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    return LlamaRotaryEmbedding(config).inv_freq.double().numpy()


def test_rotary_permute_interleaves_each_heads_halves():
    head = np.arange(8)[:, None] * np.ones((1, 3))  # one head of dimension 8: rows 0..7
    permuted = rotary_permute(head, heads=1)
    assert list(permuted[:, 0]) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert np.array_equal(undo_rotary(permuted, 1), head)


@pytest.mark.parametrize(("kind", "tolerance"), [("f16", 1e-3), ("q8_0", 2e-2)])
def test_every_weight_is_written_and_reads_back(tiny_model_dir, tmp_path, kind, tolerance):
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    out = tmp_path / f"model-{kind}.gguf"
    write_gguf(tiny_model_dir, out, kind, "tiny")
    reader, arrays, types = tensors_of(out)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    weights = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    assert len(arrays) == len([name for name in weights if name != "lm_head.weight"])  # tied: token_embd serves
    assert "output.weight" not in arrays and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_up.weight"] == kind.upper()
    attention = "model.layers.0.self_attn"
    pairs = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "blk.1.ffn_down.weight": weights["model.layers.1.mlp.down_proj.weight"],
        "blk.0.attn_q.weight": rotary_permute(weights[f"{attention}.q_proj.weight"], config.num_attention_heads),
        "blk.0.attn_k.weight": rotary_permute(weights[f"{attention}.k_proj.weight"], config.num_key_value_heads),
        "output_norm.weight": weights["model.norm.weight"],
    }
    for name, expected in pairs.items():
        assert np.abs(arrays[name] - expected).max() <= tolerance * max(np.abs(expected).max(), 1), name
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")
    }
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == head_dim
    assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[kind]


def test_a_bfloat16_checkpoint_exports_as_a_cuda_merge_saves_it(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (weights_file,) = merged.glob("*.safetensors")
    weights = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(str(weights_file)).items()}
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    write_gguf(merged, tmp_path / "model.gguf", "f16", "tiny")
    _, arrays, _ = tensors_of(tmp_path / "model.gguf")
    expected = weights["model.embed_tokens.weight"].float().numpy()
    assert np.abs(arrays["token_embd.weight"] - expected).max() <= 1e-3 * np.abs(expected).max()


def test_the_tokenizer_travels_with_its_ids(tiny_model_dir, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    write_gguf(tiny_model_dir, out, "q8_0", "tiny")
    reader = GGUFReader(str(out))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert [tokens[i] for i in tokenizer("Price is $99.00")["input_ids"]] == tokenizer.tokenize("Price is $99.00")
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert (
        reader.fields["tokenizer.ggml.model"].contents() == "gpt2" and reader.fields["tokenizer.ggml.merges"].contents()
    )


def test_llama3_rope_scaling_is_written_as_the_frequency_factors_transformers_uses(llama31_dir, tmp_path):
    out = tmp_path / "model.gguf"
    write_gguf(llama31_dir, out, "f16", "tiny-3.1")
    reader, arrays, types = tensors_of(out)
    scaled = transformers_inv_freq(llama31_dir)
    default = transformers_inv_freq(llama31_dir, {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]})
    factors = arrays["rope_freqs.weight"]
    pairs = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"] // 2
    assert types["rope_freqs.weight"] == "F32" and factors.shape == (pairs,)
    assert np.allclose(factors, default / scaled, rtol=1e-5, atol=0)  # llama.cpp divides theta_i by factor_i
    # the model exercises all three bands: kept (1), interpolated (between) and slowed by `factor` (8)
    assert (factors == 1).any() and (factors == LLAMA3_ROPE["factor"]).any()
    assert ((factors > 1) & (factors < LLAMA3_ROPE["factor"])).any()
    # as llama.cpp's converter: the tensor only, no rope-scaling keys
    assert not [name for name in reader.fields if "rope.scaling" in name]
    assert reader.fields["llama.rope.freq_base"].contents() == LLAMA3_ROPE["rope_theta"]


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64},
    ],
)
def test_other_rope_scaling_is_refused_with_its_type(tiny_model_dir, tmp_path, rope_parameters):
    scaled = with_rope(tiny_model_dir, tmp_path / "scaled", rope_parameters)
    kind = rope_parameters["rope_type"]
    named = re.escape(f"rope scaling {kind!r}") + r".*" + re.escape("only rope types 'default' and 'llama3'")
    with pytest.raises(StageError, match=named):
        write_gguf(scaled, tmp_path / "model.gguf", "f16", "tiny")
    assert not (tmp_path / "model.gguf").exists()


def llama_cpp_run(path, prompt: list[int], new_tokens: int):
    """llama.cpp's greedy continuation of `prompt` with the GGUF at `path`: (new tokens, the logits at every
    position of prompt + new tokens)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)
    llm.eval(prompt)
    generated = []
    for _ in range(new_tokens):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(generated[-1:])
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
    llm.close()
    return generated, logits


def transformers_run(folder, prompt: list[int], new_tokens: int):
    """transformers' greedy continuation of `prompt` with the checkpoint in `folder`, in float32: (prompt + new
    tokens, the logits at every position of them)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        sequence = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)[0]
        return sequence.tolist(), model(sequence[None]).logits[0].double().numpy()


def long_prompt(folder, tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer(" ".join(row["text"] for row in price_rows(12)))["input_ids"][:tokens]


def test_llama_cpp_runs_the_llama3_scaled_gguf_as_transformers_does_past_the_original_context(llama31_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    prompt = long_prompt(llama31_dir, 150)
    original = LLAMA3_ROPE["original_max_position_embeddings"]
    assert len(prompt) > 2 * original
    sequence, expected = transformers_run(llama31_dir, prompt, 4)
    out = tmp_path / "model-f16.gguf"
    write_gguf(llama31_dir, out, "f16", "tiny-3.1")
    generated, logits = llama_cpp_run(out, prompt, 4)
    assert generated == sequence[len(prompt) :]
    difference = np.abs(logits - expected)
    print(
        f"max |llama.cpp - transformers| logit: {difference.max():.4g} (past position {original}: "
        f"{difference[original:].max():.4g}; logits up to {np.abs(expected).max():.3g})"
    )
    assert difference.max() < 0.05
    # the same weights exported as if unscaled: llama.cpp then rotates with the default frequencies, and past
    # the original context it no longer computes what transformers does
    unscaled = with_rope(llama31_dir, tmp_path / "unscaled", {"rope_type": "default", "rope_theta": 10000.0})
    write_gguf(unscaled, tmp_path / "unscaled.gguf", "f16", "tiny-3.1")
    _, wrong = llama_cpp_run(tmp_path / "unscaled.gguf", sequence, 0)
    past = np.abs(wrong - expected)[original:]
    print(f"without rope_freqs: max difference past position {original}: {past.max():.4g}")
    assert past.max() > 20 * difference.max() and past.max() > 0.5
    assert (wrong[original:].argmax(-1) != expected[original:].argmax(-1)).any()


def test_llama_cpp_runs_a_llama_whose_head_size_is_not_hidden_size_over_heads(tmp_path):
    """head_dim 32 with hidden size 64 and 4 heads (llama.cpp would assume 16): the GGUF says the head size,
    and llama.cpp computes what transformers does."""
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
    shape = {**TINY_LLAMA, "head_dim": 32}  # wide weights (std 0.1), as in llama31_dir, so no greedy ties
    folder = save_random_llama(tmp_path / "wide-heads", shape, float16_exact=True, initializer_range=0.1)
    prompt = long_prompt(folder, 40)
    sequence, expected = transformers_run(folder, prompt, 4)
    write_gguf(folder, tmp_path / "model.gguf", "f16", "tiny-wide-heads")
    generated, logits = llama_cpp_run(tmp_path / "model.gguf", prompt, 4)
    assert generated == sequence[len(prompt) :]
    assert np.abs(logits - expected).max() < 0.05


def test_the_modelfile_carries_the_prompt_greedy_decoding_and_the_stop():
    text = modelfile("model-q8_0.gguf", "How much does this cost?\n\n{text}\n\nPrice is $", 8, "<|im_end|>")
    assert text.splitlines()[0] == "FROM ./model-q8_0.gguf"
    assert 'TEMPLATE """How much does this cost?\n\n{{ .Prompt }}\n\nPrice is $"""' in text
    assert "PARAMETER temperature 0" in text and "PARAMETER num_predict 8" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "TEMPLATE" not in modelfile("m.gguf", None, 8, None)  # chat: Ollama reads the GGUF's template


def test_export_writes_the_gguf_files_and_modelfile_of_the_checked_merged_model(pipeline_project, tmp_path):
    from stages import export_hub

    paths, params, _ = pipeline_project
    copy = copy_outputs(paths, tmp_path)
    export = dataclasses.replace(params.export, merge=True, gguf=["f16", "q8_0"])
    export_hub.run(dataclasses.replace(params, export=export), copy)
    folder = copy.export / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    assert "FROM ./model-q8_0.gguf" in (folder / "Modelfile").read_text()
    assert "ollama create pricer -f gguf/Modelfile" in (copy.export / "README.md").read_text()
    _, arrays, _ = tensors_of(folder / "model-f16.gguf")
    assert "blk.1.attn_v.weight" in arrays


@pytest.mark.parametrize(
    ("export", "named"),
    [
        ({"merge": True, "gguf": ["q4_k"]}, r"export\.gguf: expected a list of distinct GGUF types"),
        ({"merge": False, "gguf": ["f16"]}, r"export\.gguf: expected \[\] unless export\.merge is true"),
    ],
)
def test_gguf_settings_are_checked_at_load(export, named):
    with pytest.raises(ConfigError, match=named):
        params_from_dict({"export": export})
