"""asyncgen against its peers: the same loopback server, clients in their own processes.

Clients (``--clients``), each a fresh subprocess pinned to its own core:

* ``asyncgen``       — the whole pipeline through the Engine API on uvloop, as the CLI runs
  it: a persona ``.jsonl.zst`` shard, the ``math`` template, flow control, retry
  bookkeeping, msgspec, zstd output and the exactly-once ledger. CPU is measured from
  entering the Engine to leaving it.
* ``asyncgen-cli``   — ``asyncgen run ... --quiet`` as a user types it; CPU of the whole
  process (interpreter start-up and imports included), from ``wait4``.
* ``floor``          — the bare minimum: N worker coroutines on one aiohttp session, uvloop,
  the same request bytes encoded and the reply decoded with msgspec; no bookkeeping.
* ``asyncgen-gc``, ``floor-gc`` — the same two after ``asyncgen.tune_gc()`` (what the
  ``asyncgen`` command does at start: ``gc.freeze()`` and a young-generation threshold that
  adapts from 10 000 up), so that the collector settings are compared like with like.
* ``openai``         — the official SDK, ``AsyncOpenAI`` with its default httpx transport,
  a semaphore of N around ``chat.completions.create``.
* ``openai-aiohttp`` — the same SDK on its aiohttp transport (``DefaultAioHttpClient``).

Servers (``--server``): ``fast`` is a raw uvloop protocol in this file that answers every
``POST`` with one fixed chat completion (after ``--latency`` seconds) and counts its replies
per 100 ms; ``mock`` is ``asyncgen mock-server``. Both run in their own process, on core 0
when ``--pin`` (the default on machines with two cores or more); clients run on core 1.

Subcommands:

* ``throughput`` — zero latency, concurrency 256: requests/s and client CPU ms per 1 000
  requests, rounds interleaved (A B C A B C ...), ratios per round, medians over rounds.
* ``latency``    — server latency 1 s, concurrency 1 000 / 4 000: achieved requests/s as a
  share of concurrency / latency (Little's law), over the steady window seen by the server
  (from its 1.5 C-th reply of the run to its 0.5 C-th-to-last, C = concurrency).
* ``profile``    — one throughput run of ``asyncgen`` (or ``floor``) under ``py-spy record``;
  top functions by self and by inclusive time.

Usage::

    python benchmarks/bench_peers.py throughput --requests 20000 --sdk-requests 2000
    python benchmarks/bench_peers.py latency --concurrency 1000 4000
    python benchmarks/bench_peers.py profile --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import make_shard  # noqa: E402

CLIENTS = (
    "asyncgen",
    "asyncgen-gc",
    "asyncgen-cli",
    "floor",
    "floor-gc",
    "openai",
    "openai-aiohttp",
)
SDK_CLIENTS = ("openai", "openai-aiohttp")
SERVER_CPU, CLIENT_CPU = 0, 1
MODEL = "mock-model"
BIN_S = 0.01
"""The fast server counts its replies in bins this wide (seconds of wall-clock time)."""

_REPLY_TEXT = (
    "A lighthouse keeper logs the beam's rotation every night: it turns once every 7.5 "
    "seconds, the fog horn sounds every 18 seconds, and both started together at dusk. "
    "How many times before dawn do they coincide?"
)


def pin_default() -> bool:
    return len(os.sched_getaffinity(0)) >= 2


def raise_nofile() -> tuple[int, int]:
    """Raise this process's (and its children's) open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cpu_seconds() -> float:
    """User + system CPU of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- the fast server ----------------------------------------------------------------------------


def _http(status: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def _chat_reply() -> bytes:
    words = len(_REPLY_TEXT.split())
    return _http(
        "200 OK",
        msgspec.json.encode(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 1764043200,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _REPLY_TEXT},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 91,
                    "completion_tokens": words,
                    "total_tokens": 91 + words,
                },
            }
        ),
    )


class FastServer(asyncio.Protocol):
    """HTTP/1.1 keep-alive, no pipelining assumptions broken, one fixed reply per POST.

    Parsing is the least a client can rely on: the head up to the blank line, then
    ``Content-Length`` bytes of body. ``GET /stats`` returns the reply count per bin.
    """

    latency = 0.0
    jitter = 0.0
    rng = random.Random(0)
    replies: Counter[int] = Counter()
    total = 0
    chat = _chat_reply()
    models = _http(
        "200 OK",
        msgspec.json.encode({"object": "list", "data": [{"id": MODEL, "object": "model"}]}),
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's TCPTransport is no asyncio.Transport
        self.buffer = bytearray()
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None])
            if len(buffer) < end + 4 + length:
                return
            del buffer[: end + 4 + length]
            self.answer(head)

    def answer(self, head: bytes) -> None:
        if head.startswith(b"post"):
            if self.latency:
                delay = self.latency
                if self.jitter:
                    delay += self.rng.uniform(-self.jitter, self.jitter)
                self.loop.call_later(delay, self.send, self.chat)
            else:
                self.send(self.chat)
        elif head.startswith(b"get /v1/models"):
            self.transport.write(self.models)
        elif head.startswith(b"get /stats"):
            cpu = cpu_seconds()
            body = msgspec.json.encode(
                {"replies": FastServer.total, "cpu_s": cpu, "bins": FastServer.replies}
            )
            self.transport.write(_http("200 OK", body, "Connection: close\r\n"))
            self.transport.close()
        else:
            self.transport.write(_http("404 Not Found", b"{}"))

    def send(self, reply: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply)
            FastServer.total += 1
            FastServer.replies[int(time.time() / BIN_S)] += 1


async def serve_fast(port: int, latency: float, jitter: float) -> None:
    FastServer.latency, FastServer.jitter = latency, jitter
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FastServer, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await stop.wait()


# --- servers as processes ----------------------------------------------------------------------


def pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def core_busy_s(cpu: int | None) -> float:
    """Busy (non-idle) seconds of one core since boot, from /proc/stat; 0 when unknown."""
    if cpu is None:
        return 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(x) for x in line.split()[1:]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    return 0.0


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A loopback server in its own process: ``fast`` (this file) or ``mock`` (asyncgen)."""

    def __init__(self, kind: str, latency: float, cpu: int | None, jitter: float = 0.0) -> None:
        self.kind, self.latency, self.cpu, self.jitter = kind, latency, cpu, jitter
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def argv(self) -> list[str]:
        if self.kind == "fast":
            return [sys.executable, __file__, "serve", "--port", str(self.port)] + (
                ["--latency", str(self.latency), "--jitter", str(self.jitter)]
                if self.latency
                else []
            )
        return [
            sys.executable,
            "-m",
            "asyncgen",
            "mock-server",
            "--port",
            str(self.port),
            "--latency",
            str(self.latency),
        ]

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=clean_env(),
            preexec_fn=pinned(self.cpu),
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.stats()
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"{self.kind} server did not start: {' '.join(self.argv)}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stats(self) -> dict[str, Any]:
        path = "/stats" if self.kind == "fast" else "/mock/stats"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            stats: dict[str, Any] = json.loads(r.read())
        return stats

    def cpu_s(self) -> float:
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)


