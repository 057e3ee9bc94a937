"""The benchmark suite in one command; results to ``benchmarks/results/<date>-<host>.{md,json}``.

Steps (``--only`` picks some), each a subprocess whose exact command line is recorded:

* ``peers``   — ``bench_peers.py throughput``: asyncgen, the CLI, the bare aiohttp floor and the
  openai SDK (httpx and aiohttp transports) against one fast loopback server.
* ``server``  — ``bench_peers.py throughput --server mock --clients floor``: the asyncgen mock
  server's own CPU per request, which is why the fast server is used for the others.
* ``latency`` — ``bench_peers.py latency``: Little's law at 1 s server latency.
* ``profile`` — ``bench_peers.py profile``: asyncgen (and the floor) under py-spy.
* ``memory``  — ``bench_memory.py``: peak RSS while streaming 100 k and 1 M persona lines
  (``--memory-lines`` adds 10 M).
* ``writer``  — ``bench_core.py writer``: records/s through the store.
* ``resume``  — ``bench_core.py resume``: time to the first new request with 1 M committed.
* ``large``   — with ``--memory-large N``: ``bench_memory.py --modes engine`` once at N lines
  (10 M takes 15 minutes or more), last.

Every figure is the median of ``--rounds`` runs (or more), every comparison a ratio of runs
made in the same round. The machine is described in the results (CPU, kernel, versions, load).

Usage::

    python benchmarks/run_all.py            # the full suite, about 30 minutes
    python benchmarks/run_all.py --quick    # a smoke run, about 3 minutes
    python benchmarks/run_all.py --memory-large 10000000   # and peak RSS at 10 M lines
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("peers", "server", "latency", "profile", "memory", "writer", "resume", "large")
PACKAGES = (
    "asyncgen",
    "aiohttp",
    "openai",
    "httpx",
    "httpx2",
    "msgspec",
    "zstandard",
    "uvloop",
    "py-spy",
)
TARGETS = {
    "cpu_ratio": 1.25,  # asyncgen / floor, CPU per request, at most
    "sdk_ratio": 20.0,  # asyncgen / AsyncOpenAI, requests/s, at least
    "littles_law": 0.95,  # achieved / (concurrency / latency), at least
    "resume_s": 3.0,  # first new request with 1 M committed, at most
    "writer_per_s": 300_000,  # records/s, at least
}


class Plan(argparse.Namespace):
    quick: bool
    only: list[str]
    rounds: int
    requests: int
    sdk_requests: int
    concurrency: list[int]
    waves: int
    memory_lines: list[int]
    memory_runs: int
    memory_large: int | None
    render: Path | None
    tag: str
    stem: Path
    writer_records: int
    resume_lines: int
    out: Path
    workdir: Path


def parse_args() -> Plan:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~3-minute smoke run")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--rounds", type=int, help="rounds of each comparison (full: 5 / 3)")
    parser.add_argument("--requests", type=int, help="requests per client run (full: 20000)")
    parser.add_argument("--sdk-requests", type=int, help="per openai SDK run (full: 2000)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="latency step (1000 4000)")
    parser.add_argument("--waves", type=int, help="latency step: requests = waves x concurrency")
    parser.add_argument("--memory-lines", type=int, nargs="+", help="(full: 100000 1000000)")
    parser.add_argument("--memory-runs", type=int, help="runs of each memory point (full: 3)")
    parser.add_argument(
        "--memory-large", type=int, metavar="N", help="also one engine run at N lines, last"
    )
    parser.add_argument("--writer-records", type=int, help="(full: 1000000)")
    parser.add_argument("--resume-lines", type=int, help="(full: 1000000)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="appended to the results file name")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the markdown of a results file"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "asyncgen-bench"
    )
    plan = parser.parse_args(namespace=Plan())
    full = {
        "rounds": 5,
        "requests": 20_000,
        "sdk_requests": 2_000,
        "concurrency": [1000, 4000],
        "waves": 12,
        "memory_lines": [100_000, 1_000_000],
        "memory_runs": 3,
        "writer_records": 1_000_000,
        "resume_lines": 1_000_000,
    }
    quick = {
        "rounds": 3,
        "requests": 3_000,
        "sdk_requests": 300,
        "concurrency": [1000],
        "waves": 5,
        "memory_lines": [100_000],
        "memory_runs": 1,
        "writer_records": 100_000,
        "resume_lines": 100_000,
    }
    for key, value in (quick if plan.quick else full).items():
        if getattr(plan, key, None) is None:
            setattr(plan, key, value)
    return plan


# --- machine ------------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gb = round(mem_kb / 1024**2, 1)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    dirty = _run(["git", "status", "--porcelain", "--", "asyncgen", "prompts", "pyproject.toml"])
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "packages": versions,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_uncommitted_in_package": [line[3:] for line in dirty.splitlines()],
    }


# --- steps --------------------------------------------------------------------------------------


def py(script: str, *args: object) -> list[str]:
    return [sys.executable, str(HERE / script), *map(str, args)]


def shown(argv: list[str]) -> str:
    """The command as typed from the repository root."""
    parts = ["python" if a == sys.executable else a for a in argv]
    parts = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in parts]
    return shlex.join(parts)


def run_step(argv: list[str], log: list[str]) -> str:
    log.append(shown(argv))
    print(f"$ {shown(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {shown(argv)}")
    return proc.stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def step_peers(plan: Plan, log: list[str]) -> dict[str, Any]:
    path = plan.workdir / "run-peers.json"
    run_step(
        py(
            "bench_peers.py",
            "throughput",
            "--requests",
            plan.requests,
            "--sdk-requests",
            plan.sdk_requests,
            "--rounds",
            plan.rounds,
            "--json",
            path,
        ),
        log,
    )
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def step_server(plan: Plan, log: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for server in ("mock", "fast"):
        path = plan.workdir / f"run-server-{server}.json"
        run_step(
            py(
                "bench_peers.py",
                "throughput",
                "--server",
                server,
                "--clients",
                "floor",
                "--requests",
                plan.requests,
                "--rounds",
                min(plan.rounds, 3),
                "--json",
                path,
            ),
            log,
        )
        result[server] = json.loads(path.read_text())
    return result


def step_latency(plan: Plan, log: list[str]) -> dict[str, Any]:
    """Fixed latency (as specified), then ± 0.2 s: a closed loop against a fixed latency
    answers in waves, and a wave of replies queues in the client's event loop."""
    result: dict[str, Any] = {}
    for name, jitter in (("fixed", 0.0), ("jitter", 0.2)):
        path = plan.workdir / f"run-latency-{name}.json"
        run_step(
            py(
                "bench_peers.py",
                "latency",
                "--concurrency",
                *plan.concurrency,
                "--jitter",
                jitter,
                "--clients",
                "asyncgen",
                "asyncgen-gc",
                "floor",
                "--waves",
                plan.waves,
                "--rounds",
                min(plan.rounds, 3),
                "--json",
                path,
            ),
            log,
        )
        result[name] = json.loads(path.read_text())
    return result


