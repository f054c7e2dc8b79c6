"""Print the figures of ``benchmarks/results/peers.json`` as the tables of docs/benchmarks.md ("Against the peers").

Not a benchmark (pytest does not collect it); run it after ``pytest benchmarks/peers -s``::

    .venv/bin/python benchmarks/peers/to_markdown.py [path/to/peers.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parent.parent / "results" / "peers.json"


def _ratio(fig: dict[str, Any], key: str) -> str:
    return f"{fig[key]:.2f}" if key in fig else ""


def summary(d: dict[str, Any]) -> str:
    p = d["peers"]
    out = (
        "| framework | version | broker | throughput, tasks/s | ratio to Heddle | round trip p50 / p99 ms "
        "| ratio p50 | fan-out/fan-in ms, median (max) | ratio |\n|---|---|---|--:|--:|--:|--:|--:|--:|\n"
    )
    for name, info in p["frameworks"].items():
        for variant in info["variants"]:
            fig = p["medians"].get(variant)
            if not fig:
                continue
            first = variant == info["variants"][0]
            rt = fig.get("round_trip")
            cells = [
                f"**{variant}**" if variant == "heddle" else variant,
                info["version"] if first else "",
                info["broker"] if first and name != "heddle -c 16" else "",
                f"{fig['tasks_per_s']:,.0f}" if "tasks_per_s" in fig else "",
                _ratio(fig, "throughput_ratio_to_heddle"),
                f"{rt['p50_ms']:.2f} / {rt['p99_ms']:.2f}" if rt else "",
                _ratio(fig, "round_trip_p50_ratio_to_heddle"),
                f"{fig['fan_out_ms']:.0f} ({fig['fan_out_max_ms']:.0f})" if "fan_out_ms" in fig else "",
                _ratio(fig, "fan_out_ratio_to_heddle"),
            ]
            out += "| " + " | ".join(cells) + " |\n"
    return out


def how(d: dict[str, Any]) -> str:
    out = "| framework | worker command (one process) | concurrency | fan-out/fan-in |\n|---|---|---|---|\n"
    for name, info in d["peers"]["frameworks"].items():
        out += f"| {name} | `{info['worker_command']}` | {info['concurrency']} | {info['fan_in']} |\n"
    return out


def cpu(d: dict[str, Any]) -> str:
    out = "| framework | worker | client | nats-server | valkey-server | all |\n|---|--:|--:|--:|--:|--:|\n"
    for variant, fig in d["peers"]["medians"].items():
        c = fig.get("cpu_us_per_task")
        if c:
            cells = " | ".join(f"{c[k]:,.0f}" for k in ("worker", "client", "nats-server", "valkey-server"))
            out += f"| {variant} | {cells} | {sum(c.values()):,.0f} |\n"
    return out


def machine(d: dict[str, Any]) -> str:
    m = d["machine"]
    pk = ", ".join(f"{k} {v}" for k, v in m["peer_packages"].items())
    return (
        f"{d['started']}: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']} GiB, Python {m['python']}, "
        f"{m['nats_server']}, valkey {m['valkey_server']}, nats-py {m['nats_py']}, heddle `{m['heddle_commit']}` "
        f"(imported from {m.get('heddle_imported_from', '?')}), load average at start "
        f"{' '.join(str(x) for x in m['load_avg_at_start'])}; {pk}; "
        f"{d['config']['rounds']} rounds, N={d['config']['n']:,}, {d['config']['latency_n']} round trips, "
        f"{d['config']['fanout_repeats']} fan-outs per round"
    )


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    d = json.loads(path.read_text())
    print(machine(d), end="\n\n")
    print(summary(d))
    print(how(d))
    print(cpu(d))


if __name__ == "__main__":
    main()
