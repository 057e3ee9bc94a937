"""A job's settings (:class:`JobConfig`) and its spec, the part that decides what results mean.

Each setting's range is a msgspec constraint on its type; :meth:`JobConfig.validate` checks
them, and the few rules that relate settings to one another, with messages that name the
setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import msgspec

from asyncgen.core.errors import ConfigError
from asyncgen.core.limits import EndpointLimits
from asyncgen.core.redact import redact_url
from asyncgen.job.prompts import RESERVED_BODY, Template, load_template, template_from_table

__all__ = ["BACKENDS", "DEFAULT_BASE_URL", "JobConfig", "job_record", "job_spec"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
BACKENDS = ("online", "batch")

AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
Positive = Annotated[float, msgspec.Meta(gt=0)]

# msgspec's words for a broken constraint, "Expected `int` >= 1 - at `$.samples`".
_OUT_OF_RANGE = re.compile(r"Expected `\w+` (>=|>|<=) (\S+) - at `\$\.(\w+)`")


class JobConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a job needs except the API key (which is never stored or printed)."""

    inputs: list[str]
    output: str
    prompt: str | None = None
    """Template name or path; ``None`` when every input line is an OpenAI Batch request."""
    template: dict[str, Any] | None = None
    """A template given inline (a job file's ``[template]`` table), instead of ``prompt``."""
    model: str | None = None
    base_url: str | list[str] = DEFAULT_BASE_URL
    """One endpoint, or several serving the same model (replicas, gateways)."""
    samples: AtLeastOne = 1
    max_tokens: AtLeastOne | None = None
    persona_field: str = "persona"
    extra_body: dict[str, Any] = {}
    """Merged into every request body (sampling parameters, vLLM extras)."""
    concurrency: AtLeastOne = 256
    """Requests in flight at most, over all endpoints."""
    min_concurrency: AtLeastOne = 1
    """The floor each endpoint's adaptive window never goes below."""
    rpm: Positive | None = None
    tpm: Positive | None = None
    endpoint_limits: list[EndpointLimits | None] = []
    """Each endpoint's own limits (a job file's ``[[endpoints]]``), in the order of
    :attr:`base_url`; empty: none. The job-wide ``concurrency``, ``rpm`` and ``tpm`` still
    bound the total."""
    stream: bool = False
    """Ask for server-sent events; record time to first token; time out on silence."""
    idle_timeout: Positive = 60.0
    """Streaming: seconds without a byte from the server after which an attempt is retried."""
    max_attempts: AtLeastOne = 6
    max_invalid: AtLeastOne = 3
    """Replies failing the template's ``[output]`` checks an item may get before it fails
    (counted apart from ``max_attempts``)."""
    accept_length: bool = True
    """Whether a reply cut at ``max_tokens`` passes, for templates whose ``[output]`` does not
    say (``accept_length``); the persona stages set it false."""
    timeout: Positive = 600.0
    """Seconds for one attempt (a streamed one included)."""
    deadline: Positive = 3600.0
    """Seconds from an item's first attempt after which it is not retried again."""
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    strict: bool = False
    """Fail on the first bad input line instead of recording it and going on."""
    flush_records: AtLeastOne = 1024
    flush_interval: float = 1.0
    drain_timeout: float = 30.0
    check_endpoint: bool = True
    backend: Literal["online", "batch"] = "online"
    """``online``: one HTTP request per item; ``batch``: OpenAI Batch API files (half the
    price, results within the completion window; see :mod:`asyncgen.engine.batch`)."""
    batch_poll: Positive = 30.0
    """Batch backend: seconds between the first looks at a batch (growing to 4 x)."""
    batch_max_requests: Annotated[int, msgspec.Meta(ge=1, le=50_000)] = 50_000
    """Batch backend: requests per batch file at most (OpenAI's limit is 50 000)."""
    workers: AtLeastOne = 1
    """Worker processes (or Ray actors) sharing the job, its budgets divided among them
    (see :mod:`asyncgen.scale`). A job once run by workers is always run by workers."""
    ray: str | None = None
    """Run the workers as actors of this Ray cluster (``auto``, or ``ray://HOST:PORT``)."""
    partition_lines: AtLeastOne | None = None
    """Workers: split each input into ranges of this many lines (fixed when the job's plan is
    first written); by default an input is a partition, unless there are fewer than
    workers."""
    embed_batch: Annotated[int, msgspec.Meta(ge=1, le=2048)] = 1
    """Embedding templates: texts per ``/embeddings`` request (``input`` a list; OpenAI
    takes up to 2 048 and 300 000 tokens in all); each text keeps its own record."""
    job_file: str | None = None
    """The TOML job file the settings came from (recorded in the manifest, not in the spec)."""
    job_file_sha256: str | None = None

    def validate(self) -> None:
        """Raise ConfigError, naming the setting, for settings that cannot work (wrong types
        and values out of range included)."""
        try:
            msgspec.convert(msgspec.structs.asdict(self), type(self))
        except msgspec.ValidationError as exc:
            raise ConfigError(_explained(self, exc)) from None
        checks = [
            (bool(self.inputs), "no input files given"),
            (bool(self.base_urls), "no base URL given"),
            (
                len(set(self.base_urls)) == len(self.base_urls),
                "the same base URL is given twice",
            ),
            (
                self.min_concurrency <= self.concurrency,
                "min concurrency must be between 1 and concurrency",
            ),
            (
                self.embed_batch == 1 or self.backend == "online",
                "embed batch (several texts per request) needs the online backend",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_endpoint_limits()
        if self.prompt is not None and self.template is not None:
            raise ConfigError("give a template by name or path (--prompt) or inline, not both")
        if (self.prompt is not None or self.template is not None) and self.model is None:
            raise ConfigError("a --model is required with a template (--prompt)")
        reserved = sorted(RESERVED_BODY & self.extra_body.keys())
        if reserved:
            raise ConfigError(
                f"extra body may not set {', '.join(reserved)}: the template and --model "
                "decide the prompt and model, --samples asks for more outputs (one choice is "
                "kept per request), and --stream asks for streaming"
            )

    def _validate_endpoint_limits(self) -> None:
        limits = self.endpoint_limits
        if not limits:
            return
        if len(limits) != len(self.base_urls):
            raise ConfigError(
                f"{len(limits)} endpoint limits for {len(self.base_urls)} base URLs: "
                "give one per endpoint"
            )
        for number, own in enumerate(limits, 1):
            if own is None:
                continue
            where = f"endpoint {number} ({redact_url(self.base_urls[number - 1])})"
            for name in ("rpm", "tpm"):
                value = getattr(own, name)
                if value is not None and not value > 0:
                    raise ConfigError(f"{where}: {name} must be positive, got {value!r}")
            n = own.concurrency
            if n is None:
                continue
            if n < self.min_concurrency:
                raise ConfigError(
                    f"{where}: concurrency must be at least min concurrency "
                    f"({self.min_concurrency}), got {n}"
                )
            if n > self.concurrency:
                raise ConfigError(
                    f"{where}: concurrency {n} is above the job's ({self.concurrency}), "
                    "which bounds all endpoints together; raise limits.concurrency too"
                )

    def load_template(self) -> Template | None:
        """The job's template: ``prompt`` loaded, or the inline one; None for batch lines."""
        if self.prompt:
            return load_template(self.prompt)
        if self.template is not None:
            return template_from_table(self.template, name="inline")
        return None

    @property
    def base_urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


def _explained(cfg: JobConfig, exc: msgspec.ValidationError) -> str:
    """A value out of its range in the words of the setting ("max invalid must be at least
    1, got 0"); any other error (a wrong type) as msgspec says it, with the field's path."""
    found = _OUT_OF_RANGE.fullmatch(str(exc))
    if found is None:
        return f"invalid job configuration: {exc}"
    op, bound, field = found.groups()
    if op == ">=":
        wanted = f"at least {bound}"
    elif op == "<=":
        wanted = f"at most {bound}"
    elif float(bound) == 0:
        wanted = "positive"
    else:
        wanted = f"greater than {bound}"
    return f"{field.replace('_', ' ')} must be {wanted}, got {getattr(cfg, field)!r}"


def job_spec(cfg: JobConfig, template: Template | None = None) -> dict[str, Any]:
    """What decides the meaning of a job's results (its output directory serves one spec
    only); ``template`` is ``cfg.prompt`` loaded, loaded here if not given."""
    if template is None:
        template = cfg.load_template()
    return {
        "template": None
        if template is None
        else {"name": template.name, "sha256": template.digest},
        "model": cfg.model,
        "samples": cfg.samples,
        "max_tokens": cfg.max_tokens,
        "persona_field": cfg.persona_field,
        "extra_body": cfg.extra_body,
    }


class _Resolvable(Protocol):
    def resolve(self) -> object: ...


def job_record(
    cfg: JobConfig, paths: Sequence[_Resolvable], template: Template | None
) -> dict[str, Any]:
    """A run's settings as the manifest records them: enough to run the job again from
    anywhere (absolute input paths), never a secret (no key, no URL credentials)."""
    record: dict[str, Any] = msgspec.to_builtins(cfg)
    record["inputs"] = [str(p.resolve()) for p in paths]
    record["output"] = str(Path(cfg.output).resolve())
    record["base_url"] = [redact_url(u) for u in cfg.base_urls]
    if cfg.prompt is not None and os.path.isfile(cfg.prompt):
        record["prompt"] = str(Path(cfg.prompt).resolve())
    record["template_endpoint"] = template.endpoint if template else None
    return record
