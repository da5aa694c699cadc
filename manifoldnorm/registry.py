"""The one registry mechanism: lower-case names -> entries (a factory, a kind, metadata), with errors that list
the valid names.

Norm layers (:mod:`manifoldnorm.nn.registry`) and optimizers (:mod:`manifoldnorm.optim.registry`) each keep one
:class:`Registry` of their own entry type (``NormInfo``, ``OptimizerInfo``); every class registers itself in the
module where it is defined, so adding a norm or an optimizer is one class, one registration line and one yaml,
and the contract tests, the benchmarks and the configs find it through ``list_*``.

>>> reg = Registry("widget", kinds=("small", "big"), plural="widgets")
>>> reg.add(Entry("knob", dict, "small")).name
'knob'
>>> reg.names(kind="small")
['knob']
>>> reg.get("lever")
Traceback (most recent call last):
ValueError: unknown widget 'lever'; valid widgets: knob
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Entry", "Registry", "unwrap_factory"]


class _EntryLike(Protocol):
    name: str
    kind: str

    @property
    def factory(self) -> Callable[..., Any]: ...


E = TypeVar("E", bound=_EntryLike)


@dataclass(frozen=True)
class Entry:
    """A minimal registry entry: ``name``, ``factory`` (a class or callable) and ``kind``."""

    name: str
    factory: Callable[..., Any]
    kind: str


def unwrap_factory(factory: Any) -> Any:
    """The class or function under any number of ``functools.partial`` layers."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


class Registry(Generic[E]):
    """Entries keyed by lower-case name, each of one of a fixed set of kinds.

    Parameters
    ----------
    family : str
        What is registered, singular (``"norm"``, ``"optimizer"``); used in the messages about names and kinds.
    kinds : tuple of str
        The valid kinds, in the order the messages list them.
    what : str, optional
        How an unknown name is introduced (``"unknown <what> 'x'"``); default ``family``.
    plural : str, optional
        How the list of valid names is introduced (``"valid <plural>: ..."``); default ``"names"``.
    """

    def __init__(self, family: str, kinds: tuple[str, ...], *, what: str | None = None,
                 plural: str = "names") -> None:
        self.family = family
        self.kinds = tuple(kinds)
        self.what = what or family
        self.plural = plural
        self._entries: dict[str, E] = {}

    # -- writing ----------------------------------------------------------------------------------------------
    def check_name(self, name: Any) -> str:
        """``name`` if it is a non-empty lower-case string, else a ValueError."""
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"{self.family} names must be non-empty lower-case strings, got {name!r}")
        return name

    def check_kind(self, kind: Any) -> str:
        """``kind`` if it is one of :attr:`kinds`, else a ValueError listing them."""
        if kind not in self.kinds:
            raise ValueError(f"unknown {self.family} kind {kind!r}; valid kinds: {', '.join(self.kinds)}")
        return kind

    def add(self, entry: E) -> E:
        """Store ``entry`` under ``entry.name``; a second entry of the same name is a ValueError."""
        self.check_name(entry.name)
        self.check_kind(entry.kind)
        if entry.name in self._entries:
            raise ValueError(f"a {self.family} named {entry.name!r} is already registered "
                             f"({self._entries[entry.name].factory!r})")
        self._entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> E:
        """Take ``name`` out again (for tests and interactive sessions that re-register a class)."""
        return self._entries.pop(self.get(name).name)

    # -- reading ----------------------------------------------------------------------------------------------
    def names(self, kind: str | None = None) -> list[str]:
        """Sorted names, optionally only those of one ``kind``."""
        if kind is not None:
            self.check_kind(kind)
        return sorted(n for n, e in self._entries.items() if kind is None or e.kind == kind)

    def unknown(self, name: Any) -> ValueError:
        """The error for a name that is not registered, listing the valid ones."""
        return ValueError(f"unknown {self.what} {name!r}; valid {self.plural}: {', '.join(self.names())}")

    def get(self, name: Any) -> E:
        """The entry of ``name``, else :meth:`unknown` (callers that accept any case lower-case it first)."""
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise self.unknown(name)
        return entry

    def find(self, factory: Any) -> E | None:
        """The entry whose factory is ``factory`` (both looked at through ``functools.partial``), else ``None``."""
        target = unwrap_factory(factory)
        for entry in self._entries.values():
            if unwrap_factory(entry.factory) is target:
                return entry
        return None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter([self._entries[n] for n in self.names()])

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {len(self)} entries: {', '.join(self.names())})"
