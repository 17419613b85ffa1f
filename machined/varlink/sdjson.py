"""JSON numbers as systemd 262's sd-json reads them: the same double for the same text.

sd-json does not round a number's text to the nearest double (as Python's ``float()`` and
``strtod()`` do): it builds it from doubles, digit by digit. The integer part and the digits
after the point are each accumulated as ``10.0 * acc + digit``, the point's divisor as
``10.0 * shift`` once per digit, the exponent likewise as a double; the value is then
``±(x + y / shift) * exp10(±exponent)``, each operation rounded on its own. So
``1.234560000000000000000e+05`` (what ``varlinkctl`` sends for ``123456.0``: sd-json writes a
real as ``%.21e``) is ``(1 + 2.3456e20 / 1e21) * 1e5``, which is 123456.00000000001, not an
integer (262 refuses it where an integer is declared; so about one integral value in seven
written so); ``123456.0`` as written is ``(123456 + 0 / 10) * 1``, which is one.

A number without point or exponent is an integer: a signed one (64 bits) if it starts with
``-``, else an unsigned one (64 bits); one that does not fit is a real, its value the
accumulated ``x`` (not the nearest double either). A real that is infinite (``1e400``) or
not a number (``0e400``: 0 × ∞) is ``null``; a zero real loses its sign.

``exp10()`` is glibc's; for integral arguments it is correctly rounded but at a few
exponents (measured on the Debian forky root of the 262 sandbox, glibc 2.43: ``exp10(n) !=
1e<n>`` for n in -340..330 only at -163, 23, 126 and 210), whose results are kept here.
"""

from __future__ import annotations

import math

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


def _accumulate(digits: str) -> float:
    """``acc = 10.0 * acc + digit`` over *digits*, in doubles."""
    if len(digits) <= 15:  # (< 10^15 < 2^53: each step exact)
        return float(int(digits))
    digits = digits.lstrip("0")  # (leading zeros add nothing)
    if len(digits) > 310:  # (past 10^309: infinite by then, however long)
        return math.inf
    acc = 0.0
    for d in digits:
        acc = 10.0 * acc + (ord(d) - 48)
    return acc


def _shifts() -> list[float]:
    out = [1.0]
    while not math.isinf(out[-1]):
        out.append(10.0 * out[-1])
    return out


_SHIFT = _shifts()  # (10.0 * shift, once per fraction digit: exact to 10^22, then rounded each time)

# glibc 2.43's exp10() where it is not the nearest double to 10^n (n in -340..330).
_EXP10_GLIBC = {
    -163: float.fromhex("0x1.708d0f84d3de8p-542"),
    23: float.fromhex("0x1.52d02c7e14af7p+76"),
    126: float.fromhex("0x1.7a2ecc414a040p+418"),
    210: float.fromhex("0x1.8557f31326bbcp+697"),
}


def _exp10(n: float) -> float:
    """glibc's exp10() of an integral double."""
    if n > 400:
        return math.inf
    if n < -400:
        return 0.0
    k = int(n)
    return _EXP10_GLIBC.get(k) or float(f"1e{k}")


def real(text: str) -> float | None:
    """The double sd-json makes of a JSON number *text* with a fraction or an exponent
    (Python's json hands exactly those to ``parse_float``); None where sd-json makes it null."""
    negative = text.startswith("-")
    body = text[1:] if negative else text
    mantissa, e, exponent_text = body.replace("E", "e").partition("e")
    whole, _point, fraction = mantissa.partition(".")
    x = _accumulate(whole)
    value = x
    if fraction:
        y = _accumulate(fraction)
        shift = _SHIFT[len(fraction)] if len(fraction) < len(_SHIFT) else math.inf
        value = x + y / shift
    value = (-1.0 if negative else 1.0) * value
    if e:
        exponent_negative = exponent_text.startswith("-")
        exponent = _accumulate(exponent_text.lstrip("+-"))
        value = value * _exp10(-exponent if exponent_negative else exponent)
    if math.isinf(value) or math.isnan(value):
        return None
    return value if value != 0.0 else 0.0


def integer(text: str) -> int | float | None:
    """A JSON number without fraction or exponent as sd-json keeps it: an int if it fits 64 bits
    (signed if negative, else unsigned), else the real it accumulated (None: null, if infinite)."""
    if len(text) <= 21:  # (longer cannot fit: JSON has no leading zeros)
        value = int(text)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    negative = text.startswith("-")
    x = (-1.0 if negative else 1.0) * _accumulate(text[1:] if negative else text)
    return None if math.isinf(x) else x
