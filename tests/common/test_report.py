from stages.common.report import comparison_markdown, comparison_table

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
    assert "| fine-tuned adapter | $864.04 | [760, 976] | 0.266 | 55.0% | 0 |" in table
    assert table.splitlines()[0] == "| model | avg error | 95% interval | RMSLE | hit rate | unparsed |"


def test_data_markdown_lists_drops_and_hashes():
    from stages.common.report import data_markdown

    data = {
        "source": "data/raw/items.csv", "shape": "price", "rows_in": 95, "rows_kept": 90, "rows_dropped": 5,
        "dropped": {"price_not_numeric": 4, "text_empty": 1, "row_too_long": 0},
        "dropped_examples": {"price_not_numeric": ["items.csv:7: field 'price': 'n|a' is not a number"]},
        **{name: {"n": 30, "sha256": name * 8} for name in ("train", "val", "test")},
    }  # fmt: skip
    table = data_markdown(data)
    assert "`data/raw/items.csv` (price): 95 rows in, 90 kept, 5 dropped." in table
    assert "| price_not_numeric | 4 | items.csv:7: field 'price': 'n\\|a' is not a number |" in table
    assert "| text_empty | 1 |  |" in table and "row_too_long" not in table
    assert "| test | 30 | `testtesttesttesttesttesttesttest` |" in table
