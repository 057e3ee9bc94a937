"""The manifest of an output directory: which job its records belong to, and how it ran.

``OUT/manifest.json`` is indented JSON with sorted keys, for people as much as for tools::

    format       1
    asyncgen     the version that last wrote to the directory
    fingerprint  the sha256 of the spec (see :func:`fingerprint`)
    spec         what decides the meaning of a result; the job layer's mapping, kept as given
                 so that its fingerprint can be checked and a changed key named
    job          the settings of the last run, without secrets, so that tools can run the
                 job again (``asyncgen retry-failed``); null if an older asyncgen wrote it

This module is the only one that reads or writes it. Everything here blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import msgspec

from asyncgen.core.errors import OutputError
from asyncgen.storage.files import atomic_write

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "JobRecord",
    "Manifest",
    "fingerprint",
    "other_job",
    "read_manifest",
    "write_manifest",
]

FORMAT = 1
MANIFEST_NAME = "manifest.json"

J = TypeVar("J")


class JobRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The settings of a run that the manifest gives a shape of its own: absolute paths, the
    endpoints as a list (credentials redacted), the template's endpoint kind. The other
    settings are decoded by whoever knows them: ``read_manifest(root, JobConfig)``."""

    inputs: list[str]
    output: str
    prompt: str | None = None
    base_url: list[str] = []
    template_endpoint: str | None = None
    """``chat`` or ``completions``: the API the template speaks; None for batch lines."""


class Manifest(msgspec.Struct, Generic[J], kw_only=True, frozen=True):
    """The content of ``manifest.json``; ``job`` decoded as ``J``."""

    fingerprint: str
    spec: dict[str, Any]
    job: J | None = None
    asyncgen: str | None = None
    format: int = FORMAT


_encoder = msgspec.json.Encoder(order="sorted")


def fingerprint(spec: Mapping[str, Any]) -> str:
    """A stable hash of the parts of a job spec that decide what each item's result means."""
    return hashlib.sha256(_encoder.encode(spec)).hexdigest()


def other_job(root: Path, old_spec: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """The message refusing ``spec`` for ``root``, whose records were made for ``old_spec``."""
    changed = sorted(k for k in set(old_spec) | set(spec) if old_spec.get(k) != spec.get(k))
    return (
        f"output directory {root} belongs to a different job "
        f"(changed: {', '.join(changed) or 'spec'}); "
        "use a new --output directory, or rerun with the original settings"
    )


@overload
def read_manifest(root: Path) -> Manifest[JobRecord]: ...
@overload
def read_manifest(root: Path, job: type[J]) -> Manifest[J]: ...
def read_manifest(root: Path, job: Any = JobRecord) -> Manifest[Any]:
    """The manifest of the output directory ``root``, its job settings decoded as ``job``.

    :class:`OutputError` naming the file if there is none, or if it is not a manifest this
    version can read (corrupt, foreign, or with settings that do not fit ``job``)."""
    path = root / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OutputError(
            f"{root} is not an asyncgen output directory (no {MANIFEST_NAME})"
        ) from None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return msgspec.json.decode(data, type=Manifest[job])
    except msgspec.DecodeError as exc:  # a ValidationError too
        raise OutputError(
            f"{path} is not an asyncgen manifest this version can read ({exc})"
        ) from exc


def write_manifest(
    root: Path, spec: Mapping[str, Any], *, version: str, job: Mapping[str, Any] | None
) -> None:
    """Record that ``root`` holds the records of ``spec``, last written by this ``version``
    with the settings ``job``; atomically, and not at all if the file says so already."""
    manifest = Manifest(
        fingerprint=fingerprint(spec),
        spec=dict(spec),
        job=None if job is None else dict(job),
        asyncgen=version,
    )
    data = msgspec.json.format(_encoder.encode(manifest), indent=2) + b"\n"
    path = root / MANIFEST_NAME
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass  # absent (or unreadable): write it
    with atomic_write(path) as f:
        f.write(data)
