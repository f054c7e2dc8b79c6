"""Print the figures of ``benchmarks/results/latest.json`` as the Markdown tables of docs/benchmarks.md.

Not a benchmark (pytest does not collect it); run it after ``pytest benchmarks/ -s``::

    .venv/bin/python benchmarks/to_markdown.py [path/to/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parent / "results" / "latest.json"


def machine(d: dict[str, Any]) -> str:
    m = d["machine"]
    rows = [
        ("CPUs (`nproc`)", m["nproc"]),
        ("CPU model (`/proc/cpuinfo`)", m["cpu_model"]),
        ("RAM", f"{m['mem_total_gib']} GiB"),
        ("kernel", m["kernel"]),
        ("Python", m["python"]),
        ("nats-server", m["nats_server"].removeprefix("nats-server: ")),
        ("valkey-server", m["valkey_server"].removeprefix("Valkey server v=")),
        (
            "nats-py / valkey-py / msgspec / uvloop",
            f"{m['nats_py']} / {m['valkey_py']} / {m['msgspec']} / {m.get('uvloop', '?')}",
        ),
        ("heddle commit", f"`{m['heddle_commit']}`"),
        ("load average when the run started", " ".join(str(x) for x in m["load_avg_at_start"])),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def throughput(d: dict[str, Any]) -> str:
    t = d["throughput"]
    h = t["heddle"]
    b = t["baseline"]
    rows = [
        (
            "raw nats-py JetStream: publish N, then fetch + ack",
            f"{b['msgs_per_s']:,.0f} msgs/s",
            f"publish {b['publish_per_s']:,.0f}/s, consume {b['consume_per_s']:,.0f}/s",
        ),
        (
            "**heddle end to end** (async no-op)",
            f"**{h['tasks_per_s']:,.0f} tasks/s**",
            f"target >= {d['targets']['end_to_end_tasks_per_s']:,.0f}",
        ),
        ("ratio heddle / baseline (publish, then fetch + ack)", f"{t['ratio_heddle_to_baseline']:.2f}", ""),
        (
            "**ratio heddle / raw fetch + ack alone**",
            f"**{h['tasks_per_s'] / b['consume_per_s']:.2f}**",
            f"issue 16's baseline; target >= {d['targets']['end_to_end_ratio_to_raw']:.2f}",
        ),
        ("heddle end to end (sync no-op, thread pool)", f"{h['sync_task_tasks_per_s']:,.0f} tasks/s", ""),
        (
            "submission while the worker runs",
            f"{h['submit_per_s_while_worker_runs']:,.0f} tasks/s",
            "`apply_async` + pipelined publish acks",
        ),
        (
            "submission alone (worker paused)",
            f"{h['submit_only_per_s']:,.0f} tasks/s",
            f"the `apply_async()` call itself: {h['apply_async_call_us']:.0f} us",
        ),
        (
            "worker process drain alone (router + worker)",
            f"{h['worker_drain_per_s']:,.0f} tasks/s",
            "N queued, worker resumed, until every message is acked",
        ),
    ]
    out = "| measure | rate | note |\n|---|--:|---|\n"
    out += "\n".join(f"| {a} | {b_} | {c} |" for a, b_, c in rows)
    cpu = h["cpu_us_per_task"]
    total = sum(cpu.values())
    out += "\n\nCPU time per task during the end-to-end phase (from `/proc/PID/stat`):\n\n"
    out += "| process | CPU us / task | share |\n|---|--:|--:|\n"
    labels = {"worker": "worker process (router + worker)"}
    out += "\n".join(f"| {labels.get(k, k)} | {v:,.0f} | {v / total:.0%} |" for k, v in cpu.items())
    out += f"\n| all four | {total:,.0f} | |"
    return out


def latency(d: dict[str, Any]) -> str:
    lat = d["latency"]
    rows = [
        ("raw nats-py: publish + ack, fetch(1), ack", "raw_nats_round_trip"),
        ("heddle: `noop.delay().get()`", "heddle_sync_delay_get"),
        ("heddle: `await noop.apply_async().aget()`", "heddle_async_apply_async_aget"),
    ]
    out = "| path | p50 | p90 | p99 | mean | max |\n|---|--:|--:|--:|--:|--:|\n"
    for label, key in rows:
        f = lat[key]
        out += (
            f"| {label} | "
            + " | ".join(f"{f[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"))
            + " |\n"
        )
    ph = lat["sync_phases_p50_ms"]
    out += (
        "\nOne `delay().get()` split by the worker's timestamps (p50 of each phase, ms):\n\n"
        "| phase | ms | what happens |\n|---|--:|---|\n"
        f"| submit to claimed | {ph['to_claimed']:.2f} | publish, JetStream store + ack, router hop, "
        "delivery to the worker, Valkey claim |\n"
        f"| running | {ph['running']:.2f} | the no-op runs; its outcome waits for the store loop |\n"
        f"| finished to caller | {ph['to_caller']:.2f} | Valkey store, result notice, the caller wakes up |"
    )
    return out


def memory(d: dict[str, Any]) -> str:
    m = d["memory"]
    out = "| tasks run | worker RSS (MiB) | client RSS (MiB) |\n|--:|--:|--:|\n"
    for i, s in enumerate(m["samples"]):
        label = "idle" if i == 0 else f"{s['tasks']:,}" + (" (after warm-up)" if i == 1 else "")
        out += f"| {label} | {s['worker_kib'] / 1024:.1f} | {s['client_kib'] / 1024:.1f} |\n"
    out += (
        f"\nWorker growth over {m['n']:,} tasks after warm-up: {m['worker_growth_mib']:+.1f} MiB "
        f"({m['worker_growth_bytes_per_task']:+.1f} bytes/task), at {m['tasks_per_s']:,.0f} tasks/s "
        f"with {m['window']:,} in flight."
    )
    return out


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    d = json.loads(path.read_text())
    sections = [
        ("Machine", "machine", machine),
        ("Throughput", "throughput", throughput),
        ("Latency", "latency", latency),
        ("Memory", "memory", memory),
    ]
    for title, key, render in sections:
        if key in d:  # a run of only some benchmarks has only their sections
            print(f"### {title}\n\n{render(d)}\n")


if __name__ == "__main__":
    main()