# --- clients (each runs in a child process) -----------------------------------------------------


def load_prompt() -> tuple[str, str, dict[str, Any]]:
    """The shipped ``math`` template's system text, user text and sampling, read directly."""
    raw = tomllib.loads((HERE.parent / "prompts" / "math.toml").read_text())
    return raw["system"], raw["user"], raw.get("sampling", {})


def personas(n: int) -> Iterator[str]:
    """The persona texts of ``make_shard``, in order (the floor and the SDKs skip the file)."""
    for i in range(n):
        yield (
            f"A retired engineer number {i} who restores clocks and reads "
            "about the history of timekeeping in small coastal towns."
        )


def messages_for(persona: str, system: str, user: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user.replace("{persona}", persona)},
    ]


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Reply(msgspec.Struct):
    choices: list[_Choice]


async def client_floor(url: str, n: int, concurrency: int) -> int:
    import aiohttp

    system, user, sampling = load_prompt()
    encoder = msgspec.json.Encoder()
    decoder = msgspec.json.Decoder(_Reply)
    work = personas(n)
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal ok
            for persona in work:
                body = encoder.encode(
                    {"model": MODEL, "messages": messages_for(persona, system, user), **sampling}
                )
                async with session.post(url + "/chat/completions", data=body) as resp:
                    data = await resp.read()
                reply = decoder.decode(data)
                ok += resp.status == 200 and reply.choices[0].message.content is not None

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
    return ok


