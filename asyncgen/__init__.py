"""asyncgen: persona-driven synthetic data generation against OpenAI-compatible APIs.

The public API::

    from asyncgen import Engine, JobConfig

    async with Engine(JobConfig(inputs=["personas.jsonl.zst"], output="out",
                                prompt="math", model="my-model",
                                base_url="http://localhost:8000/v1")) as engine:
        async for record in engine.results():   # each one durable when yielded
            ...
        print(engine.statistics())
"""

from __future__ import annotations

from asyncgen._version import __version__
from asyncgen.core.errors import (
    AsyncgenError,
    ConfigError,
    ConnectError,
    InputError,
    OutputError,
    RequestTimeout,
    TransportError,
)
from asyncgen.core.limits import EndpointLimits
from asyncgen.core.records import BadLine, ErrorInfo, Result, Source, Usage, WorkItem
from asyncgen.engine.engine import Engine
from asyncgen.engine.metrics import Metrics
from asyncgen.engine.runtime import tune_gc
from asyncgen.engine.stats import Statistics
from asyncgen.engine.transport import AiohttpTransport, HttpResponse, Transport
from asyncgen.job.config import DEFAULT_BASE_URL, JobConfig
from asyncgen.job.prompts import Template, available_templates, load_template

__all__ = [
    "DEFAULT_BASE_URL",
    "AiohttpTransport",
    "AsyncgenError",
    "BadLine",
    "ConfigError",
    "ConnectError",
    "EndpointLimits",
    "Engine",
    "ErrorInfo",
    "HttpResponse",
    "InputError",
    "JobConfig",
    "Metrics",
    "OutputError",
    "RequestTimeout",
    "Result",
    "Source",
    "Statistics",
    "Template",
    "Transport",
    "TransportError",
    "Usage",
    "WorkItem",
    "__version__",
    "available_templates",
    "load_template",
    "tune_gc",
]
