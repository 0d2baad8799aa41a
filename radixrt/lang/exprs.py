"""The DSL's expression base: ``Expr``, ``+`` concatenation (``"A:" + gen("a") + "\\n"``) and
role blocks. The primitives that call a model (``gen``, ``select``) are in ops.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from radixrt.lang.state import ProgramState

# What may be added to a state: text, a primitive, or a sequence of them.
Content = Union[str, "Expr", Sequence[Union[str, "Expr"]], None]


class Expr:
    """Something a state runs when it is added: ``s += expr``. ``a + b`` joins expressions
    and strings into one ``ExprList``, run left to right."""

    def apply(self, s: ProgramState) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """How the call is named in error messages: ``gen('answer')``."""
        raise NotImplementedError

    def __add__(self, other: object) -> ExprList:
        return ExprList((*_items(self), *_items(_expr(other))))

    def __radd__(self, other: object) -> ExprList:
        return ExprList((*_items(_expr(other)), *_items(self)))


@dataclass(frozen=True)
class Text(Expr):
    value: str

    def describe(self) -> str:
        return repr(self.value[:20])

    def apply(self, s: ProgramState) -> None:
        s._append(self.value)


@dataclass(frozen=True, eq=False)
class ExprList(Expr):
    items: tuple[Expr, ...]

    def describe(self) -> str:
        return " + ".join(x.describe() for x in self.items)

    def apply(self, s: ProgramState) -> None:
        for x in self.items:
            s += x


def _expr(x: object) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Text(x)
    raise TypeError(f"cannot join {type(x).__name__} with a DSL expression (expected str or "
                    "gen(...), select(...), a role, ...)")


def _items(x: Expr) -> tuple[Expr, ...]:
    return x.items if isinstance(x, ExprList) else (x,)


@dataclass(frozen=True)
class RoleBegin(Expr):
    role: str

    def describe(self) -> str:
        return f"{self.role}_begin()"

    def apply(self, s: ProgramState) -> None:
        s._begin_role(self.role)


@dataclass(frozen=True)
class RoleEnd(Expr):
    role: str

    def describe(self) -> str:
        return f"{self.role}_end()"

    def apply(self, s: ProgramState) -> None:
        s._end_role(self.role)


@dataclass(frozen=True, eq=False)
class Role(Expr):
    """A whole message: ``user("hi")`` or ``assistant(gen("answer"))``."""

    role: str
    content: Content

    def describe(self) -> str:
        return f"{self.role}(...)"

    def apply(self, s: ProgramState) -> None:
        s._begin_role(self.role)
        if self.content is not None:
            s += self.content
        s._end_role(self.role)


def system(content: Content = None) -> Role:
    return Role("system", content)


def user(content: Content = None) -> Role:
    return Role("user", content)


def assistant(content: Content = None) -> Role:
    return Role("assistant", content)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