def step_profile(plan: Plan, log: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    clients = ("asyncgen",) if plan.quick else ("asyncgen", "floor")
    for client in clients:
        path = plan.workdir / f"run-profile-{client}.json"
        speedscope = Path(f"{plan.stem}-profile-{client}.speedscope.json")
        run_step(
            py(
                "bench_peers.py",
                "profile",
                "--client",
                client,
                "--requests",
                plan.requests,
                "--output",
                speedscope,
                "--json",
                path,
            ),
            log,
        )
        result[client] = json.loads(path.read_text())
    return result


def step_memory(plan: Plan, log: list[str]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for _ in range(plan.memory_runs):
        argv = py("bench_memory.py", "--lines", *plan.memory_lines, "--modes", "read", "engine")
        rows += json_lines(run_step(argv, log))
    return {"runs": plan.memory_runs, "rows": rows}


def step_large(plan: Plan, log: list[str]) -> dict[str, Any]:
    argv = py("bench_memory.py", "--lines", plan.memory_large, "--modes", "engine")
    return {"runs": 1, "rows": json_lines(run_step(argv, log))}


def step_writer(plan: Plan, log: list[str]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    runs = 1 if plan.quick else 3
    for _ in range(runs):
        rows += json_lines(
            run_step(py("bench_core.py", "writer", "--records", plan.writer_records), log)
        )
    return {"runs": runs, "rows": rows}


def step_resume(plan: Plan, log: list[str]) -> dict[str, Any]:
    argv = py("bench_core.py", "resume", "--lines", plan.resume_lines, "--runs", 3)
    return {"rows": json_lines(run_step(argv, log))}


STEP_FUNCS: dict[str, Callable[[Plan, list[str]], dict[str, Any]]] = {
    "peers": step_peers,
    "server": step_server,
    "latency": step_latency,
    "profile": step_profile,
    "memory": step_memory,
    "writer": step_writer,
    "resume": step_resume,
    "large": step_large,
}


# --- report -------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}".replace(",", " ")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "|".join("---:" if i else "---" for i in range(len(head)))
    lines = ["| " + " | ".join(head) + " |", f"|{align}|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def md_peers(r: dict[str, Any]) -> list[str]:
    out = [
        "## 1. Throughput and CPU per request (zero latency)",
        "",
        f"Server: `{r['server']}` (see the next section), concurrency {r['concurrency']}, "
        f"{r['requests']:,} requests per run ({r['sdk_requests']:,} for the openai SDK), "
        f"{r['rounds']} rounds, clients interleaved in every round. {r['pinning']}. "
        "CPU = user + system of the client process over the run (imports excluded); "
        '"process" = the whole process from `wait4`, start-up included. '
        '"others" = time other processes (and kernel work not charged to a process, such as '
        "I/O completion) took on the client's core during the run.",
        "",
    ]
    rows = []
    for kind, c in r["clients"].items():
        rows.append(
            [
                f"`{kind}`",
                fmt(c["requests"]),
                fmt(c["req_per_s"]),
                fmt(c["cpu_ms_per_1k"]),
                fmt(c.get("process_cpu_ms_per_1k")),
                pct(c.get("server_busy")),
                pct(c.get("client_core_foreign")),
                fmt(c.get("peak_rss_mb"), 1),
                " / ".join(fmt(v) for v in c.get("cpu_ms_per_1k_all", [])),
            ]
        )
    out += table(
        [
            "client",
            "requests",
            "req/s",
            "CPU ms / 1k req",
            "process CPU ms / 1k",
            "server busy",
            "others on client core",
            "peak RSS MB",
            "CPU ms / 1k, each round",
        ],
        rows,
    )
    ratios = r["ratios"]
    rows = []

    def target_of(name: str) -> tuple[str, Callable[[float], bool] | None]:
        # Every asyncgen client (Engine API, tuned GC, CLI) against the same two targets.
        ours, _, theirs = name.partition(" / ")
        if ours.startswith("cpu_per_req asyncgen") and theirs.startswith("floor"):
            return f"≤ {TARGETS['cpu_ratio']}", lambda v: v <= TARGETS["cpu_ratio"]
        if ours.startswith("req_per_s asyncgen") and theirs == "openai":
            return f"≥ {TARGETS['sdk_ratio']:g}", lambda v: v >= TARGETS["sdk_ratio"]
        return "", None

    for name, value in ratios.items():
        target, check = target_of(name)
        rows.append(
            [
                name,
                fmt(value["median"], 2),
                " / ".join(fmt(v, 2) for v in value["all"]),
                target,
                verdict(check(value["median"])) if check else "",
            ]
        )
    out += ["Ratios (computed within each round, median over rounds):", ""]
    out += table(["ratio", "median", "each round", "target", ""], rows)
    return out


def md_server(r: dict[str, Any]) -> list[str]:
    out = [
        "## Which server, and why",
        "",
        "The same bare aiohttp client (`floor`) against each server; server CPU per request "
        "is the server process's CPU over the run divided by the requests.",
        "",
    ]
    rows = []
    for server, res in r.items():
        c = res["clients"]["floor"]
        rows.append(
            [
                f"`{server}`",
                fmt(c["req_per_s"]),
                fmt(c.get("server_cpu_us_per_req")),
                pct(c.get("server_busy")),
                fmt(c["cpu_ms_per_1k"]),
            ]
        )
    out += table(
        ["server", "req/s", "server CPU µs / req", "server busy", "client CPU ms / 1k"], rows
    )
    mock = r.get("mock", {}).get("clients", {}).get("floor", {})
    fast = r.get("fast", {}).get("clients", {}).get("floor", {})
    if mock.get("server_cpu_us_per_req") and fast.get("server_cpu_us_per_req"):
        cap = 1e6 / mock["server_cpu_us_per_req"]
        out += [
            f"The mock server was {pct(mock['server_busy'])} busy serving the bare loop and would "
            f"saturate its core at about {fmt(cap)} requests/s, "
            f"{fmt(cap / mock['req_per_s'], 1)} times what the fastest client reaches: its own "
            "queueing would be part of what is measured (and of the 4 000 requests/s the "
            "latency-bound step needs at concurrency 4 000). The fast server costs "
            f"{fmt(fast['server_cpu_us_per_req'])} µs a request "
            f"({pct(fast['server_busy'])} busy) and is the server of every other step.",
            "",
        ]
    return out


_OLD_WINDOW = (
    "from its C-th reply of the run to its C-th-to-last (C = concurrency: the first and last "
    "round trip of each connection left out). This first version of the window is off by a "
    "few per cent either way: a slow tail of the first wave shortens it, and replies of the "
    "previous run in the second before the client started were counted; later results use "
    "quantiles from mid-wave to mid-wave"
)


def md_latency(runs: dict[str, Any]) -> list[str]:
    first = next(iter(runs.values()))
    out = [
        "## 2. Latency-bound throughput (Little's law)",
        "",
        f"Fast server with {first['latency_s']:g} s latency, fixed and then uniform "
        f"± 0.2 s; requests = concurrency x {first['waves']}; rate counted by the server "
        f"(10 ms bins) {first.get('window_rule', _OLD_WINDOW)}; "
        f"{first['rounds']} rounds. {first['pinning']}; open files {first['rlimit_nofile'][0]}. "
        "Target ≥ 95 % of concurrency / latency.",
        "",
    ]
    rows = []
    notes = []
    for r in runs.values():
        latency = f"{r['latency_s']:g}" + (f" ± {r['jitter_s']:g}" if r.get("jitter_s") else "")
        for conc, block in r["by_concurrency"].items():
            for kind, c in block["clients"].items():
                rows.append(
                    [
                        latency,
                        conc,
                        f"`{kind}`",
                        fmt(block["requests"]),
                        fmt(block["ideal_req_per_s"]),
                        fmt(c["steady_req_per_s"]),
                        pct(c["steady_fraction"]),
                        " / ".join(pct(v) for v in c["steady_fraction_all"]),
                        fmt(c["steady_window_s"], 1),
                        pct(c["overall_fraction"]),
                        fmt(c["cpu_ms_per_1k"]),
                        pct(c.get("server_busy")),
                        pct(c.get("client_core_foreign")),
                    ]
                )
            clients = block["clients"]
            floor = clients.get("floor", {}).get("steady_fraction")
            for ours in ("asyncgen", "asyncgen-gc"):
                if ours in clients:
                    frac = clients[ours]["steady_fraction"]
                    notes.append(
                        f"- latency {latency} s, concurrency {conc}: {ours} {pct(frac)} "
                        f"({verdict(frac >= TARGETS['littles_law'])}); the bare loop "
                        f"{pct(floor)}."
                    )
    out += table(
        [
            "latency s",
            "concurrency",
            "client",
            "requests",
            "ideal req/s",
            "steady req/s",
            "steady / ideal",
            "each round",
            "window s",
            "whole run / ideal",
            "client CPU ms / 1k",
            "server busy",
            "others on client core",
        ],
        rows,
    )
    return [*out, *notes, ""]


def md_profile(r: dict[str, Any]) -> list[str]:
    out = ["## Profile of the hot path", ""]
    for client, p in r.items():
        run = p["run"]
        out += [
            f"`{client}`, {p['requests']:,} requests at concurrency {p['concurrency']}, "
            f"{p['tool']}; {fmt(p['sampled']['active_s'], 2)} s on CPU sampled "
            f"({fmt(p['sampled']['idle_excluded_s'], 2)} s of an idle thread-pool worker left "
            f"out); the run: {fmt(run['req_per_s'])} req/s, {fmt(run['cpu_ms_per_1k'])} ms CPU "
            "per 1 000 requests under the profiler.",
            "",
        ]
        out += table(
            ["stage", "share of CPU"],
            [[s["stage"], f"{s['percent']} %"] for s in p["split"]],
        )
        out += table(
            ["#", "function (self time)", "share"],
            [
                [str(i), f"`{f['function']}`", f"{f['percent']} %"]
                for i, f in enumerate(p["top_self"][:10], 1)
            ],
        )
    return out


def md_memory(r: dict[str, Any], title: str = "") -> list[str]:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in r["rows"]:
        groups.setdefault((row["lines"], row["mode"]), []).append(row)
    rows = []
    for (lines, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rss = [x["peak_rss_mb"] for x in rs]
        rows.append(
            [
                fmt(lines),
                mode,
                fmt(statistics.median(x["seconds"] for x in rs), 1),
                fmt(statistics.median(rss), 1),
                " / ".join(fmt(v, 1) for v in rss),
            ]
        )
    head = ["lines", "mode", "seconds", "peak RSS MB (median)", "each run"]
    if title:
        return [title, "", *table(head, rows)]
    return [
        "## 3. Memory: peak RSS streaming `.jsonl.zst` persona shards",
        "",
        "`bench_memory.py`: each point in a fresh process; `read` = source and expand only, "
        "`engine` = the whole pipeline through an in-process transport that answers at once. "
        f"{r['runs']} run(s) per point. Target: flat in N.",
        "",
        *table(head, rows),
    ]


def md_writer(r: dict[str, Any]) -> list[str]:
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in r["rows"]:
        groups.setdefault(row["batch"], []).append(row)
    rows = []
    for batch, rs in sorted(groups.items()):
        rates = [x["records_per_s"] for x in rs]
        rows.append(
            [
                fmt(batch),
                fmt(rs[0]["records"]),
                fmt(statistics.median(rates)),
                " / ".join(fmt(v) for v in rates),
                fmt(statistics.median(x["cpu_s"] / x["records"] * 1e6 for x in rs), 2),
                fmt(statistics.median(x["bytes_per_record"] for x in rs), 1),
                verdict(statistics.median(rates) >= TARGETS["writer_per_s"]),
            ]
        )
    return [
        "## 5. Writer: records/s through `Store.commit`",
        "",
        "`bench_core.py writer`: ~1.2 kB result records (100-word replies from a 3 000-word "
        "vocabulary), msgspec `encode_lines`, zstd level 1 (a batch of 512 records or more as one "
        "frame per usable core, compressed at once), the data synced, then the ledger line "
        f"(an index, not synced). {r['runs']} run(s). Target ≥ 300 000 records/s.",
        "",
        *table(
            [
                "batch",
                "records",
                "records/s (median)",
                "each run",
                "CPU µs / record",
                "bytes / record",
                "target",
            ],
            rows,
        ),
    ]


def md_resume(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            fmt(x["committed"]),
            fmt(x["ledger_mb"], 2),
            fmt(x["first_request_s_median"], 2),
            " / ".join(fmt(v, 2) for v in x["first_request_s_all"]),
            verdict(x["first_request_s_median"] <= TARGETS["resume_s"]),
        ]
        for x in r["rows"]
    ]
    return [
        "## 4. Resume: time to the first new request",
        "",
        "`bench_core.py resume`: an output directory holds N committed results; a fresh process "
        "runs the same job with one more shard of new personas; time from process start to its "
        "first new request. Target ≤ 3 s at 1 M.",
        "",
        *table(["committed", "ledger MB", "first request s (median)", "each run", "target"], rows),
    ]


RENDER: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "peers": md_peers,
    "server": md_server,
    "latency": md_latency,
    "profile": md_profile,
    "memory": md_memory,
    "resume": md_resume,
    "writer": md_writer,
    "large": lambda r: md_memory(r, "### Memory at a large input (one run)"),
}


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    out = [
        f"# Benchmarks {doc['date']} on {m['host']}{' (quick)' if doc['quick'] else ''}",
        "",
        f"Command: `{doc['command']}` — {fmt(doc['seconds'] / 60, 1)} minutes in all.",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gb']} GB; kernel {m['kernel']}; Python {m['python']}",
        f"- packages: {pkgs}",
        f"- asyncgen at commit {m['git_commit']}"
        + (
            f" with uncommitted changes in {', '.join(m['git_uncommitted_in_package'])} "
            "(a shared working tree)"
            if m["git_uncommitted_in_package"]
            else ""
        ),
        "- load average (1 min) at the start of each step: "
        + ", ".join(f"{k} {v['load_before']:.2f}" for k, v in doc["steps"].items()),
        "",
    ]
    for name in ("peers", "server", "latency", "memory", "large", "resume", "writer", "profile"):
        step = doc["steps"].get(name)
        if step is None:
            continue
        if "error" in step:
            out += [f"## {name}: failed", "", f"```\n{step['error']}\n```", ""]
            continue
        out += RENDER[name](step["result"])
    out += ["## Commands", "", "```"]
    for step in doc["steps"].values():
        out += step["commands"]
    out += ["```", ""]
    return "\n".join(out)


def main() -> int:
    plan = parse_args()
    if plan.render is not None:
        doc = json.loads(plan.render.read_text())
        plan.render.with_name(plan.render.name.removesuffix(".json") + ".md").write_text(
            markdown(doc)
        )
        return 0
    started = time.monotonic()
    plan.workdir.mkdir(parents=True, exist_ok=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    today = dt.date.today().isoformat()
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()) or "host"
    suffix = ("-quick" if plan.quick else "") + (f"-{plan.tag}" if plan.tag else "")
    stem = plan.stem = plan.out / f"{today}-{host}{suffix}"
    doc: dict[str, Any] = {
        "date": today,
        "quick": plan.quick,
        "command": shlex.join(["python", "benchmarks/run_all.py", *sys.argv[1:]]),
        "machine": machine(),
        "targets": TARGETS,
        "steps": {},
        "seconds": 0.0,
    }
    failed = False
    for name in STEPS:
        if name not in plan.only or (name == "large" and not plan.memory_large):
            continue
        commands: list[str] = []
        step: dict[str, Any] = {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "load_before": os.getloadavg()[0],
            "commands": commands,
        }
        t0 = time.monotonic()
        try:
            step["result"] = STEP_FUNCS[name](plan, commands)
        except Exception as exc:  # one failed step must not lose the others
            step["error"] = str(exc)
            failed = True
        step["seconds"] = round(time.monotonic() - t0, 1)
        step["load_after"] = os.getloadavg()[0]
        doc["steps"][name] = step
        doc["seconds"] = round(time.monotonic() - started, 1)
        # Written after every step, so an interrupted suite keeps what it measured.
        Path(f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        Path(f"{stem}.md").write_text(markdown(doc))
    print(f"results: {stem}.md, {stem}.json", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