async def client_openai(url: str, n: int, concurrency: int, aiohttp_transport: bool) -> int:
    from openai import AsyncOpenAI

    system, user, sampling = load_prompt()
    http_client = None
    if aiohttp_transport:
        from openai import DefaultAioHttpClient  # openai[aiohttp], recent SDKs only

        http_client = DefaultAioHttpClient()
    ok = 0
    gate = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=url, api_key="bench", http_client=http_client) as client:

        async def one(persona: str) -> None:
            nonlocal ok
            try:
                reply = await client.chat.completions.create(
                    model=MODEL,
                    messages=messages_for(persona, system, user),  # type: ignore[arg-type]
                    **sampling,
                )
            finally:
                gate.release()
            ok += reply.choices[0].message.content is not None

        # Gate before spawning: at most `concurrency` tasks exist, as in real use.
        async with asyncio.TaskGroup() as tg:
            for persona in personas(n):
                await gate.acquire()
                tg.create_task(one(persona))
    return ok


async def client_asyncgen(url: str, n: int, concurrency: int, shard: Path, out: Path) -> int:
    from asyncgen import Engine, JobConfig

    config = JobConfig(
        inputs=[str(shard)],
        output=str(out),
        prompt="math",
        model=MODEL,
        base_url=url,
        concurrency=concurrency,
    )
    async with Engine(config) as engine:
        stats = await engine.run()
    if stats.succeeded != n:
        raise RuntimeError(f"asyncgen: {stats.succeeded} of {n} succeeded: {stats}")
    return stats.succeeded


def run_client(args: argparse.Namespace) -> None:
    """Child process: run one client once, print one JSON line."""
    import uvloop

    kind, url, n, conc = args.kind, args.url, args.requests, args.concurrency
    raise_nofile()
    # Imports are start-up, not per-request work: done before the clock starts, for every
    # client alike (the asyncgen-cli row shows a whole process, start-up included).
    import aiohttp  # noqa: F401

    if kind in SDK_CLIENTS:
        import openai  # noqa: F401
    if kind.startswith("asyncgen"):
        import asyncgen.cli.main  # noqa: F401
    base = kind.removesuffix("-gc")
    if base != kind:
        from asyncgen import tune_gc

        tune_gc()  # after the imports, as the asyncgen command does
    if base == "floor":
        coro = client_floor(url, n, conc)
    elif kind in SDK_CLIENTS:
        coro = client_openai(url, n, conc, aiohttp_transport=kind == "openai-aiohttp")
    elif base == "asyncgen":
        coro = client_asyncgen(url, n, conc, args.shard, args.out)
    else:
        raise SystemExit(f"unknown client {kind}")
    # The SDKs run on uvloop too, so the loop is not what differs.
    cpu, wall = cpu_seconds(), time.perf_counter()
    started = time.time()
    ok = uvloop.run(coro)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    print(
        json.dumps(
            {
                "client": kind,
                "requests": n,
                "ok": ok,
                "wall_s": wall,
                "cpu_s": cpu,
                "started": started,
                "peak_rss_mb": peak_rss_mb(),
            }
        ),
        flush=True,
    )


# --- orchestration ------------------------------------------------------------------------------


@dataclass
class Setup:
    workdir: Path
    pin: bool

    @property
    def client_cpu(self) -> int | None:
        return CLIENT_CPU if self.pin else None

    @property
    def server_cpu(self) -> int | None:
        return SERVER_CPU if self.pin else None


def client_argv(kind: str, url: str, n: int, conc: int, shard: Path, out: Path) -> list[str]:
    if kind == "asyncgen-cli":
        return [
            sys.executable,
            "-m",
            "asyncgen",
            "run",
            "-i",
            str(shard),
            "-p",
            "math",
            "-m",
            MODEL,
            "-o",
            str(out),
            "--base-url",
            url,
            "--concurrency",
            str(conc),
            "--quiet",
        ]
    return [
        sys.executable,
        __file__,
        "client",
        kind,
        "--url",
        url,
        "--requests",
        str(n),
        "--concurrency",
        str(conc),
        "--shard",
        str(shard),
        "--out",
        str(out),
    ]


