"""Valid values, declared once beside each field and checked at the boundary, before anything is read or written.

A :class:`Rule` sits in a schema field's metadata (``field(default=1, metadata=rule(ge=1))``) or in a loss method's
``param_rules``; :func:`coerce` checks a value's type and :meth:`Rule.problem` its range. :func:`build` applies both
to every field of a run, a recipe or a command's options (:func:`validated`), so no command keeps a list of its own
checks. Every float must be finite (NaN and infinity are refused everywhere).
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import functools
import inspect
import itertools
import math
import numbers
import operator
import os
import re
import stat
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import DistillError

T = TypeVar("T")
NUMBER_TEXT = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")  # a plain decimal
EXPONENT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")
MAX_INT = 2**31 - 1
MAX_NAME_BYTES = 250  # filesystems take 255 bytes in a name; a taken run name gets a number after it (exp2)
DEVICE_PATTERN = re.compile(r"(|auto|cpu|cuda|gpu|cuda:\d+|\d+(,\d+)*)")


@dataclass(frozen=True)
class Rule:
    """Bounds (``ge``/``gt``/``le``/``lt``) for numbers; ``choices`` (a tuple, or a function giving one) for strings;
    ``name``: a plain file or folder name (no path separators, not ``.``/``..``); ``check``: any other test, returning
    what is wrong or None; ``text``: how that test is described."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    ignore_case: bool = False
    name: bool = False
    check: Callable[[Any], str | None] | None = None
    text: str = ""

    def valid_choices(self) -> tuple[str, ...]:
        choices = self.choices() if callable(self.choices) else self.choices
        return tuple(choices or ())

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (already of the field's type), or None."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._number_problem(value)
        if isinstance(value, str):
            return self._text_problem(value)
        return self.check(value) if self.check else None

    def _number_problem(self, value: float) -> str | None:
        bounds = (self.ge, self.gt, self.le, self.lt)
        if any(b is not None for b in bounds) and not (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        ):
            return f"must be {self.describe()}"
        return self.check(value) if self.check else None

    def _text_problem(self, value: str) -> str | None:
        choices = self.valid_choices()
        if choices:
            fold = str.lower if self.ignore_case else str
            if fold(value) not in {fold(c) for c in choices}:
                return f"must be {self.describe()}"
        if self.name and (not value.strip() or value in (".", "..") or re.search(r"[/\\\0]", value)):
            return "must be a plain name (no '/', not '.' or '..'), so that it stays inside its folder"
        if self.name and len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:  # not after the models load
            return f"must be at most {MAX_NAME_BYTES} bytes long (a folder name, with room for a number after it)"
        return self.check(value) if self.check else None

    def summary(self) -> str:
        """For documentation: ``text`` where given (a long or version-dependent list), else :meth:`describe`."""
        bounds = Rule(self.ge, self.gt, self.le, self.lt).describe()
        return "; ".join(p for p in (bounds, self.text) if p) if self.text else self.describe()

    def describe(self) -> str:
        """The valid values in words: '>= 1', 'in (0, 1]', 'one of: a, b', ..."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        parts = []
        if low and high:
            parts.append(f"in {low}, {high}")
        elif low:
            parts.append(f"{'>=' if self.ge is not None else '>'} {low[1:]}")
        elif high:
            parts.append(f"{'<=' if self.le is not None else '<'} {high[:-1]}")
        if self.valid_choices():
            case = " (any case)" if self.ignore_case else ""
            parts.append(f"one of: {', '.join(self.valid_choices())}{case}")
        if self.name:
            parts.append("a plain name")
        if self.text and self.check:
            parts.append(self.text)
        return "; ".join(parts)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def rule(**kwargs: Any) -> dict[str, Rule]:
    """Field metadata: ``field(default=1, metadata=rule(ge=1))``."""
    return {"rule": Rule(**kwargs)}


def coerce(tp: type, value: Any, where: str) -> Any:
    """``value`` as a bool, int, float or str (YAML and --set give ints for floats and numbers for strings)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DistillError(f"'{where}' must be true or false, got {shown(value)}")
    if tp in (int, float):
        if isinstance(value, str) and EXPONENT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads an exponent without a dot (1e9, 2e-5) as a string
        if not is_number(value):
            plain = value.replace("_", "") if isinstance(value, str) and "_" in value else ""  # --set epochs=1_000
            hint = f" (write {plain}, without underscores)" if NUMBER_TEXT.fullmatch(plain) else ""
            raise DistillError(f"'{where}' must be a number, got {shown(value)}{hint}")
        value = int(value) if isinstance(value, numbers.Integral) else float(value)  # numpy's scalars too
        if tp is int:  # a float that is whole (1e3, 8.0) is taken; the bound keeps counts within C integers
            if isinstance(value, float) and not value.is_integer():
                raise DistillError(f"'{where}' must be a whole number, got {shown_number(value)}")
            if abs(value) > MAX_INT:
                raise DistillError(f"'{where}' must be a whole number within ±{MAX_INT}, got {shown_number(value)}")
            return int(value)
        if abs(value) > 1e300 or not math.isfinite(value):  # (checked in this order: a huge int overflows a float)
            raise DistillError(f"'{where}' must be a finite number within ±1e300, got {shown_number(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not (isinstance(value, str) or is_number(value)):
            raise DistillError(f"'{where}' must be text, got {shown(value)}")
        return str(value)
    return value


def is_number(value: Any) -> bool:
    """An int or a float, numpy's included; not a bool (True is an int to Python, not a number to a user)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def close_or_known(name: str, known: Iterable[str]) -> str:
    """What to suggest for an unknown name: the known one it is closest to, else all of them."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"


F = TypeVar("F", bound=Callable[..., Any])


def api_function(function: F) -> F:
    """A function of the Python API whose arguments are checked against its signature on each call: an unknown
    keyword or a missing or extra argument raises a DistillError naming the function, as ``train`` does for an
    unknown setting, not Python's TypeError."""
    signature = inspect.signature(function)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        unknown = next((key for key in kwargs if key not in signature.parameters), None)
        if unknown is not None and not open_ended:
            hint = close_or_known(unknown, signature.parameters)
            raise DistillError(f"{function.__name__}(): unknown argument {shown(unknown)}; {hint}")
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            takes = ", ".join(name for name, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD)
            raise DistillError(f"{function.__name__}(): {e}; it takes ({takes})") from None
        return function(*args, **kwargs)

    return typing.cast(F, checked)


def check_function(value: Any, where: str, shape: str, arity: int) -> None:
    """A callback argument of the Python API: None or something to call with ``arity`` positional arguments, said
    before any work (a lambda of the wrong shape failed with a TypeError once the work had started)."""
    if value is None:
        return
    if not callable(value):
        raise DistillError(f"'{where}' must be a function {shape} or None, got {shown(value)}")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin without a readable signature: called as it is
        return
    try:
        signature.bind(*[None] * arity)
    except TypeError as e:
        called = f"{arity} argument{'s' * (arity != 1)}"
        raise DistillError(f"'{where}' must be a function {shape}: it is called with {called} ({e})") from None


def shown(value: Any) -> str:
    """A value for a one-line message: its repr where short; a long text cut, with its length; any other long
    value by its type (a whole Recipe would fill the screen)."""
    if not fits_a_line(value):  # YAML aliases make 400-byte values whose repr would not fit in memory: not built
        return f"a {type(value).__name__}"
    text = repr(value)
    if len(text) <= 80:
        return text
    if isinstance(value, str):
        return f"{text[:60]}... ({len(value)} characters)"
    return f"a {type(value).__name__}"


def fits_a_line(value: Any, depth: int = 0, budget: list[int] | None = None) -> bool:
    """False where ``value``'s repr surely exceeds 80 characters: over 40 levels deep or over 80 items in all
    (each takes a bracket or a comma); found without building it, stopping at the first excess."""
    budget = [80] if budget is None else budget
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        return True
    is_dict = isinstance(value, dict)
    budget[0] -= len(value) * (2 if is_dict else 1)  # counted before anything is copied or visited
    if depth >= 40 or budget[0] < 0:
        return False
    items = itertools.chain(value.keys(), value.values()) if is_dict else value
    return all(fits_a_line(item, depth + 1, budget) for item in items)


def path_too_long(path: object) -> str:
    """The one line for a path longer than the filesystem takes (ENAMETOOLONG): a value the user gave."""
    return f"a path is longer than this system takes: {shown(str(path))}"


# what pathlib's exists() and is_file() read as "nothing there"
NOTHING_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF)


def found(path: str | os.PathLike) -> os.stat_result | None:
    """What is at a path the user gave, or None where nothing usable is (missing, a symlink loop, a name with a NUL
    byte), as pathlib reads them. A name longer than the system takes is bad input, not a missing file: before Python
    3.14 pathlib raises it as an OSError, from 3.14 it reads it as missing; here it is a ``DistillError``. Any other
    error (no permission) is raised as it is."""
    try:
        return os.stat(path)
    except ValueError:  # a NUL byte, or a name the filesystem's encoding cannot hold
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise DistillError(path_too_long(path)) from e
        if e.errno in NOTHING_THERE:
            return None
        raise


def is_file(path: str | os.PathLike) -> bool:
    """A regular file (or a link to one) at a path the user gave; see ``found``."""
    return (status := found(path)) is not None and stat.S_ISREG(status.st_mode)


def is_dir(path: str | os.PathLike) -> bool:
    """A folder (or a link to one) at a path the user gave; see ``found``."""
    return (status := found(path)) is not None and stat.S_ISDIR(status.st_mode)


def not_a_file(path: str | os.PathLike) -> str:
    """Why a file the user named cannot be read as one: a folder there, or nothing."""
    return "is a folder, not a file" if is_dir(path) else "not found"


def shown_number(value: float) -> str:
    """A number for a message: as it is, or its length where it would fill the line (or exceed Python's limit on
    the digits of an int it will print)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a number of about {math.floor((abs(value).bit_length() - 1) * math.log10(2)) + 1} digits"
    return str(value)


def checked(tp: type, value: Any, where: str, field_rule: Rule | None) -> Any:
    """``value`` coerced to ``tp`` and checked against ``field_rule``; a DistillError naming ``where`` otherwise."""
    if tp is str and isinstance(value, bool) and field_rule and field_rule.text:  # keep_start: true is no "text"
        raise DistillError(f"'{where}' must be {field_rule.summary()}, got {shown(value)}")
    value = coerce(tp, value, where)
    problem = field_rule.problem(value) if field_rule else None
    if problem:
        raise DistillError(f"'{where}' {problem}, got {shown(value)}")
    return value


def device_problem(value: str) -> str | None:
    if not DEVICE_PATTERN.fullmatch(value.strip().lower()):
        return "is not a device: use cpu, cuda, 0, 1, cuda:1 or a list such as 0,1"
    return None


def layers_problem(value: Any) -> str | None:
    """A layer group name or a non-empty list of layer indices >= 0."""
    from .features import LAYER_GROUPS  # late: features imports torch

    if isinstance(value, str):
        return None if value in LAYER_GROUPS else f"must be one of: {', '.join(LAYER_GROUPS)}, or a list of indices"
    if isinstance(value, list) and value and all(type(i) is int and i >= 0 for i in value):
        twice = sorted({i for i in value if value.count(i) > 1})
        return f"lists layer {twice[0]} twice (its pair would be distilled twice)" if twice else None
    return "must be a layer group name or a non-empty list of layer indices (whole numbers >= 0)"


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        return functools.reduce(operator.or_, args), True
    return tp, False


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys, wrong types and values outside a field's rule are
    errors naming the key's path."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistillError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be ints beside strings
    if unknown:
        raise DistillError(f"unknown key '{_join(where, unknown[0])}'; valid keys: {', '.join(fields)}")
    kwargs = {k: _coerce(hints[k], v, _join(where, k), fields[k].metadata.get("rule")) for k, v in data.items()}
    return cls(**kwargs)


def validated(cls: type[T], values: dict[str, Any]) -> T:
    """Options dataclass ``cls`` from ``values`` (a function's ``locals()``: names that are no field are ignored),
    every field checked against its rule. Each command calls this first, before it reads or writes anything."""
    names = {f.name for f in dataclasses.fields(cls)}
    return build(cls, {k: v for k, v in values.items() if k in names}, "")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str, field_rule: Rule | None = None) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)  # None: the section's defaults
    if value is None:
        raise DistillError(f"'{where}' needs a value")
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise DistillError(f"'{where}' must be a mapping")
        return {k: _coerce(typing.get_args(tp)[1], v, _join(where, str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if origin is list:  # list[str]: one or more paths
        items = value if isinstance(value, (list, tuple)) else [value]
        value = [checked(typing.get_args(tp)[0], v, where, None) for v in items]
    elif tp in (bool, int, float, str):
        return checked(tp, value, where, field_rule)
    elif isinstance(value, list) and all(isinstance(i, numbers.Integral) and is_number(i) for i in value):
        value = [int(i) for i in value]  # str | list[int]: a list of layer indices (numpy's ints too)
    elif not isinstance(value, str):  # ... or a layer group
        raise DistillError(f"'{where}' must be a layer group name or a list of layer indices, got {shown(value)}")
    problem = field_rule.problem(value) if field_rule else None
    if problem:
        raise DistillError(f"'{where}' {problem}, got {shown(value)}")
    return value
