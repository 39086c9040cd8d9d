"""The course's curation steps: scrubbing, word caps, the balanced sample; and split_data using them."""

import json

from stages import split_data
from stages.common.config import params_from_dict
from stages.common.paths import Paths
from stages.data.curation import balanced, cap_words, scrub


def test_scrub_removes_phrases_punctuation_and_part_numbers():
    text = 'Cordless drill {"Batteries Included?": "Yes"}, model B07XJ8C8F5,, 18V [2 batteries] By Manufacturer'
    assert scrub(text, ['"Batteries Included?": "Yes"', "By Manufacturer"]) == "Cordless drill, model 18V 2 batteries"


def test_short_words_with_digits_stay():
    assert scrub("fits 2019 models, part AB12345 and X1", []) == "fits 2019 models, part and X1"


def test_cap_words():
    assert cap_words("one two three four", 2) == "one two"
    assert cap_words("one two", 0) == "one two"


def test_balanced_caps_each_whole_dollar_price_and_keeps_order():
    rows = [{"text": f"cheap {i}", "price": 9.99} for i in range(10)] + [{"text": "dear", "price": 500.0}]
    kept = balanced(rows, per_price=3, seed=1)
    assert len(kept) == 4 and kept[-1]["text"] == "dear"
    assert kept == sorted(kept, key=rows.index)
    assert balanced(rows, per_price=3, seed=1) == kept
    assert balanced(list(reversed(rows)), per_price=3, seed=1) == list(reversed(kept))  # not order-dependent


def test_split_data_applies_curation_and_counts_drops(tmp_path):
    rows = [
        *[{"text": f"A red lamp number {i} with shade RX{i:05d}", "price": 10.0} for i in range(30)],
        *[{"text": f"A long blue kettle model {i} for tea", "price": 20.0 + i} for i in range(30)],
        {"text": "Lamp", "price": 5.0},
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = {"source": "items.jsonl", "scrub": True, "min_text_words": 3, "max_text_words": 6,
            "balance_per_price": 5, "test_fraction": 0.15, "val_fraction": 0.15, "n_train": -1}  # fmt: skip
    result = split_data.run(params_from_dict({"data": data}), Paths.at(tmp_path))
    assert result.dropped == {"text_too_few_words": 1, "balanced_sample_cap": 25}
    texts = [json.loads(line)["text"] for line in (tmp_path / "data" / "splits" / "train.jsonl").open()]
    assert all("RX" not in t and len(t.split()) <= 6 for t in texts)
    assert sum(t.startswith("A red lamp") for t in texts) <= 5
