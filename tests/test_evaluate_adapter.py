"""evaluate_adapter: three rows on one test set, every item accounted for, chart and plot written."""

import json

from stages.common.io import read_jsonl
from stages.common.metrics import price_metrics


def test_three_rows_scored_on_the_same_test_set(pipeline_project):
    paths, _, _ = pipeline_project
    metrics = json.loads(paths.eval_metrics.read_text())
    for key in ("adapter", "base_zero_shot", "mean_baseline"):
        assert metrics[key]["n"] == 12
        assert set(metrics[key]) >= {"avg_error", "rmsle", "hit_rate", "mse", "r2", "unparsed"}
    assert metrics["mean_baseline"]["unparsed"] == 0
    assert metrics["items_per_second"] > 0


def test_predictions_account_for_every_item_including_unparsed(pipeline_project):
    paths, params, _ = pipeline_project
    rows = read_jsonl(paths.predictions)
    test = read_jsonl(paths.split("test"))
    assert [r["text"] for r in rows] == [r["text"] for r in test]
    metrics = json.loads(paths.eval_metrics.read_text())
    assert metrics["adapter"]["unparsed"] == sum(r["adapter_prediction"] is None for r in rows)
    samples = params.evaluate.bootstrap_samples
    recomputed = price_metrics([r["truth"] for r in rows], [r["adapter_prediction"] for r in rows], samples)
    assert recomputed == metrics["adapter"]
    assert metrics["adapter"]["avg_error_ci_low"] <= metrics["adapter"]["avg_error"]
    assert metrics["adapter"]["avg_error"] <= metrics["adapter"]["avg_error_ci_high"]


def test_mean_baseline_uses_the_training_mean(pipeline_project):
    paths, _, _ = pipeline_project
    train = read_jsonl(paths.split("train"))
    mean = sum(r["price"] for r in train) / len(train)
    truths = [r["price"] for r in read_jsonl(paths.split("test"))]
    expected = price_metrics(truths, [mean] * len(truths), 1000)
    assert json.loads(paths.eval_metrics.read_text())["mean_baseline"] == expected


def test_chart_and_dvc_plot_are_written(pipeline_project):
    paths, _, _ = pipeline_project
    assert paths.scatter_chart.read_bytes()[:4] == b"\x89PNG"
    header = paths.predictions_plot.read_text().splitlines()[0]
    assert header == "truth,prediction,band"


def test_item_lines_follow_the_course_tester(pipeline_project):
    from stages.evaluate_adapter import item_lines

    rows = [
        {"text": "A red lamp", "truth": 100.0, "adapter_output": "110.00", "adapter_prediction": 110.0,
         "band": "green"},
        {"text": "A kettle", "truth": 100.0, "adapter_output": "n/a", "adapter_prediction": None, "band": "red"},
    ]  # fmt: skip
    plain = item_lines(rows, colour=False)
    assert plain[0].startswith("1: guess $110.00  truth $100.00  error $10.00")
    assert "unparsed: 'n/a'" in plain[1]
    coloured = item_lines(rows, colour=True)
    assert coloured[0].startswith("\033[92m") and coloured[1].startswith("\033[91m")


def test_topk_estimate_is_skipped_with_a_reason_when_prices_are_not_single_tokens(pipeline_project, capsys):
    import dataclasses

    from stages.evaluate_adapter import predict_all

    paths, params, _ = pipeline_project
    cfg = dataclasses.replace(params.evaluate, topk_estimate=True)
    rows = [{"text": "A red lamp, model 1, size 3 cm.", "price": 123456.0}]
    predicted = predict_all(paths, dataclasses.replace(params, evaluate=cfg), rows)
    assert predicted.topk is None and len(predicted.adapter) == 1
    assert "evaluate.topk_estimate skipped" in capsys.readouterr().out
