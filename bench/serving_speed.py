"""Benchmark: how fast the champion answers when served, against llama.cpp on the same prompts and against the
4-bit path it replaced.

After `make demo` (the registry holds a champion). Over the test items, on this machine:
- evaluate_adapter's generation of every test item with the base kept in 4 bits (bitsandbytes dequantizes
  each weight on every call) and with it dequantized once (evaluate.dequantize_on_cpu, the default on a CPU):
  items per second, and how many answers are identical;
- the champion served as `make serve-champion` serves it (python -m serving.champion in front of MLflow's
  scoring server, on a loopback port; start-up time reported separately): one item per request, `--single`
  requests in a row (latency p50 and p95), then batches of `evaluate.batch_size` items over every test item
  (items/s), and how many served answers are the evaluation's;
- batch prediction in this process (serving.pricer, as `python -m serving.predict` runs it), model load left
  out: items per second;
- llama.cpp (llama-cpp-python, built once as bench/gguf_scores.py does) on the Q8_0 GGUF of the same adapter
  merged into the dequantized base, greedy, one prompt at a time: items per second (`--no-llama-cpp` skips it).
Prints one table with the targets as ratios and writes bench/results/serving_speed.json.

Run: `python -m bench.serving_speed [--single 20]` (or `make bench-serving`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.machine import describe, machine

RESULTS = Path(__file__).resolve().parent / "results" / "serving_speed.json"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(round(share * (len(ordered) - 1)), len(ordered) - 1)]


def post(url: str, texts: list[str]) -> tuple[float, list[str]]:
    """(seconds, completions) of one /invocations request for `texts`."""
    body = json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        predictions = json.load(answer)["predictions"]
    return time.perf_counter() - started, [p["completion"] for p in predictions]


def serve_champion(port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """`python -m serving.champion` of this workspace's registry; (the process, seconds until /ping answered)."""
    command = [sys.executable, "-m", "serving.champion", "--port", str(port)]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return server, time.perf_counter() - started
        except OSError:
            if server.poll() is not None or time.perf_counter() - started > 900:
                server.terminate()
                raise SystemExit(f"the champion server did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def latencies(seconds: list[float], items_per_request: int) -> dict:
    return {
        "requests": len(seconds),
        "items_per_request": items_per_request,
        "p50_seconds": round(percentile(seconds, 0.5), 3),
        "p95_seconds": round(percentile(seconds, 0.95), 3),
        "items_per_second": round(items_per_request * len(seconds) / sum(seconds), 2),
    }


def evaluation_speeds(params, paths, rows: list[dict]) -> dict:
    """evaluate_adapter's generation of `rows` with the base in 4 bits and dequantized: items/s and outputs."""
    from stages.evaluation.prices import predict_prices

    speeds = {}
    for name, dequantize in (("four_bit", False), ("dequantized", True)):
        evaluate = dataclasses.replace(params.evaluate, dequantize_on_cpu=dequantize)
        predicted = predict_prices(paths, dataclasses.replace(params, evaluate=evaluate), rows, paths.adapter, False)
        speeds[name] = {"items_per_second": round(predicted.items_per_second, 2), "outputs": predicted.adapter}
        print(f"evaluation, {name}: {speeds[name]['items_per_second']} items/s", flush=True)
    return speeds


def served(rows: list[dict], size: int, single: int) -> dict:
    """The champion server's start-up, one-item latencies and batch throughput, and its completions."""
    from infra.servers import free_port

    texts = [row["text"] for row in rows]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as folder:
        server, startup = serve_champion(port, Path(folder) / "serve.log")
        try:
            post(url, texts[:1])  # warm-up: the first request pays for lazy initialisation
            one = [post(url, [t])[0] for t in texts[:single]]
            answers = [post(url, texts[i : i + size]) for i in range(0, len(texts), size)]
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {
        "startup_seconds": round(startup, 1),
        "one_item": latencies(one, 1),
        "batches": latencies([seconds for seconds, _ in answers], size),
        "outputs": [c for _, completions in answers for c in completions],
    }


def llama_cpp_speed(params, paths, rows: list[dict]) -> dict:
    """llama.cpp's items/s on the Q8_0 GGUF of the merged adapter, the evaluation's prompts, one at a time."""
    from bench.gguf_scores import ensure_llama_cpp, score_gguf, write_ggufs
    from stages.common.generation import build_prompts
    from stages.common.modeling import load_tokenizer

    ensure_llama_cpp()
    tokenizer = load_tokenizer(paths.base_model)
    prompts = build_prompts(tokenizer, rows, params.prompt, params.evaluate.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-serving-gguf-") as folder:
        path = write_ggufs(params, paths, Path(folder), kinds=("q8_0",))["q8_0"]
        truths = [row["price"] for row in rows]
        scores = score_gguf(path, prompts, truths, params.evaluate.max_new_tokens, tokenizer.eos_token)
    return {"items_per_second": scores["items_per_second"], "avg_error": round(scores["avg_error"], 2)}


def batch_prediction_speed(params, paths, rows: list[dict]) -> float:
    import pandas as pd

    from serving.pricer import Pricer, model_config

    pricer = Pricer().load(model_config(params, paths), paths.adapter)
    started = time.perf_counter()
    pricer.answers(pd.DataFrame({"text": [row["text"] for row in rows]}))
    return round(len(rows) / (time.perf_counter() - started), 2)


def table(result: dict) -> str:
    """The figures as printed: what, items/s or latency, and the target each is held to."""
    ev, sv, cpp = result["evaluation"], result["served"], result.get("llama_cpp")
    n = result["items"]
    batched = f"served, {sv['batches']['items_per_request']} items per request"
    lines = [
        f"{'what':<58} {'items/s':>8} {'p50 s':>6}  target",
        f"{'evaluation, base in 4 bits (before)':<58} {ev['four_bit']['items_per_second']:>8.2f}",
        f"{'evaluation, base dequantized once (now)':<58} {ev['dequantized']['items_per_second']:>8.2f}        "
        f"x{result['evaluation_speedup']:.2f} of before (>= 2); {result['identical_evaluation']}/{n} answers "
        "identical",
        f"{'served, one item per request':<58} {sv['one_item']['items_per_second']:>8.2f} "
        f"{sv['one_item']['p50_seconds']:>6.3f}  p50 <= 0.3 s",
        f"{batched:<58} "
        f"{sv['batches']['items_per_second']:>8.2f} {sv['batches']['p50_seconds']:>6.3f}  "
        + (f"x{result['served_vs_llama_cpp']:.2f} of llama.cpp Q8_0 (>= 1); " if cpp else "")
        + f"{result['identical_served']}/{n} answers as evaluated",
        f"{'batch prediction in process (serving.pricer)':<58} {result['batch_prediction_items_per_second']:>8.2f}",
    ]
    if cpp:
        name = "llama.cpp, GGUF Q8_0 of the merged adapter, one at a time"
        lines.append(f"{name:<58} {cpp['items_per_second']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stages.common.config import load_params
    from stages.common.io import read_jsonl, write_json
    from stages.common.modeling import set_threads
    from stages.common.paths import Paths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=20, help="one-item requests to time (default 20)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out the llama.cpp row")
    args = parser.parse_args(argv)
    params, paths = load_params("params.yaml"), Paths.at(".")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{paths.mlflow_db}")
    set_threads(0)
    rows = read_jsonl(paths.split("test"))
    evaluation = evaluation_speeds(params, paths, rows)
    serving = served(rows, params.evaluate.batch_size, args.single)
    print(f"served: {serving['batches']['items_per_second']} items/s in batches", flush=True)
    cpp = None if args.no_llama_cpp else llama_cpp_speed(params, paths, rows)
    dequantized, four_bit = evaluation["dequantized"], evaluation["four_bit"]
    result = {
        "machine": machine(),
        "items": len(rows),
        "evaluation": {k: {"items_per_second": v["items_per_second"]} for k, v in evaluation.items()},
        "evaluation_speedup": round(dequantized["items_per_second"] / four_bit["items_per_second"], 2),
        "identical_evaluation": sum(a == b for a, b in zip(dequantized["outputs"], four_bit["outputs"], strict=True)),
        "served": {k: v for k, v in serving.items() if k != "outputs"},
        "identical_served": sum(a == b for a, b in zip(serving["outputs"], four_bit["outputs"], strict=True)),
        "batch_prediction_items_per_second": batch_prediction_speed(params, paths, rows),
    }
    if cpp:
        result["llama_cpp"] = cpp
        result["served_vs_llama_cpp"] = round(serving["batches"]["items_per_second"] / cpp["items_per_second"], 2)
    print(f"\n{describe(result['machine'])}; {len(rows)} test items; server start-up {serving['startup_seconds']} s")
    print(table(result))
    write_json(RESULTS, result)
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
