"""Kubernetes quantities: the grammar of k8s.io/apimachinery ``resource.Quantity``."""

from __future__ import annotations

from decimal import Decimal

import pytest

from libshared.quantities import parse_quantity

# --- numbers and plain decimals ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, Decimal(0)),
        (2, Decimal(2)),
        (4000, Decimal(4000)),
        (1.5, Decimal("1.5")),
        ("2", Decimal(2)),
        ("4000", Decimal(4000)),
        ("0.25", Decimal("0.25")),
        (".5", Decimal("0.5")),
        ("+3", Decimal(3)),
        ("-7", Decimal(-7)),
        (" 12 ", Decimal(12)),
    ],
)
def test_plain_numbers_are_read_as_their_value(value: object, expected: Decimal) -> None:
    assert parse_quantity(value) == expected


# --- suffixes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1k", Decimal(1000)),
        ("3M", Decimal(3) * 10**6),
        ("2G", Decimal(2) * 10**9),
        ("1T", Decimal(10**12)),
        ("500m", Decimal("0.5")),
        ("250u", Decimal("0.00025")),
        ("7n", Decimal("7e-9")),
    ],
)
def test_decimal_suffixes_are_powers_of_ten(value: str, expected: Decimal) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1Ki", Decimal(1024)),
        ("512Mi", Decimal(512 * 1024 * 1024)),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("2Ti", Decimal(2 * 2**40)),
        ("1Ei", Decimal(2**60)),
    ],
)
def test_binary_suffixes_are_powers_of_1024(value: str, expected: Decimal) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("25e-2", Decimal("0.25")),
        ("2e+1", Decimal(20)),
    ],
)
def test_a_decimal_exponent_scales_the_number(value: str, expected: Decimal) -> None:
    assert parse_quantity(value) == expected


def test_a_bare_capital_e_is_the_exa_suffix_not_an_exponent() -> None:
    assert parse_quantity("2E") == Decimal(2) * 10**18


def test_kilo_and_kibi_differ() -> None:
    assert parse_quantity("1Ki") - parse_quantity("1k") == 24


# --- rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "   ", "abc", "1kk", "--1", "1KiB", "k", "1 k", "1e", "0x10", True, False, None, [1]],
)
def test_anything_that_is_not_a_quantity_raises_value_error_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match="not a quantity") as info:
        parse_quantity(value)
    assert repr(value) in str(info.value)


def test_an_exponent_too_large_for_decimal_raises_value_error() -> None:
    # The docstring promises ValueError for anything that is not a usable quantity; an
    # overflowing exponent must not escape as decimal.Overflow (an ArithmeticError).
    with pytest.raises(ValueError):
        parse_quantity("1e9999999999")


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_not_quantities(value: float) -> None:
    # JSON decoders such as Python's json (used for webhook bodies) accept Infinity and
    # NaN; no Kubernetes quantity is infinite, so they must be rejected here.
    with pytest.raises(ValueError):
        parse_quantity(value)
