from stages.core.report import comparison_markdown, comparison_table

METRICS = {
    "adapter": {"avg_error": 864.04, "avg_error_ci_low": 760.2, "avg_error_ci_high": 975.9, "rmsle": 0.266,
                "hit_rate": 0.55, "unparsed": 0},
    "base_zero_shot": {"avg_error": 3749.93, "rmsle": 7.029, "hit_rate": 0.0, "unparsed": 3},
    "mean_baseline": {"avg_error": 3027.9, "rmsle": 1.192, "hit_rate": 0.185, "unparsed": 0},
    "items_per_second": 4.5,
}  # fmt: skip


def test_table_rows_in_order_with_interval():
    lines = comparison_table(METRICS).splitlines()
    assert [line.split("  ")[0] for line in lines[2:]] == [
        "fine-tuned adapter",
        "base model, zero-shot",
        "constant mean price",
    ]
    assert "$864.04" in lines[2] and "[760, 976]" in lines[2] and "55.0%" in lines[2]
    assert lines[3].rstrip().endswith("3")


def test_markdown_table():
    table = comparison_markdown(METRICS)
    assert "| fine-tuned adapter | 864.04 | [760, 976] | 0.266 | 55.0% | 0 |" in table
