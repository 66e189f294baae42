import pytest

from sim.units import GB, GiB, TFLOPS, UnitError, parse_quantity


@pytest.mark.parametrize("text, dim, expected", [
    ("450 GB/s", "bytes/s", 450e9),
    ("400 Gb/s", "bytes/s", 50e9),            # NDR InfiniBand: 400 gigabit = 50 gigabyte per second
    ("200Gbps", "bytes/s", 25e9),
    ("80 GiB", "bytes", 80 * 2**30),
    ("16 GB", "bytes", 16e9),
    ("512 MiB", "bytes", 512 * 2**20),
    ("989 TFLOPS", "FLOP/s", 989e12),
    ("2 us", "s", 2e-6),
    ("0.6 µs", "s", 0.6e-6),
    ("1.5 ms", "s", 1.5e-3),
    ("700 W", "W", 700.0),
    (123, "bytes", 123.0),
])
def test_parse_quantity(text, dim, expected):
    assert parse_quantity(text, dim) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text, dim", [("fast", "bytes/s"), ("80 GiB", "bytes/s"), ("3 parsecs", "s"), (True, "s")])
def test_parse_quantity_rejects(text, dim):
    with pytest.raises(UnitError):
        parse_quantity(text, dim)


def test_constants():
    assert GB == 10**9 and GiB == 1073741824 and TFLOPS == 10**12
