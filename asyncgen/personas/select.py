"""Choosing personas: a uniform sample of N (:func:`reservoir_sample`) and keyword, pattern
and field conditions (:class:`PersonaFilter`), both in one streaming pass."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import TypeVar

import msgspec

from asyncgen.core.errors import ConfigError
from asyncgen.personas.reader import Persona

__all__ = ["PersonaFilter", "reservoir_sample"]

T = TypeVar("T")


def reservoir_sample(items: Iterable[T], n: int, *, seed: int) -> list[T]:
    """A uniform random sample of ``n`` items (all, if fewer), in input order; O(n) memory.

    Algorithm R: item i (0-based) replaces a random slot with probability n / (i + 1).
    The same items, ``n`` and ``seed`` always give the same sample.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < n:
            reservoir.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < n:
                reservoir[j] = (i, item)
    reservoir.sort(key=lambda pair: pair[0])
    return [item for _, item in reservoir]


class PersonaFilter:
    """Which personas to keep: each kind of condition given must hold (AND across kinds).

    ``keywords``: any of the words or phrases occurs as a whole word, ignoring case;
    ``regexes``: any pattern matches somewhere in the text (``re.search``);
    ``where``: ``(field, value)`` pairs; a field must equal one of its values (pairs naming the
    same field are alternatives, different fields must all match). A string field is compared
    as it is, any other value as its JSON text (``age=30``, ``verified=true``).
    ``invert`` keeps exactly the personas the conditions reject.
    """

    def __init__(
        self,
        *,
        keywords: Sequence[str] = (),
        regexes: Sequence[str] = (),
        where: Sequence[tuple[str, str]] = (),
        invert: bool = False,
    ) -> None:
        if any(not k.strip() for k in keywords):
            raise ConfigError("--keyword must not be empty")
        self._keyword = None
        if keywords:
            alternatives = "|".join(re.escape(k.strip()) for k in keywords)
            self._keyword = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        self._regexes = []
        for pattern in regexes:
            try:
                self._regexes.append(re.compile(pattern))
            except re.error as exc:
                raise ConfigError(f"--regex {pattern!r} is not a valid pattern: {exc}") from exc
        self._where: dict[str, set[str]] = {}
        for field, value in where:
            self._where.setdefault(field, set()).add(value)
        self.invert = invert

    def __call__(self, persona: Persona) -> bool:
        return self._matches(persona) != self.invert

    def _matches(self, persona: Persona) -> bool:
        if self._keyword is not None and not self._keyword.search(persona.text):
            return False
        if self._regexes and not any(r.search(persona.text) for r in self._regexes):
            return False
        if self._where:
            record = msgspec.json.decode(persona.line.raw)
            for field, values in self._where.items():
                value = record.get(field)
                if value is None and field not in record:
                    return False
                text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
                if text not in values:
                    return False
        return True
