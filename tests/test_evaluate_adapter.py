"""evaluate_adapter: the adapter and three baselines on one test set, every item accounted for, chart and plot
written, and the same rows again for any adapter folder (how record_run re-scores an old champion)."""

import json

from stages.common.io import read_jsonl
from stages.common.metrics import price_metrics


def test_four_rows_scored_on_the_same_test_set(pipeline_project):
    paths, _, _ = pipeline_project
    metrics = json.loads(paths.eval_metrics.read_text())
    n_test = len(read_jsonl(paths.split("test")))
    for key in ("adapter", "base_zero_shot", "tfidf_ridge", "mean_baseline"):
        assert metrics[key]["n"] == n_test
        assert set(metrics[key]) >= {"avg_error", "rmsle", "hit_rate", "mse", "r2", "unparsed"}
    assert metrics["mean_baseline"]["unparsed"] == metrics["tfidf_ridge"]["unparsed"] == 0
    assert metrics["items_per_second"] > 0


def test_the_tfidf_baseline_is_fit_on_train_and_scored_item_by_item(pipeline_project):
    from stages.evaluation.baselines import tfidf_ridge

    paths, params, _ = pipeline_project
    rows = read_jsonl(paths.predictions)
    train, test = read_jsonl(paths.split("train")), read_jsonl(paths.split("test"))
    assert [r["tfidf_prediction"] for r in rows] == tfidf_ridge(train, test)
    truths = [r["truth"] for r in rows]
    expected = price_metrics(truths, [r["tfidf_prediction"] for r in rows], params.evaluate.bootstrap_samples)
    assert json.loads(paths.eval_metrics.read_text())["tfidf_ridge"] == expected


def test_an_adapter_folder_is_rescored_to_the_rows_evaluation_wrote(pipeline_project):
    from stages.evaluate_adapter import adapter_rows

    paths, params, _ = pipeline_project
    written = read_jsonl(paths.predictions)
    again = adapter_rows(params, paths, paths.adapter)
    fields = ("text", "truth", "adapter_output", "adapter_prediction", "band")
    assert [{k: r[k] for k in fields} for r in again] == [{k: r[k] for k in fields} for r in written]
    assert all(r["base_prediction"] is None for r in again)  # the base and baselines are not re-run


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


def test_item_lines_follow_the_course_tester():
    from stages.evaluation.prices import item_lines

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

    from stages.evaluation.prices import predict_prices

    paths, params, _ = pipeline_project
    cfg = dataclasses.replace(params.evaluate, topk_estimate=True)
    rows = [{"text": "A red lamp, model 1, size 3 cm.", "price": 123456.0}]
    predicted = predict_prices(paths, dataclasses.replace(params, evaluate=cfg), rows, paths.adapter)
    assert predicted.topk is None and len(predicted.adapter) == 1
    assert "evaluate.topk_estimate skipped" in capsys.readouterr().out
