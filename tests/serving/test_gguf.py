"""The GGUF writer, read back with gguf's own reader: every weight (q/k re-ordered for llama.cpp's rotary
layout), F16 and Q8_0 within their rounding, the hyperparameters, the tokenizer and the Ollama Modelfile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from serving.gguf import modelfile, rotary_permute, write_gguf
from stages.common.config import params_from_dict
from stages.common.errors import ConfigError
from tests.conftest import copy_outputs


def tensors_of(path):
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    arrays = {t.name: dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape))) for t in reader.tensors}
    return reader, arrays, {t.name: t.tensor_type.name for t in reader.tensors}


def undo_rotary(weights, heads: int):
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


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
    assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[kind]


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