def run_one(
    setup: Setup,
    server: Server,
    kind: str,
    n: int,
    conc: int,
    *,
    wrap: Sequence[str] = (),
) -> dict[str, Any]:
    """One client run in a fresh process: its own figures, its whole-process CPU (``wait4``)
    and the server's CPU meanwhile."""
    shard = setup.workdir / f"personas-{n}.jsonl.zst"
    make_shard(shard, n)
    out = setup.workdir / f"peers-out-{os.getpid()}-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [*wrap, *client_argv(kind, server.url, n, conc, shard, out)]
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        server_cpu = server.cpu_s()
        core_busy = core_busy_s(setup.client_cpu)
        start = time.time()
        wall = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            env=clean_env(),
            preexec_fn=None if wrap else pinned(setup.client_cpu),
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - wall
        server_cpu = server.cpu_s() - server_cpu
        core_busy = core_busy_s(setup.client_cpu) - core_busy
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read().decode(), stderr.read().decode()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} exited {proc.returncode}: {' '.join(argv)}\n{err_text[-3000:]}")
    process_cpu = usage.ru_utime + usage.ru_stime
    if kind == "asyncgen-cli":
        # Whole-process figures: what `time asyncgen run ...` says.
        row: dict[str, Any] = {
            "client": kind,
            "requests": n,
            "ok": n,
            "wall_s": wall,
            "started": start,
            "cpu_s": process_cpu,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }
    else:
        # The last JSON line: a profiler wrapping the client may print after it.
        row = json.loads([x for x in out_text.splitlines() if x.startswith('{"client"')][-1])
    row["process_cpu_s"] = process_cpu
    row["process_wall_s"] = wall
    row["server_cpu_s"] = server_cpu
    row["server_busy"] = server_cpu / wall
    row["server_cpu_us_per_req"] = server_cpu / row["ok"] * 1e6
    if setup.client_cpu is not None and not wrap:
        # What other processes took of the client's core meanwhile (a shared machine).
        row["client_core_foreign"] = max(0.0, core_busy - process_cpu) / wall
    row["req_per_s"] = row["ok"] / row["wall_s"]
    row["cpu_ms_per_1k"] = row["cpu_s"] / row["ok"] * 1e6
    row["process_cpu_ms_per_1k"] = process_cpu / row["ok"] * 1e6
    return row


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "req_per_s",
        "cpu_ms_per_1k",
        "process_cpu_ms_per_1k",
        "wall_s",
        "cpu_s",
        "server_busy",
        "server_cpu_us_per_req",
        "client_core_foreign",
        "peak_rss_mb",
    )
    out: dict[str, Any] = {"client": rows[0]["client"], "requests": rows[0]["requests"]}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = median(values)
            out[key + "_all"] = [round(v, 3) for v in values]
    return out


