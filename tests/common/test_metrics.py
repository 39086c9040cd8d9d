import math

import pytest

from stages.common.metrics import GREEN, ORANGE, RED, band, price_metrics


@pytest.mark.parametrize(
    ("truth", "prediction", "expected"),
    [
        (100, 139, GREEN),  # under $40
        (1000, 1190, GREEN),  # under 20%
        (100, 179, ORANGE),  # under $80
        (1000, 1390, ORANGE),  # under 40%
        (100, 181, RED),
        (1000, 1500, RED),
    ],
)
def test_course_bands(truth, prediction, expected):
    assert band(truth, prediction) == expected


def test_metrics_by_hand():
    m = price_metrics([100.0, 200.0], [110.0, 100.0])
    assert m["avg_error"] == pytest.approx(55.0)
    expected_rmsle = math.sqrt(((math.log(111) - math.log(101)) ** 2 + (math.log(101) - math.log(201)) ** 2) / 2)
    assert m["rmsle"] == pytest.approx(expected_rmsle)
    assert m["hit_rate"] == 0.5 and m["red_rate"] == 0.5
    assert m["mse"] == pytest.approx((100 + 10000) / 2)
    assert m["r2"] == pytest.approx(1 - (100 + 10000) / 5000)


def test_unparsed_predictions_count_and_score_as_zero():
    m = price_metrics([100.0, 100.0], [None, 100.0])
    assert m["unparsed"] == 1
    assert m["avg_error"] == pytest.approx(50.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        price_metrics([1.0], [])
