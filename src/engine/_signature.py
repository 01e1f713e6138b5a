"""Binding a call's arguments to a task's parameters, validated with msgspec.

Validation happens when a task is *called*, before its action is
scheduled, so a bad argument raises at the call site with the task, the
parameter, the expected type and the value in the message.

The common case (positional arguments of plain types) is kept cheap: a
value whose type is exactly the annotation is accepted without a call into
msgspec; everything else goes through ``msgspec.convert`` in strict mode
(an ``int`` is accepted for a ``float``, a ``str`` is never turned into an
``int``), so structured types (Structs, dataclasses, TypedDicts, lists of
them) are converted from dicts and lists as msgspec does.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import msgspec

from ._codec import decode_value
from ._errors import InputError

if typing.TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Signature"]

_PLAIN = (int, float, str, bytes, bool)
_POSITIONAL_ONLY = inspect.Parameter.POSITIONAL_ONLY
_MISSING: Any = inspect.Parameter.empty


class _Param:
    __slots__ = ("check", "default", "kind", "name", "type")

    def __init__(self, name: str, kind: Any, default: Any, annotation: Any) -> None:
        self.name = name
        self.kind = kind
        self.default = default
        self.type = annotation
        self.check = _checker(annotation)


def _checker(annotation: Any) -> Callable[[Any], Any] | None:
    """A function that converts or rejects a value, or None for 'anything goes'."""
    if annotation is _MISSING or annotation is Any or annotation is object:
        return None
    if annotation is float:

        def check_float(value: Any) -> Any:
            cls = type(value)
            if cls is float:
                return value
            if cls is int:
                return float(value)
            return msgspec.convert(value, float)

        return check_float
    if annotation in _PLAIN:

        def check_plain(value: Any) -> Any:
            if type(value) is annotation:
                return value
            return msgspec.convert(value, annotation)

        return check_plain
    try:
        # Probe once whether msgspec understands this annotation at all.
        msgspec.inspect.type_info(annotation)
    except (TypeError, ValueError):
        if isinstance(annotation, type):

            def check_instance(value: Any) -> Any:
                if isinstance(value, annotation):
                    return value
                raise msgspec.ValidationError(f"Expected `{annotation.__qualname__}`")

            return check_instance
        return None

    def check_msgspec(value: Any) -> Any:
        return msgspec.convert(value, annotation, from_attributes=True)

    return check_msgspec


def _type_name(annotation: Any) -> str:
    if annotation is _MISSING:
        return "any"
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Signature:
    """The parameters of one task function, ready to bind calls quickly."""

    __slots__ = (
        "_by_name",
        "_decoder",
        "_fast",
        "_fn",
        "_positional",
        "_resolved",
        "_var_keyword",
        "_var_positional",
        "has_var_keyword",
        "has_var_positional",
        "keyword_only",
        "return_type",
        "task_name",
    )

    def __init__(self, fn: Callable[..., Any], task_name: str) -> None:
        self._fn = fn
        self.task_name = task_name
        self._resolved = False

    def _resolve(self) -> None:
        # Annotations are resolved on first call, not at decoration time, so
        # forward references to classes defined later in the module work.
        fn = self._fn
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = dict(getattr(fn, "__annotations__", {}))
        sig = inspect.signature(fn)
        positional: list[_Param] = []
        keyword_only: list[_Param] = []
        self.has_var_positional = self.has_var_keyword = False
        # ``*args: int`` / ``**kwargs: int``: each extra value is checked
        # against the annotation.
        self._var_positional: _Param | None = None
        self._var_keyword: _Param | None = None
        for p in sig.parameters.values():
            param = _Param(p.name, p.kind, p.default, hints.get(p.name, _MISSING))
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                positional.append(param)
            elif p.kind is p.KEYWORD_ONLY:
                keyword_only.append(param)
            elif p.kind is p.VAR_POSITIONAL:
                self.has_var_positional = True
                self._var_positional = param
            else:
                self.has_var_keyword = True
                self._var_keyword = param
        self._positional = positional
        self.keyword_only = keyword_only
        self._by_name = {p.name: p for p in positional + keyword_only if p.kind is not _POSITIONAL_ONLY}
        self.return_type = hints.get("return", _MISSING)
        self._decoder: msgspec.msgpack.Decoder[Any] | None = None
        # (index, param) of the positional parameters that need a check, for
        # calls that pass every parameter positionally; None when the
        # function also has keyword-only parameters.
        self._fast: tuple[tuple[int, _Param], ...] | None = (
            None
            if keyword_only
            else tuple((i, p) for i, p in enumerate(positional) if p.check is not None)
        )
        self._resolved = True

    @property
    def params(self) -> list[tuple[str, Any, Any]]:
        """(name, annotation, default) of each named parameter; default is ``inspect.Parameter.empty`` when required."""
        if not self._resolved:
            self._resolve()
        return [(p.name, p.type, p.default) for p in self._positional + self.keyword_only]

    def returns(self) -> Any:
        if not self._resolved:
            self._resolve()
        return self.return_type

    def decode_output(self, kind: str, data: bytes) -> Any:
        """Decode a recorded output (inline msgpack or pickle), typed by the return annotation."""
        if kind != "msgpack":
            return decode_value(kind, data)
        if not self._resolved:
            self._resolve()
        decoder = self._decoder
        if decoder is None:
            returns = self.return_type
            try:
                decoder = msgspec.msgpack.Decoder(Any if returns is _MISSING else returns)
            except TypeError:
                decoder = msgspec.msgpack.Decoder()
            self._decoder = decoder
        try:
            return decoder.decode(data)
        except msgspec.ValidationError:
            # Recorded under an older annotation: give back the plain data.
            return msgspec.msgpack.decode(data)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Sequence[Any], dict[str, Any]]:
        """Validate a call; return the converted (positional, keyword) arguments.

        Every named parameter ends up filled: positional ones in the
        sequence in declaration order, keyword-only ones in the dict.  The
        result is canonical, so the same call spelled two ways (``f(1)`` and
        ``f(x=1)``) has the same digest.
        """
        if not self._resolved:
            self._resolve()
        fast = self._fast
        if fast is not None and not kwargs and len(args) == len(self._positional):
            # Fast path: every parameter given positionally.  The args tuple
            # itself is returned unless a value had to be converted.
            converted: list[Any] | None = None
            for i, param in fast:
                value = args[i]
                if type(value) is not param.type:
                    new = self._convert(param, value)
                    if new is not value:
                        if converted is None:
                            converted = list(args)
                        converted[i] = new
            return (args if converted is None else converted), {}
        positional = self._positional
        n = len(args)
        if n > len(positional) and not self.has_var_positional:
            raise InputError(
                f"task {self.task_name!r} takes {len(positional)} positional argument(s) but "
                f"{n} were given; pass the others by name"
            )
        values: list[Any] = []
        for i, param in enumerate(positional):
            by_name = bool(kwargs) and param.kind is not _POSITIONAL_ONLY and param.name in kwargs
            if i < n:
                value = args[i]
                if by_name:
                    raise InputError(
                        f"task {self.task_name!r} got two values for parameter {param.name!r}"
                    )
            elif by_name:
                value = kwargs[param.name]
            elif param.default is not _MISSING:
                values.append(param.default)
                continue
            elif kwargs and param.name in kwargs and self._var_keyword is None:
                raise InputError(
                    f"task {self.task_name!r}: parameter {param.name!r} is positional-only; "
                    f"pass it by position"
                )
            else:
                raise InputError(
                    f"task {self.task_name!r} is missing the required argument {param.name!r} "
                    f"({_type_name(param.type)})"
                )
            values.append(self._convert(param, value))
        extra = self._var_positional
        for value in args[len(positional) :]:
            values.append(value if extra is None else self._convert(extra, value))
        named: dict[str, Any] = {}
        for param in self.keyword_only:
            if kwargs and param.name in kwargs:
                named[param.name] = self._convert(param, kwargs[param.name])
            elif param.default is not _MISSING:
                named[param.name] = param.default
            else:
                raise InputError(
                    f"task {self.task_name!r} is missing the required keyword argument "
                    f"{param.name!r} ({_type_name(param.type)})"
                )
        if kwargs:
            for name, value in kwargs.items():
                if name not in self._by_name:
                    var = self._var_keyword
                    if var is None:
                        known = ", ".join(self._by_name) or "none"
                        only = any(p.name == name for p in positional)
                        raise InputError(
                            f"task {self.task_name!r}: parameter {name!r} is positional-only; pass it by position"
                            if only
                            else f"task {self.task_name!r} has no parameter {name!r} (its parameters: {known})"
                        )
                    named[name] = self._convert(var, value)
        return values, named

    def _convert(self, param: _Param, value: Any) -> Any:
        check = param.check
        if check is None or type(value) is param.type:
            return value
        try:
            return check(value)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise InputError(
                f"task {self.task_name!r}, parameter {param.name!r}: expected "
                f"{_type_name(param.type)}, got {_short(value)} ({type(value).__qualname__}): {exc}"
            ) from None
