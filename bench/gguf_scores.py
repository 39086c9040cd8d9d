"""Benchmark: the merged model as GGUF, scored on the test set by a real llama.cpp runtime, beside the adapter.

After `make demo`: merges the adapter into the dequantized base and checks it as export_hub does (into a
scratch folder; the workspace's export/ is left alone), writes it as GGUF in each of F16 and Q8_0
(serving/gguf.py), and has llama.cpp (llama-cpp-python) complete every test prompt greedily with
`evaluate.max_new_tokens` new tokens. The first number of each completion is its price, scored with the same
metrics as evaluate_adapter. Printed beside the adapter's own scores (metrics/eval.json): average error, RMSLE,
hit rate, how many items got the adapter's exact price, items per second and the file's size, so the cost
of each GGUF type is a measured number.

llama-cpp-python is on PyPI as source only, and building it takes minutes, so it is built once, into a
wheel cached in ~/.cache/qlora-pipeline/wheels, and installed from there. (CMAKE_ARGS="-DGGML_NATIVE=OFF"
keeps the wheel usable on the project's other CPUs.)
Writes bench/results/gguf_scores.json.

Run: `python -m bench.gguf_scores [--items 200]` (or `make bench-gguf`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe, machine

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_scores.json"
LLAMA_CPP = "llama-cpp-python==0.3.36"
KINDS = ("f16", "q8_0")


def ensure_llama_cpp() -> None:
    """Import llama_cpp, building and installing the cached wheel first when it is missing."""
    try:
        import llama_cpp  # noqa: F401

        return
    except ImportError:
        pass
    from serving.pricer import cache_root

    wheels = cache_root() / "wheels"
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        print(f"building {LLAMA_CPP} into {wheels} (several minutes, once)", flush=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), LLAMA_CPP]
        subprocess.run(command, env=env, check=True)
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "diskcache"], check=True)


def write_ggufs(params, paths, folder: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """Merge (checked against the evaluated adapter, as export_hub does) and write each GGUF type of `kinds`."""
    from serving.gguf import write_gguf
    from stages.export_hub import export_merged

    merge = dataclasses.replace(params.export, merge=True)
    export_merged(paths, dataclasses.replace(params, export=merge), folder / "merged")
    files = {}
    for kind in kinds:
        files[kind] = folder / f"model-{kind}.gguf"
        write_gguf(folder / "merged", files[kind], kind, "bench")
    return files


def score_gguf(path: Path, prompts: list[str], truths: list[float], max_new_tokens: int, stop: str) -> dict:
    """llama.cpp's greedy completions of `prompts` with the GGUF at `path`, scored as evaluation scores."""
    from llama_cpp import Llama

    from stages.common.generation import parse_price
    from stages.common.metrics import price_metrics

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count(), seed=0, verbose=False)
    started = time.perf_counter()
    outputs = [
        llm(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1, stop=[stop])["choices"][0]["text"]
        for prompt in prompts
    ]
    seconds = time.perf_counter() - started
    prices = [parse_price(text) for text in outputs]
    return {
        **price_metrics(truths, prices),
        "items_per_second": round(len(prompts) / seconds, 2),
        "size_mb": round(path.stat().st_size / 1e6, 1),
        "prices": prices,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    from stages.common.config import load_params
    from stages.common.generation import build_prompts
    from stages.common.io import read_json, read_jsonl, write_json
    from stages.common.modeling import load_tokenizer
    from stages.common.paths import Paths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="test items to score (default: all 200)")
    args = parser.parse_args(argv)
    ensure_llama_cpp()
    params, paths = load_params("params.yaml"), Paths.at(".")
    test = read_jsonl(paths.split("test"))[: args.items]
    evaluated = read_jsonl(paths.predictions)[: args.items]
    tokenizer = load_tokenizer(paths.base_model)
    prompts = build_prompts(tokenizer, test, params.prompt, params.evaluate.max_new_tokens)
    truths = [row["price"] for row in test]
    adapter = [row["adapter_prediction"] for row in evaluated]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as folder:
        for kind, path in write_ggufs(params, paths, Path(folder)).items():
            scores = score_gguf(path, prompts, truths, params.evaluate.max_new_tokens, tokenizer.eos_token)
            scores["same_price_as_adapter"] = sum(a == b for a, b in zip(scores.pop("prices"), adapter, strict=True))
            scores.pop("outputs")
            results[kind] = scores
            print(f"{kind}: avg error ${scores['avg_error']:,.2f}, hits {scores['hit_rate']:.1%}", flush=True)
    row = read_json(paths.eval_metrics)["adapter"]
    from stages.common.metrics import price_metrics

    mine = price_metrics(truths, adapter) if args.items < len(read_jsonl(paths.split("test"))) else row
    result = {"machine": machine(), "items": len(test), "adapter": mine, "gguf": results}
    print(f"\n{describe(result['machine'])}; {len(test)} test items")
    print(f"{'model':<22} {'avg error':>10} {'RMSLE':>7} {'hit rate':>9} {'same price':>11} {'items/s':>8} {'MB':>7}")
    print(f"{'adapter (PEFT, NF4)':<22} {mine['avg_error']:>10,.2f} {mine['rmsle']:>7.3f} {mine['hit_rate']:>9.1%}")
    for kind, s in results.items():
        print(
            f"{'GGUF ' + kind + ' (llama.cpp)':<22} {s['avg_error']:>10,.2f} {s['rmsle']:>7.3f} {s['hit_rate']:>9.1%} "
            f"{s['same_price_as_adapter']:>7}/{len(test):<3} {s['items_per_second']:>8.2f} {s['size_mb']:>7.1f}"
        )
    write_json(RESULTS, result)
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
