"""Benchmark: how fast the champion answers when served, and batch prediction against evaluate_adapter.

After `make demo`: saves the workspace's adapter as the MLflow Model record_run logs (serving/pricer.py) into a
scratch folder and serves it with `mlflow models serve --env-manager local` on a loopback port (start-up time
reported separately). Then, over the test items:
- one item per request, `--single` requests in a row: latency p50 and p95, items per second;
- batches of `evaluate.batch_size` items per request, over every test item: latency p50 and p95, items/s;
- batch prediction in this process (serving.pricer, as `python -m serving.predict` runs it), model load left
  out: items per second, against evaluate_adapter's generation of the same items with the same adapter,
  measured just before in the same process.
Writes bench/results/serving_speed.json.

Run: `python -m bench.serving_speed [--single 20]` (or `make bench-serving`).
"""

from __future__ import annotations

import argparse
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


def post(url: str, texts: list[str]) -> float:
    """Seconds one /invocations request for `texts` took."""
    body = json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        json.load(answer)
    return time.perf_counter() - started


def serve(model_dir: Path, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """`mlflow models serve` of `model_dir`; (the process, seconds until /ping answered)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return server, time.perf_counter() - started
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"mlflow models serve stopped:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def latencies(seconds: list[float], items_per_request: int) -> dict:
    return {
        "requests": len(seconds),
        "items_per_request": items_per_request,
        "p50_seconds": round(percentile(seconds, 0.5), 3),
        "p95_seconds": round(percentile(seconds, 0.95), 3),
        "items_per_second": round(items_per_request * len(seconds) / sum(seconds), 2),
    }


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from serving.pricer import Pricer, model_config, save_model
    from stages.common.config import load_params
    from stages.common.io import read_jsonl, write_json
    from stages.common.paths import Paths
    from tests.local_servers import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=20, help="one-item requests to time (default 20)")
    args = parser.parse_args(argv)
    params, paths = load_params("params.yaml"), Paths.at(".")
    texts = [row["text"] for row in read_jsonl(paths.split("test"))]
    size = params.evaluate.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as folder:
        model_dir = Path(folder) / "pricer"
        save_model(model_dir, model_config(params, paths), paths.adapter, read_jsonl(paths.split("test")))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server, startup = serve(model_dir, port, Path(folder) / "serve.log")
        try:
            post(url, texts[:1])  # warm-up: the first request pays for lazy initialisation
            single = [post(url, [t]) for t in texts[: args.single]]
            batched = [post(url, texts[i : i + size]) for i in range(0, len(texts), size)]
        finally:
            server.terminate()
            server.wait(timeout=60)
    from stages.evaluation.prices import predict_prices

    evaluation_ips = predict_prices(
        paths, params, read_jsonl(paths.split("test")), paths.adapter, False
    ).items_per_second
    pricer = Pricer().load(model_config(params, paths), paths.adapter)
    started = time.perf_counter()
    pricer.answers(pd.DataFrame({"text": texts}))
    batch_ips = len(texts) / (time.perf_counter() - started)
    result = {
        "machine": machine(),
        "startup_seconds": round(startup, 1),
        "served_one_item": latencies(single, 1),
        "served_batches": latencies(batched, size),
        "batch_prediction_items_per_second": round(batch_ips, 2),
        "evaluate_adapter_items_per_second": round(evaluation_ips, 2),
    }
    print(f"\n{describe(result['machine'])}; server start-up {result['startup_seconds']} s")
    for name in ("served_one_item", "served_batches"):
        r = result[name]
        print(
            f"{name}: {r['requests']} requests of {r['items_per_request']}, p50 {r['p50_seconds']} s, "
            f"p95 {r['p95_seconds']} s, {r['items_per_second']} items/s"
        )
    print(
        f"batch prediction: {result['batch_prediction_items_per_second']} items/s; evaluate_adapter's adapter: "
        f"{result['evaluate_adapter_items_per_second']} items/s"
    )
    write_json(RESULTS, result)
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
