"""JSON numbers read as systemd 262's sd-json reads them (machined/varlink/sdjson.py), pinned to
what real systemd-machined 262 answered (tests/unit/data/sdjson_real262.json, measured with raw
calls in a 262 sandbox): an integral number written as ``varlinkctl`` writes it
(``%.21e``: ``2.003500000000000000000e+04``) is, for about one value in seven, not an integer to
sd-json (its digits are summed in doubles, not rounded once), and 262 refuses it where an
integer is declared; written ``20035.0`` it always is one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from machined.varlink import sdjson
from machined.varlink.server import decode

DATA = json.loads((Path(__file__).parent / "data" / "sdjson_real262.json").read_text())
FORMS = {
    "{n}.0": lambda n: f"{n}.0",
    "{n:.21e}": lambda n: f"{n:.21e}",
    "{n:.17e}": lambda n: f"{n:.17e}",
    "{n:.16e}": lambda n: f"{n:.16e}",
    "{n}e0": lambda n: f"{n}e0",
    "{n}0e-1": lambda n: f"{n}0e-1",
    "{n}00e-2": lambda n: f"{n}00e-2",
    "{s[0]}.{s[1:]}e{len(s)-1}": lambda n: f"{str(n)[0]}.{str(n)[1:] or '0'}e{len(str(n)) - 1}",
    "0.{n}e{len(s)}": lambda n: f"0.{n}e{len(str(n))}",
    "{n}.000000000000000000000000": lambda n: f"{n}.000000000000000000000000",
}


def _number(text: str) -> Any:
    return decode(b'{"pid":{"pid":' + text.encode() + b"}}")["pid"]["pid"]


def _integral(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


@pytest.mark.parametrize("form", sorted(DATA["forms"]))
def test_integral_reals_as_real_262_judged_them(form: str) -> None:
    write = FORMS[form]
    tested, refused = DATA["forms"][form]["tested"], set(DATA["forms"][form]["refused"])
    ours = {n for n in tested if not _integral(_number(write(n)))}
    assert sorted(ours) == sorted(refused)
    assert all(abs(_number(write(n)) - n) <= 1e-6 * n for n in tested)  # (off by an ulp or so, no more)


def test_varlinkctl_form_is_refused_often_and_the_plain_form_never() -> None:
    assert len(DATA["forms"]["{n:.21e}"]["refused"]) > 40
    assert DATA["forms"]["{n}.0"]["refused"] == []
    # the values of test_process_lookups_as_262's fixed lookups, as 262 judged them
    assert not _integral(_number("1.234560000000000000000e+05"))  # (123456.00000000001)
    assert not _integral(_number("1.329400000000000000000e+04"))
    assert _integral(_number("2.003500000000000000000e+04"))  # (the PID of the manual run: accepted)
    assert _integral(_number("123456.0")) and _integral(_number("13294.0"))


@pytest.mark.parametrize(("method", "text", "answer"), DATA["calls"], ids=lambda x: str(x)[:40])
def test_other_calls_as_real_262_judged_them(method: str, text: str, answer: str) -> None:
    """Signals and UIDs (small or exact: integral, refused only when out of range) and the
    edges: infinite reals are null, past 64 bits a real, 0.0 and -0.0 the real zero."""
    value = _number(text)
    if "InvalidParameter" not in answer:
        assert _integral(value)
    elif _integral(value):  # (refused for its range, not for being no integer)
        assert value > 0xFFFFFFFF or value == 65535 or value < 0 or isinstance(value, float) and value > 2**63
    else:
        assert value is None or not _integral(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e400", None),  # (infinite: null)
        ("-1e400", None),
        ("0e400", None),  # (0 × ∞: not a number, null)
        ("0." + "0" * 400 + "1", 0.0),
        ("1" * 400, None),
        ("1" * 400 + ".5", None),
        ("1e-400", 0.0),
        ("-0.0", 0.0),
        ("0.1", 0.1),
        ("1.5", 1.5),
        ("2.003500000000000000000e+04", 20035.0),
        ("1.234560000000000000000e+05", 123456.00000000001),
        ("1.038660000000000000000e+05", 103865.99999999999),
        ("18446744073709551615", 18446744073709551615),
        ("18446744073709551616", 1.8446744073709552e19),  # (past 64 bits: the real accumulated)
        ("-9223372036854775808", -9223372036854775808),
        ("-9223372036854775809", -9.223372036854778e18),  # (not the nearest double, -9.223372036854776e18)
        ("1e23", float.fromhex("0x1.52d02c7e14af7p+76")),  # (glibc's exp10(23), one ulp above 1e23)
        ("1e22", 1e22),
        ("1E+0", 1.0),
        ("1e0000000000000000000000000000001", 10.0),
    ],
)
def test_edges(text: str, value: Any) -> None:
    got = _number(text)
    assert got == value and type(got) is type(value)
    if value == 0.0:
        assert math.copysign(1.0, got) == 1.0  # (a zero real loses its sign)


def test_plain_integers_untouched() -> None:
    assert decode(b'{"a":[1,-1,0,4194304,18446744073709551615]}') == {"a": [1, -1, 0, 4194304, 18446744073709551615]}
    assert sdjson.integer("-0") == 0


def test_252_keeps_the_nearest_doubles() -> None:
    assert decode(b'{"a":1.234560000000000000000e+05}', as_252=True) == {"a": 123456.0}
    assert decode(b'{"a":1.234560000000000000000e+05}') == {"a": 123456.00000000001}


def test_long_numbers_are_quick() -> None:
    import time

    start = time.monotonic()
    for text in ("9" * 1_000_000, "0." + "0" * 1_000_000 + "1", "1." + "1" * 1_000_000, "1e" + "0" * 1_000_000 + "5"):
        _number(text)
    assert time.monotonic() - start < 2