def throughput(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """Zero-latency server, fixed concurrency: rate and CPU per request, ratios per round."""
    rounds: list[dict[str, dict[str, Any]]] = []
    with Server(args.server, 0.0, setup.server_cpu) as server:
        # Warm-up: the first connections, page cache of the interpreter and the shard.
        run_one(setup, server, "floor", min(2000, args.requests), args.concurrency)
        for r in range(args.rounds):
            got: dict[str, dict[str, Any]] = {}
            for kind in args.clients:
                n = args.sdk_requests if kind in SDK_CLIENTS else args.requests
                got[kind] = run_one(setup, server, kind, n, args.concurrency)
                _log(f"round {r + 1}/{args.rounds} {_brief(got[kind])}")
            rounds.append(got)
    per_client = {kind: median_row([rnd[kind] for rnd in rounds]) for kind in args.clients}
    ratios: dict[str, Any] = {}

    def ratio(name: str, a: str, b: str, key: str) -> None:
        if a in args.clients and b in args.clients:
            values = [rnd[a][key] / rnd[b][key] for rnd in rounds]
            ratios[name] = {"median": median(values), "all": [round(v, 3) for v in values]}

    ratio("cpu_per_req asyncgen / floor", "asyncgen", "floor", "cpu_ms_per_1k")
    ratio("cpu_per_req asyncgen-gc / floor", "asyncgen-gc", "floor", "cpu_ms_per_1k")
    ratio("cpu_per_req asyncgen-gc / floor-gc", "asyncgen-gc", "floor-gc", "cpu_ms_per_1k")
    ratio("cpu_per_req asyncgen-cli / floor", "asyncgen-cli", "floor", "cpu_ms_per_1k")
    ratio("req_per_s asyncgen / floor", "asyncgen", "floor", "req_per_s")
    ratio("req_per_s asyncgen-gc / floor", "asyncgen-gc", "floor", "req_per_s")
    for sdk in SDK_CLIENTS:
        for ours in ("asyncgen", "asyncgen-gc", "asyncgen-cli"):
            ratio(f"req_per_s {ours} / {sdk}", ours, sdk, "req_per_s")
        ratio(f"cpu_per_req {sdk} / asyncgen", sdk, "asyncgen", "cpu_ms_per_1k")
    return {
        "scenario": "throughput",
        "server": args.server,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "sdk_requests": args.sdk_requests,
        "rounds": args.rounds,
        "clients": per_client,
        "ratios": ratios,
        "raw": rounds,
    }


def per_100ms(counts: list[tuple[int, int]]) -> list[int]:
    """Replies per 100 ms from the first reply on: kept in the results, so the rate can be
    looked at (or computed another way) later."""
    if not counts:
        return []
    first, per = counts[0][0], round(0.1 / BIN_S)
    series = [0] * ((counts[-1][0] - first) // per + 1)
    for k, v in counts:
        series[(k - first) // per] += v
    return series


def steady_rate(bins: dict[str, int], start: float, end: float, conc: int) -> dict[str, Any]:
    """Replies/s the server sent in the steady state, by quantiles of the reply times.

    From the moment the server had sent 1.5 C replies of the run to the moment it had sent
    all but 0.5 C (C = concurrency): the first round trip of every connection (connect,
    ramp-up) is left out, and since a closed loop against a fixed latency answers in waves,
    both ends fall in the middle of a wave, whatever its spread. Also right for a smooth flow.
    """
    counts = sorted((int(k), v) for k, v in bins.items() if start <= int(k) * BIN_S <= end + 1)
    total = sum(v for _, v in counts)
    lo, hi = 1.5 * conc, total - 0.5 * conc
    if hi <= lo:
        return {"rate": 0.0, "window_s": 0.0, "bins": per_100ms(counts)}
    seen, t_lo, t_hi = 0, None, None
    for k, v in counts:
        seen += v
        if t_lo is None and seen >= lo:
            t_lo = k
        if seen >= hi:
            t_hi = k
            break
    assert t_lo is not None and t_hi is not None
    window = (t_hi - t_lo) * BIN_S
    series = per_100ms(counts)
    if window <= 0:
        return {"rate": 0.0, "window_s": 0.0, "bins": series}
    return {"rate": (hi - lo) / window, "window_s": round(window, 2), "bins": series}


def latency(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """Latency-bound: how close each client comes to concurrency / latency."""
    results: dict[str, Any] = {}
    with Server("fast", args.latency, setup.server_cpu, args.jitter) as server:
        run_one(setup, server, "floor", 2000, 256)
        for conc in args.concurrency:
            n = conc * args.waves
            ideal = conc / args.latency
            rounds: list[dict[str, dict[str, Any]]] = []
            for r in range(args.rounds):
                got = {}
                for kind in args.clients:
                    before = server.stats()["replies"]
                    row = run_one(setup, server, kind, n, conc)
                    stats = server.stats()
                    row["server_replies"] = stats["replies"] - before
                    steady = steady_rate(
                        stats["bins"], row["started"], row["started"] + row["wall_s"], conc
                    )
                    row["steady_req_per_s"] = steady["rate"]
                    row["steady_window_s"] = steady["window_s"]
                    row["server_replies_per_100ms"] = steady["bins"]
                    row["steady_fraction"] = steady["rate"] / ideal
                    row["overall_fraction"] = row["req_per_s"] / ideal
                    got[kind] = row
                    _log(
                        f"c={conc} round {r + 1}/{args.rounds} {_brief(row)} "
                        f"steady {steady['rate']:.0f}/s over {steady['window_s']} s "
                        f"= {row['steady_fraction']:.1%} of {ideal:.0f}/s"
                    )
                rounds.append(got)
            summary = {}
            for kind in args.clients:
                rows = [rnd[kind] for rnd in rounds]
                summary[kind] = {
                    **median_row(rows),
                    "steady_req_per_s": median([x["steady_req_per_s"] for x in rows]),
                    "steady_fraction": median([x["steady_fraction"] for x in rows]),
                    "steady_fraction_all": [round(x["steady_fraction"], 4) for x in rows],
                    "steady_window_s": median([x["steady_window_s"] for x in rows]),
                    "overall_fraction": median([x["overall_fraction"] for x in rows]),
                }
            results[str(conc)] = {
                "concurrency": conc,
                "requests": n,
                "ideal_req_per_s": ideal,
                "clients": summary,
                "raw": rounds,
            }
    return {
        "scenario": "latency",
        "latency_s": args.latency,
        "jitter_s": args.jitter,
        "window_rule": "from its 1.5 C-th reply of the run to its 0.5 C-th-to-last "
        "(C = concurrency: each connection's first round trip, connect and ramp-up, left out; "
        "with waves, the window starts and ends mid-wave)",
        "waves": args.waves,
        "rounds": args.rounds,
        "by_concurrency": results,
    }


def profile(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """A client's hot path under py-spy: functions by self time (on-CPU samples only)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = args.output or setup.workdir / f"{args.client}-profile-{os.getpid()}.speedscope.json"
    # py-spy on the server's core, the profiled client on its own.
    # --nonblocking: stopping the process for every sample inflates what is measured.
    wrap = [py_spy, "record", "--nonblocking", "--rate", str(args.rate)]
    wrap += ["--format", "speedscope"]
    wrap += ["--output", str(out), "--"]
    if setup.pin:
        wrap = ["taskset", "-c", str(SERVER_CPU), *wrap, "taskset", "-c", str(CLIENT_CPU)]
    with Server("fast", args.latency, setup.server_cpu) as server:
        run_one(setup, server, "floor", 2000, args.concurrency)
        row = run_one(setup, server, args.client, args.requests, args.concurrency, wrap=wrap)
    top_self, top_total, seconds = speedscope_top(out, args.top)
    split = speedscope_split(out)
    return {
        "scenario": "profile",
        "client": args.client,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "tool": f"py-spy record --nonblocking --rate {args.rate} (on-CPU samples, all threads)",
        "speedscope": str(out),
        "run": row,
        "sampled": seconds,
        "split": split,
        "top_self": top_self,
        "top_total": top_total,
    }


def _idle(frame: dict[str, Any]) -> bool:
    """A thread-pool worker waiting for work: py-spy counts it as active, it is not."""
    return frame["name"] == "_worker" and frame.get("file", "").endswith(
        "concurrent/futures/thread.py"
    )


def speedscope_top(
    path: Path, top: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Functions by self and by inclusive time (py-spy's weights are seconds)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    self_w: Counter[int] = Counter()
    total_w: Counter[int] = Counter()
    samples = idle = 0.0
    for prof in doc["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack:
                continue
            if _idle(frames[stack[-1]]):
                idle += weight
                continue
            samples += weight
            self_w[_fn_key(frames[stack[-1]])] += weight
            for key in {_fn_key(frames[i]) for i in stack}:
                total_w[key] += weight
    names: dict[int, str] = {}
    for f in frames:
        names.setdefault(_fn_key(f), _fn_name(f))

    def table(weights: Counter[int]) -> list[dict[str, Any]]:
        return [
            {"function": names[k], "seconds": round(w, 3), "percent": round(100 * w / samples, 1)}
            for k, w in weights.most_common(top)
        ]

    return table(self_w), table(total_w), {"active_s": samples, "idle_excluded_s": idle}


# Where time goes: the first stage any frame of a sample's stack matches (in this order).
_COMMIT = ("asyncgen/store.py", "asyncgen/shards.py")
_INTAKE = ("asyncgen/sources.py", "asyncgen/items.py", "asyncgen/prompts.py")
_ENGINE = ("asyncgen/", "asyncio/timeouts.py", "asyncio/taskgroups.py", "asyncio/tasks.py")
_SPLIT: list[tuple[str, Callable[[str, str], bool]]] = [
    ("start-up (imports)", lambda name, file: file.startswith("<frozen importlib")),
    ("HTTP (aiohttp)", lambda name, file: "/aiohttp/" in file or "/aiohappyeyeballs/" in file),
    ("commit (store: encode, zstd, fsync)", lambda name, file: file.endswith(_COMMIT)),
    (
        "intake (read, expand, claim, gate)",
        lambda name, file: file.endswith(_INTAKE) or name in ("Engine._intake", "Engine._spawn"),
    ),
    (
        "engine: send, flow control, records",
        lambda name, file: any(part in file for part in _ENGINE),
    ),
    ("client code", lambda name, file: name.startswith("client_")),
]


def speedscope_split(path: Path) -> list[dict[str, Any]]:
    """Share of active time per stage of the pipeline; the event loop is what is left in
    ``Runner.run`` itself (uvloop's C code: polling, callbacks, timers)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    spent: Counter[str] = Counter()
    for prof in doc["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack or _idle(frames[stack[-1]]):
                continue
            keys = [(frames[i]["name"], frames[i].get("file", "")) for i in stack]
            for label, match in _SPLIT:
                if any(match(name, file) for name, file in keys):
                    spent[label] += weight
                    break
            else:
                leaf = keys[-1][0]
                spent["event loop" if leaf == "Runner.run" else "other"] += weight
    total = sum(spent.values())
    return [
        {"stage": k, "seconds": round(v, 3), "percent": round(100 * v / total, 1)}
        for k, v in spent.most_common()
    ]


_fn_ids: dict[tuple[str, str], int] = {}


def _fn_key(frame: dict[str, Any]) -> int:
    return _fn_ids.setdefault((frame["name"], frame.get("file", "")), len(_fn_ids))


def _fn_name(frame: dict[str, Any]) -> str:
    file = frame.get("file", "")
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{frame['name']} ({file})" if file else frame["name"]


def _brief(row: dict[str, Any]) -> str:
    return (
        f"{row['client']:15} {row['ok']:>6} req {row['req_per_s']:8.0f}/s "
        f"{row['cpu_ms_per_1k']:6.0f} ms CPU/1k  server busy {row['server_busy']:.0%} "
        f"others on client core {row.get('client_core_foreign', 0):.0%}"
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="zero latency: rate and CPU per request")
    t.add_argument("--requests", type=int, default=20_000)
    t.add_argument("--sdk-requests", type=int, default=2_000)
    t.add_argument("--concurrency", type=int, default=256)
    t.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    t.add_argument("--server", choices=("fast", "mock"), default="fast")
    lat = sub.add_parser("latency", help="latency-bound: share of concurrency / latency")
    lat.add_argument("--concurrency", type=int, nargs="+", default=[1000, 4000])
    lat.add_argument("--latency", type=float, default=1.0)
    lat.add_argument("--jitter", type=float, default=0.0, help="latency ± this, uniform")
    lat.add_argument("--waves", type=int, default=12, help="requests = concurrency x waves")
    lat.add_argument("--clients", nargs="+", default=["asyncgen", "floor"], choices=CLIENTS)
    p = sub.add_parser("profile", help="asyncgen under py-spy")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--client", choices=CLIENTS, default="asyncgen")
    p.add_argument("--latency", type=float, default=0.0, help="server latency, seconds")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--output", type=Path, help="speedscope file")
    for s in (t, lat, p):
        s.add_argument("--rounds", type=int, default=3)
        s.add_argument("--json", type=Path, help="write the whole result here")
        s.add_argument(
            "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "asyncgen-bench"
        )
        s.add_argument(
            "--no-pin",
            dest="pin",
            action="store_false",
            default=pin_default(),
            help="do not pin the server to core 0 and clients to core 1",
        )
    srv = sub.add_parser("serve", help="run the fast server (used by the others)")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--latency", type=float, default=0.0)
    srv.add_argument("--jitter", type=float, default=0.0, help="latency ± this, uniform")
    c = sub.add_parser("client", help="run one client once (used by the others)")
    c.add_argument("kind", choices=CLIENTS)
    c.add_argument("--url", required=True)
    c.add_argument("--requests", type=int, required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--shard", type=Path)
    c.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    if args.command == "serve":
        import uvloop

        raise_nofile()
        uvloop.run(serve_fast(args.port, args.latency, args.jitter))
        return
    if args.command == "client":
        run_client(args)
        return
    nofile = raise_nofile()
    args.workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(args.workdir, args.pin)
    if setup.pin:
        # This orchestrating process mostly sleeps; keep it off the client's core.
        os.sched_setaffinity(0, {SERVER_CPU})
    run = {"throughput": throughput, "latency": latency, "profile": profile}[args.command]
    result = run(args, setup)
    result["pinning"] = (
        f"server and orchestrator on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU} "
        "(sched_setaffinity)"
        if setup.pin
        else "none"
    )
    result["rlimit_nofile"] = list(nofile)
    result["command"] = " ".join(["python", "benchmarks/bench_peers.py", *(argv or sys.argv[1:])])
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.write_text(text)
    print(json.dumps(_summary(result), indent=1))


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its raw rounds, for the terminal."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "raw" and not k.endswith("_all")}
        return obj

    return strip(result)  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
