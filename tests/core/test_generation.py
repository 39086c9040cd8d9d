import pytest

from stages.core.generation import number_complete


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("", False),
        ("Price", False),
        ("99", False),
        ("99.", False),
        ("99.00", False),
        ("99.00\n", True),
        ("1.20.", True),
        ("1,234.50 dollars", True),
        ("about 12 ", True),
    ],
)
def test_number_complete(text, complete):
    assert number_complete(text) is complete
