"""Standard-library values that cross to and from sandboxed guests as
values (CBOR tag 40016, docs/protocol.md "Values"): dates and times,
``decimal.Decimal`` and ``uuid.UUID``.

Native twins get these as pickles; a sandboxed link carries no pickle, and
without this a guest's datetime reached the master as a proxy (each
attribute a call, ``dt + timedelta(...)`` refused). The wire form is the
type's name among a fixed few, then its fields as ints, strs and bytes,
which the receiver checks and passes to the type's own constructor: no name
is looked up and nothing else is called. Only these exact types: a subclass
(a pandas Timestamp), or a datetime whose tzinfo is not a fixed
``datetime.timezone`` (a ZoneInfo), is not one of them and goes as before.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a twin's start imports no typing)
    from typing import Any, Callable, Dict, List, Optional

#: the modules of the types below: what a value must come from to be one
MODULES = frozenset({"datetime", "decimal", "uuid"})
#: the longest Decimal text and timezone name read (a legitimate Decimal has
#: tens of digits; its constructor's time grows with the text)
MAX_DECIMAL_TEXT = 4300
MAX_ZONE_NAME = 100
#: the largest exponent of a Decimal read, either way, as Python caps the
#: digits of an int's text: ``int()`` of a Decimal of 20 characters such as
#: ``1E+100000000`` holds the GIL while it builds an int of that many digits
#: (27 s for 1E+999999 here), stopping every thread of the master
MAX_DECIMAL_EXPONENT = 4300


def encode(obj: Any) -> Optional[List[Any]]:
    """``[type name, fields...]`` for one of the types here, else None."""
    kind = type(obj)
    module = getattr(kind, "__module__", None)
    if module not in MODULES:
        return None
    name = f"{module}.{kind.__qualname__}"
    if sys.modules.get(module) is None or getattr(sys.modules[module], kind.__qualname__, None) is not kind:
        return None  # (a type that only says it is of that module)
    if name == "datetime.datetime":
        zone = _zone(obj.tzinfo)
        if zone is _OTHER:
            return None
        fields = [obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold]
        return [name, *fields, zone]
    if name == "datetime.date":
        return [name, obj.year, obj.month, obj.day]
    if name == "datetime.time":
        zone = _zone(obj.tzinfo)
        if zone is _OTHER:
            return None
        return [name, obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold, zone]
    if name == "datetime.timedelta":
        return [name, obj.days, obj.seconds, obj.microseconds]
    if name == "datetime.timezone":
        offset, *label = obj.__getinitargs__()  # (a name only if it was given one)
        return [name, offset.days, offset.seconds, offset.microseconds, label[0] if label else None]
    if name == "decimal.Decimal":
        text = str(obj)
        if len(text) > MAX_DECIMAL_TEXT or (obj.is_finite() and abs(obj.adjusted()) > MAX_DECIMAL_EXPONENT):
            return None  # (its receiver would refuse it: a reference, as before)
        return [name, text]
    if name == "uuid.UUID":
        return [name, obj.bytes]
    return None


_OTHER = object()  # a tzinfo that is not a fixed offset


def _zone(tzinfo: Any) -> Any:
    """A tzinfo as it goes: None, a ``datetime.timezone`` (its own tagged
    value), or _OTHER."""
    if tzinfo is None:
        return None
    import datetime

    return tzinfo if type(tzinfo) is datetime.timezone else _OTHER


def decode(value: Any) -> Any:
    """The value a tag 40016 content stands for. Raises ValueError saying what
    is wrong with anything else."""
    if not (type(value) is list and value and type(value[0]) is str):
        raise ValueError("malformed standard-library value: not [type name, fields...]")
    make = _MAKERS.get(value[0])
    if make is None:
        raise ValueError(
            f"unknown standard-library type {value[0][:100]!r} (values of {', '.join(sorted(_MAKERS))} "
            "cross by value)"
        )
    try:
        return make(value[1:])
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"malformed {value[0]} value: {err}") from None


def _ints(fields: List[Any], count: int, what: str) -> List[int]:
    if len(fields) < count or any(type(field) is not int for field in fields[:count]):
        raise TypeError(f"{what} must be {count} ints")
    return fields[:count]


def _given_zone(fields: List[Any], at: int) -> Any:
    import datetime

    if len(fields) != at + 1:
        raise TypeError(f"expected {at + 1} fields, got {len(fields)}")
    zone = fields[at]
    if zone is not None and type(zone) is not datetime.timezone:
        raise TypeError("its tzinfo must be null or a datetime.timezone value")
    return zone


def _datetime(fields: List[Any]) -> Any:
    import datetime

    year, month, day, hour, minute, second, microsecond, fold = _ints(fields, 8, "its fields")
    zone = _given_zone(fields, 8)
    return datetime.datetime(year, month, day, hour, minute, second, microsecond, zone, fold=fold)


def _date(fields: List[Any]) -> Any:
    import datetime

    if len(fields) != 3:
        raise TypeError(f"expected 3 fields, got {len(fields)}")
    return datetime.date(*_ints(fields, 3, "year, month and day"))


def _time(fields: List[Any]) -> Any:
    import datetime

    hour, minute, second, microsecond, fold = _ints(fields, 5, "its fields")
    zone = _given_zone(fields, 5)
    return datetime.time(hour, minute, second, microsecond, zone, fold=fold)


def _timedelta(fields: List[Any]) -> Any:
    import datetime

    if len(fields) != 3:
        raise TypeError(f"expected 3 fields, got {len(fields)}")
    days, seconds, microseconds = _ints(fields, 3, "days, seconds and microseconds")
    return datetime.timedelta(days, seconds, microseconds)


def _timezone(fields: List[Any]) -> Any:
    import datetime

    if len(fields) != 4:
        raise TypeError(f"expected 4 fields, got {len(fields)}")
    offset = datetime.timedelta(*_ints(fields, 3, "days, seconds and microseconds of its offset"))
    label = fields[3]
    if label is None:
        return datetime.timezone(offset)
    if type(label) is not str or len(label) > MAX_ZONE_NAME:
        raise TypeError(f"its name must be null or a str of at most {MAX_ZONE_NAME} characters")
    return datetime.timezone(offset, label)


def _decimal(fields: List[Any]) -> Any:
    import decimal
    import re

    if len(fields) != 1 or type(fields[0]) is not str or len(fields[0]) > MAX_DECIMAL_TEXT:
        raise TypeError(f"expected its text, a str of at most {MAX_DECIMAL_TEXT} characters")
    text = fields[0]
    # only what str(Decimal) writes (Decimal() would also take spaces,
    # underscores and digits of other scripts)
    if not re.fullmatch(r"-?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:E[-+][0-9]+)?|Infinity|s?NaN[0-9]*)", text):
        raise ValueError(f"{text[:100]!r} is not a decimal number as str(Decimal) writes one")
    value = decimal.Decimal(text)
    if value.is_finite() and abs(value.adjusted()) > MAX_DECIMAL_EXPONENT:
        raise ValueError(
            f"its exponent is beyond +-{MAX_DECIMAL_EXPONENT} (a Decimal that large or small crosses as "
            "its text: send str(value))"
        )
    return value


def _uuid(fields: List[Any]) -> Any:
    import uuid

    if len(fields) != 1 or type(fields[0]) is not bytes or len(fields[0]) != 16:
        raise TypeError("expected its 16 bytes")
    return uuid.UUID(bytes=fields[0])


_MAKERS: Dict[str, Callable[[List[Any]], Any]] = {
    "datetime.datetime": _datetime,
    "datetime.date": _date,
    "datetime.time": _time,
    "datetime.timedelta": _timedelta,
    "datetime.timezone": _timezone,
    "decimal.Decimal": _decimal,
    "uuid.UUID": _uuid,
}
