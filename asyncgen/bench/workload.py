"""The benchmark's workload: the request bodies, and when each is due.

Bodies are prompts rendered from a template and persona shards (at most a pool of them,
cycled when there are more requests), or synthetic prompts of random common words, the same
for the same seed and index. Arrivals are fixed intervals or a Poisson process at the rate.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec

from asyncgen.bench.config import DEFAULT_INPUT_LEN, BenchConfig
from asyncgen.core.errors import AsyncgenError, ConfigError
from asyncgen.job.items import Expander
from asyncgen.job.prompts import Template, load_template
from asyncgen.storage.sources import ShardReader, expand_inputs

__all__ = ["Workload", "arrival_offsets", "schedule"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
_POOL = 10_000
"""Distinct prompts rendered from input files; more requests cycle through them."""
_MAX_REQUESTS = 10_000_000
_encode = msgspec.json.encode

# Short, common words: about one token each (with the leading space) in the usual BPE
# vocabularies, so N words make a prompt of about N tokens.
_VOCABULARY = (
    "the of and to in is was for on are with as at be by this had not but from or have an they"
    " which one you were her all she there would their we him been has when who will more no if"
    " out so said what up its about into than them can only other new some could time these two"
    " may then do first any my now such like our over man me even most made after also did many"
    " before must through back years where much your way well down should because each just"
    " those people how too little state good very make world still own see men work long get"
    " here between both life being under never day same another know while last might us great"
    " old year off come since against go came right used take three"
)
_WORDS = tuple(_VOCABULARY.split())


def arrival_offsets(
    rate: float,
    *,
    poisson: bool,
    total: int | None,
    warmup: int = 0,
    duration: float | None = None,
    rng: random.Random | None = None,
) -> list[float]:
    """Scheduled send times, in seconds from the start: every ``1/rate``, or with exponential
    gaps of mean ``1/rate``. Stops after ``total`` or once ``duration`` seconds have passed
    since the first request after the ``warmup`` ones, whichever comes first."""
    if total is None and duration is None:
        raise ValueError("give total or duration")
    rng = rng or random.Random(0)
    offsets: list[float] = []
    t = 0.0
    for i in itertools.count():
        if total is not None and i >= total:
            break
        if duration is not None and i > warmup and t - offsets[warmup] >= duration:
            break
        if i >= _MAX_REQUESTS:
            raise ConfigError(f"more than {_MAX_REQUESTS} requests scheduled; lower the rate")
        offsets.append(t)
        t = t + rng.expovariate(rate) if poisson else (i + 1) / rate
    return offsets


def schedule(config: BenchConfig) -> list[float] | None:
    """The run's send times (see :func:`arrival_offsets`), or None for a closed loop."""
    if config.rate is None:
        return None
    return arrival_offsets(
        config.rate,
        poisson=config.poisson,
        total=config.total,
        warmup=config.warmup,
        duration=config.duration,
        rng=random.Random(f"{config.seed}:arrivals"),
    )


class Workload:
    """The request bodies, encoded ahead of their send time."""

    def __init__(self, config: BenchConfig, model: str, count: int | None) -> None:
        self._seed = config.seed
        self._bodies: list[bytes] = []
        self.skipped = 0
        self.first_error: str | None = None
        overrides: dict[str, Any] = {}
        max_tokens = config.max_tokens_sent
        if max_tokens is not None:
            overrides["max_tokens"] = max_tokens
        if config.ignore_eos:
            overrides["ignore_eos"] = True
        overrides.update(config.extra_body)
        if config.stream:
            overrides["stream"] = True
            options = overrides.get("stream_options")
            overrides["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        self._overrides = overrides
        self._model = model
        self.input_len = config.input_len or DEFAULT_INPUT_LEN
        self.endpoint: str = config.endpoint or "chat"
        if config.prompt is None:
            return
        template = load_template(config.prompt)
        if config.endpoint is not None and config.endpoint != template.endpoint:
            raise ConfigError(
                f"template {template.name!r} is for the {template.endpoint} endpoint, "
                f"not {config.endpoint}"
            )
        self.endpoint = template.endpoint
        self._load(config, template, min(count or _POOL, _POOL))

    def _load(self, config: BenchConfig, template: Template, wanted: int) -> None:
        expander = Expander(
            template,
            model=self._model,
            persona_field=config.persona_field,
            overrides=self._overrides,
        )
        for path in expand_inputs(config.inputs):
            reader = ShardReader(path)
            while len(self._bodies) < wanted and (batch := reader.read_batch(256)):
                for line in batch:
                    try:
                        (item,) = expander.expand(line)
                    except AsyncgenError as exc:
                        self.skipped += 1
                        self.first_error = self.first_error or str(exc)
                        continue
                    self._bodies.append(_encode(item.body))
                    if len(self._bodies) >= wanted:
                        break
            if len(self._bodies) >= wanted:
                break
        if not self._bodies:
            raise ConfigError(
                "no usable input line in "
                + ", ".join(config.inputs)
                + (f" (first problem: {self.first_error})" if self.first_error else "")
            )

    @property
    def path(self) -> str:
        return _PATHS[self.endpoint]

    def body(self, index: int) -> bytes:
        """The encoded body of request ``index``: rendered inputs in turn, or random words
        that are the same for the same seed and index."""
        if self._bodies:
            return self._bodies[index % len(self._bodies)]
        rng = random.Random(f"{self._seed}:{index}")
        text = " ".join(rng.choices(_WORDS, k=self.input_len))
        body: dict[str, Any] = {"model": self._model}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        body.update(self._overrides)
        return _encode(body)
