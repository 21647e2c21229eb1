"""Argument checks shared by every public constructor (strategy, policies, state, estimator, monitor, codecs).

One convention everywhere: a refused argument raises :class:`ValueError`, a wrong type included, so that one
``except ValueError`` (and LightningCLI, which reports the exception of a failed instantiation) sees every
configuration error, as Lightning's and torchmetrics' constructors do. The message names the argument, what is
accepted and the value received::

    Expected `warmup_steps` to be an integer >= 1 (DDP rebuilds its buckets after step 1), but got 0

``bool`` is not a number here (``True`` is an ``int`` to Python, never a bucket size or a step count), ``nan`` is
never accepted and ``inf`` only where a check says so. Each check returns the value it accepted, converted
(``float`` for numbers), so that a constructor reads ``self.slack = check_number("slack", slack, low=0, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from datetime import timedelta
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_instance",
    "check_int",
    "check_mapping",
    "check_number",
    "check_timedelta",
    "refuse",
]

T = TypeVar("T")

_MAX_SHOWN = 80


def _label(name: str) -> str:
    """``name`` in backticks; a name that already has them (``"`prior_errors` value of 'topk'"``) as it is."""
    return name if "`" in name else f"`{name}`"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def refuse(name: str, accepted: str, value: Any, why: str | None = None) -> ValueError:
    """The ``ValueError`` of every check, for checks of their own: ``raise refuse("x", "a list of devices", x)``."""
    reason = f" ({why})" if why else ""
    return ValueError(f"Expected {_label(name)} to be {accepted}{reason}, but got {_shown(value)}")


def _fmt(x: float) -> str:
    return "math.inf" if x == math.inf else ("-math.inf" if x == -math.inf else f"{x:g}")


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_fmt(high)}"
    return ""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(name: str, value: Any, why: str | None = None) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (a string such as ``"no"`` is truthy: refused)."""
    if not isinstance(value, bool):
        raise refuse(name, "a bool", value, why)
    return value


def check_int(
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    allow_none: bool = False,
    integral_float: bool = False,
    why: str | None = None,
) -> int | None:
    """Return ``value`` as an ``int`` if it is an integer in ``[low, high]`` (either bound optional).

    Args:
        name: the argument's name, shown in the message.
        value: what was passed.
        low: smallest accepted value.
        high: largest accepted value.
        allow_none: accept ``None`` (returned as it is).
        integral_float: accept a float with an integral value (``8.0``): checkpoints store decision options as
            floats. ``nan`` and ``inf`` stay refused.
        why: a reason, shown in parentheses after the accepted range.

    Raises:
        ValueError: naming ``name``, if ``value`` is not such an integer.
    """
    if value is None and allow_none:
        return None
    accepted = f"an integer{_range(low, high, False, False)}" + (" or None" if allow_none else "")
    if integral_float and isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise refuse(name, accepted, value, why)
    if (low is not None and value < low) or (high is not None and value > high):
        raise refuse(name, accepted, value, why)
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
    unit: str = "",
    why: str | None = None,
) -> float | None:
    """Return ``value`` as a ``float`` if it is a real number (not a bool) within the bounds.

    Args:
        name: the argument's name, shown in the message.
        value: what was passed.
        low: lower bound (``None``: none).
        high: upper bound (``None``: none).
        low_open: exclude ``low`` itself (``> low`` instead of ``>= low``).
        high_open: exclude ``high`` itself.
        allow_inf: accept ``math.inf`` (and ``-math.inf``) where the bounds do; ``nan`` is always refused.
        allow_none: accept ``None`` (returned as it is).
        unit: what the number counts, in the message ("of seconds").
        why: a reason, shown in parentheses after the accepted range.

    Raises:
        ValueError: naming ``name``, if ``value`` is not such a number.
    """
    if value is None and allow_none:
        return None
    kind = "a number" if allow_inf else "a finite number"
    accepted = f"{kind}{' ' + unit if unit else ''}{_range(low, high, low_open, high_open)}"
    accepted += " or None" if allow_none else ""
    if not _is_real(value):
        raise refuse(name, accepted, value, why)
    x = float(value)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise refuse(name, accepted, value, why)
    if low is not None and (x <= low if low_open else x < low):
        raise refuse(name, accepted, value, why)
    if high is not None and (x >= high if high_open else x > high):
        raise refuse(name, accepted, value, why)
    return x


def check_choice(
    name: str, value: Any, choices: Collection[Any], *, allow_none: bool = False, why: str | None = None
) -> Any:
    """Return ``value`` if it is one of ``choices`` (compared by equality, bools apart from 0 and 1)."""
    if value is None and allow_none:
        return None
    ok = any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise refuse(name, f"one of {listed}" + (" or None" if allow_none else ""), value, why)
    return value


def check_instance(
    name: str,
    value: Any,
    types: type | tuple[type, ...],
    *,
    allow_none: bool = False,
    what: str | None = None,
    why: str | None = None,
) -> Any:
    """Return ``value`` if it is an instance of ``types`` (or ``None`` with ``allow_none``).

    Args:
        what: how the accepted type reads in the message (default: the class names, e.g. "a LinkEstimator").
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, types):
        if what is None:
            classes = types if isinstance(types, tuple) else (types,)
            what = " or ".join(f"{_article(c.__name__)} {c.__name__}" for c in classes)
        raise refuse(name, what + (" or None" if allow_none else ""), value, why)
    return value


def check_mapping(
    name: str,
    value: Any,
    keys: Collection[str] | None = None,
    check_value: Callable[[str, Any], T] | None = None,
    *,
    allow_none: bool = False,
) -> dict[str, T] | None:
    """Return ``value`` as a ``dict`` if it is a mapping with string keys among ``keys`` (any string if ``None``).

    Args:
        check_value: called as ``check_value(label, item)`` for each item; ``label`` names the argument and the key
            (e.g. "`prior_errors` value of 'topk'") for the message of a ``check_*`` function; what it returns is
            kept.
        allow_none: accept ``None`` (returned as it is).

    Raises:
        ValueError: naming ``name``, for a value that is not a mapping, an unknown key or a bad item.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise refuse(name, "a mapping (dict)" + (" or None" if allow_none else ""), value)
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or (keys is not None and key not in keys):
            accepted = "strings" if keys is None else "among " + ", ".join(repr(k) for k in keys)
            raise ValueError(f"Expected the keys of {_label(name)} to be {accepted}, but got {_shown(key)}")
        out[key] = item if check_value is None else check_value(f"{_label(name)} value of {key!r}", item)
    return out


def check_timedelta(name: str, value: Any, *, allow_none: bool = False, why: str | None = None) -> timedelta | None:
    """Return ``value`` if it is a ``datetime.timedelta`` longer than zero (or ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    accepted = "a datetime.timedelta > 0" + (" or None" if allow_none else "")
    if not isinstance(value, timedelta) or value <= timedelta(0):
        hint = why
        if _is_real(value):
            seconds = f"timedelta(seconds={value!r})"
            hint = f"{why}; " if why else ""
            hint += f"e.g. {seconds}"
        raise refuse(name, accepted, value, hint)
    return value
