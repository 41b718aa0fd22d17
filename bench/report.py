"""RESULTS.md and the chart of `bench/run.py`, from its results: every figure of the run in one
table, ours beside the peer (nats-server's own WebSocket listener) and the ceiling, with issue
18's target for the figures it sets one for."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeGuard

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("ours", "peer", "ceiling")
JS_STREAM = "chat"  # the catch-up's stream (provisioned like the stack's)
TAIL_STREAM = "tail"  # the tail's stream (made by the bench, ours only)
SAMPLE_S = 0.05  # how often run.py reads a stream's NATS consumer count during a phase
COUNTS = ("consumers", "conns", "msgs")  # units shown as whole numbers


def known(v: float | None) -> TypeGuard[float]:
    return v is not None and v == v  # not NaN


def quotient(a: float | None, b: float | None) -> float | None:
    return a / b if known(a) and known(b) and b else None


@dataclasses.dataclass(frozen=True)
class Target:
    """A target of issue 18: on ours ÷ peer (`of="ratio"`) or on ours' own value."""

    text: str
    op: str  # ">=" or "<="
    bound: float
    of: str = "ratio"

    def met(self, vals: dict[str, float | None]) -> bool | None:
        x = quotient(vals["ours"], vals["peer"]) if self.of == "ratio" else vals["ours"]
        if not known(x):
            return None
        return x >= self.bound if self.op == ">=" else x <= self.bound


FANOUT = Target("≥ 1.5x", ">=", 1.5)
LATENCY = Target("≤ 1.0x", "<=", 1.0)
CONNECT = Target("≥ 1.0x (ours with auth)", ">=", 1.0)
CATCH_UP = Target("≥ 1.5x", ">=", 1.5)
IDLE = Target("≤ 12 KiB", "<=", 12.0, of="ours")
TAIL = Target("1 per gateway process (1 here)", "<=", 1, of="ours")
AS_TODAY = Target("0, as today", "<=", 0, of="ours")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    unit: str
    better: str
    vals: dict[str, float | None]
    note: str = ""  # why some column is n/a
    target: Target | None = None
    short: str = ""  # its label on the chart's ratio panel (ratio targets only)


# ---------------------------------------------------------------------- figures


def figures(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[Row]:
    def get(kind: str, *path: Any) -> float | None:
        d: Any = results.get(kind, {})
        for p in path:
            if not isinstance(d, dict) or p not in d or d[p] is None:
                return None
            d = d[p]
        return float(d)

    def each(*path: Any) -> dict[str, float | None]:
        return {k: get(k, *path) for k in KINDS}

    rows: list[Row] = []
    for n in args.n:
        rows.append(
            Row(
                f"fan-out N={n:,}: delivered",
                "msg/s",
                "higher",
                each("fanout", n, "throughput", "rate"),
                target=FANOUT,
                short=f"fan-out N={n:,}",
            )
        )
    for n in args.n:
        m = args.messages if n < 5000 else args.messages_big
        rows.append(
            Row(
                f"burst of {m:,} msgs at max rate to N={n:,} (default settings): connections "
                "closed",
                "conns",
                "lower",
                each("fanout", n, "throughput", "closed"),
                target=AS_TODAY,
            )
        )
    for n in args.n:
        rows.append(
            Row(
                f"fan-out N={n:,}: deliveries per server-side CPU-second",
                "msg/s",
                "higher",
                each("fanout", n, "throughput", "per_cpu_s"),
            )
        )
    for n in args.n:
        for q in ("p50", "p99"):
            rows.append(
                Row(
                    f"fan-out N={n:,}: latency {q} at {args.rate:g} msg/s",
                    "ms",
                    "lower",
                    each("fanout", n, "latency", q),
                    target=LATENCY,
                    short=f"{q} N={n:,}",
                )
            )
    rows += [
        Row(
            f"idle: RSS per connection ({args.idle:,} conns)",
            "KiB",
            "lower",
            each("idle", "rss_kb_per_conn"),
            target=IDLE,
        ),
        Row(
            f"connect rate ({args.idle:,} handshakes, {args.procs}x{args.concurrency} in flight)",
            "/s",
            "higher",
            each("connect", "rate"),
            "peer and ceiling: no auth",
            target=CONNECT,
            short="connect",
        ),
        Row(
            f"KV fan-out to {args.kv_clients:,} kv_sub: PUT → last client p50",
            "ms",
            "lower",
            each("kv", "p50"),
            "peer/ceiling: n/a (no KV watch over their protocol here)",
        ),
        Row(
            f"KV fan-out to {args.kv_clients:,} kv_sub: PUT → last client p99",
            "ms",
            "lower",
            each("kv", "p99"),
        ),
        Row(
            f"JetStream catch-up: {args.js_clients} clients x {args.js_messages:,} msgs",
            "msg/s",
            "higher",
            each("js", "rate"),
            "ceiling: n/a (core NATS only)",
            target=CATCH_UP,
            short="catch-up",
        ),
        Row(
            f"JetStream catch-up: time until all {args.js_clients} are done",
            "s",
            "lower",
            each("js", "elapsed"),
        ),
        Row(
            "JetStream catch-up: NATS consumers on the stream during it (max, sampled every "
            f"{SAMPLE_S * 1000:.0f} ms)",
            "consumers",
            "lower",
            each("js", "consumers_max"),
        ),
    ]
    n, k = args.tail_clients, args.tail_messages
    for mode, what in (("same", "one filter"), ("distinct", "a filter each")):
        rows.append(
            Row(
                f"tail: NATS consumers for {n:,} js_sub clients, {what} (1 s after all subscribed)",
                "consumers",
                "lower",
                each("tail", mode, "consumers"),
                "tail: ours only (nats-server's listener has no js_sub: a browser there makes "
                "its own consumer through $JS.API, as the catch-up's peer clients do)"
                if mode == "same"
                else "",
                target=TAIL if mode == "same" else None,
            )
        )
        rows.append(
            Row(
                f"tail, {what}: deliveries of {k} msg per filter to {n:,} clients",
                "msgs",
                "higher",
                each("tail", mode, "delivered"),
                target=Target(f"all {n * k:,}", ">=", n * k, of="ours"),
            )
        )
    rows.append(
        Row(
            f"tail, one filter: publish → last of {n:,} clients got {k} msg",
            "ms",
            "lower",
            {
                kind: (v * 1000 if known(v) else None)
                for kind, v in each("tail", "same", "elapsed").items()
            },
        )
    )
    loss = {kind: lost_total(results[kind], args) if kind in results else None for kind in KINDS}
    for i, what in enumerate(("messages lost", "sequence holes")):
        vals = {kind: (float(v[i]) if v else None) for kind, v in loss.items()}
        rows.append(Row(f"{what}, all runs", "msgs", "lower", vals, target=AS_TODAY))
    return rows


def lost_total(res: dict[str, Any], args: argparse.Namespace) -> tuple[int, int]:
    lost = holes = 0
    for _, w in all_runs(res, args):
        lost += w["lost"]
        holes += w["seq_holes"]
    if "kv" in res:
        lost += res["kv"]["lost"]
    return lost, holes


def all_runs(res: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    runs = []
    for n, f in res.get("fanout", {}).items():
        rates = f["throughput"].get("rates", [])
        spread = (
            f" (median of {', '.join(f'{r / 1e6:.2f}M' for r in rates)})" if len(rates) > 1 else ""
        )
        runs.append((f"fan-out N={n} max rate{spread}", f["throughput"]))
        runs.append((f"fan-out N={n} {args.rate:g} msg/s", f["latency"]))
    if "js" in res:
        runs.append(("JetStream catch-up", res["js"]))
    for mode, w in res.get("tail", {}).items():
        runs.append((f"tail ({'one filter' if mode == 'same' else 'a filter each'})", w))
    return runs


# ---------------------------------------------------------------------- RESULTS.md


def git_state() -> str:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "a tree outside git"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ws_gateway", "shared")
    return f"commit {head}" + (
        " with uncommitted changes in ws_gateway/ or shared/" if dirty else ""
    )


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    nats_v = subprocess.run(
        [str(Path(sys.executable).parent / "nats-server"), "--version"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    import websockets

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "mem": mem,
        "python": platform.python_version(),
        "nats": nats_v,
        "websockets": websockets.__version__,
        "kernel": platform.release(),
    }


def fmt(v: float | None, unit: str) -> str:
    if not known(v):
        return "n/a"
    if unit in ("msg/s", "/s", *COUNTS):
        return f"{v:,.0f}"
    if unit == "KiB":
        return f"{v:.1f}"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    q = quotient(a, b)
    return "n/a" if q is None else f"{q:.2f}x"


def met_cell(row: Row) -> str:
    if row.target is None:
        return ""
    met = row.target.met(row.vals)
    return "n/a" if met is None else ("yes" if met else "**no**")


def write_report(
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    started: dt.datetime,
    took: float,
    out: Path,
    png: Path,
    nofile: tuple[int, int],
    load_before: float,
) -> None:
    m = machine()
    rows = figures(results, args)
    verdicts = [r.target.met(r.vals) for r in rows if r.target is not None]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`bench/run.py`); do not edit by hand. Ratios are ours ÷ the "
        "other server for each figure; whether a ratio above 1 is good depends on the "
        "*better* column (msg/s: higher; ms, KiB: lower).",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, the whole run took {took:.0f} s",
        f"- command: `{args.command}`, on {git_state()}",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['mem']} RAM, Linux {m['kernel']}, "
        f"loopback only; Python {m['python']}, websockets {m['websockets']}, {m['nats']}",
        f"- file descriptors: soft limit raised to {nofile[0]} (hard {nofile[1]}); N is "
        f"capped at what it allows, none was needed here"
        if max([*args.n, args.idle]) + 256 < nofile[0]
        else f"- file descriptors: limit {nofile}: N capped to fit",
        f"- load client: {args.procs} processes of "
        + (
            "`bench/loadclient.js` (Node, `ws` from npm)"
            if args.client == "node"
            else "`bench/loadclient.py` (`websockets` asyncio client on uvloop)"
        )
        + ", the connections split evenly between them; the same for every server",
        f'- messages: ~200-byte JSON `{{"seq","ts","pad"}}` published over core NATS by '
        f"the driver; throughput runs (the bursts) of {args.messages:,} messages "
        f"({args.messages_big:,} at N ≥ 5,000) at max publish rate after 50 warm-up messages, "
        f"the median of {args.repeat} runs (1 at N ≥ 5,000); "
        f"latency runs of {args.latency_messages} messages at {args.rate:g} msg/s",
        "- ours: `python -m ws_gateway` (bearer JWT on every upgrade, capability checks, "
        "docs/protocol.md envelopes), default limits (SEND_QUEUE_BYTES 1 MiB) except "
        "MAX_CONNECTIONS_PER_USER and MAX_READERS_PER_USER (one bench user holds every "
        "connection, kv_sub and js_sub); peer: nats-server's `websocket { no_tls: true }` "
        "listener with NATS protocol clients, no auth; ceiling: `bench/ceiling.py`",
        f"- JetStream: catch-up = {args.js_clients} clients each replaying the {JS_STREAM} "
        f"stream's {args.js_messages:,} messages from start_seq 1 (ours: `js_sub`, batch "
        f"{args.js_batch}; peer: a pull consumer each through `$JS.API`, batches of "
        f"{args.js_batch}), the stream's NATS consumer count read every "
        f"{SAMPLE_S * 1000:.0f} ms meanwhile; "
        f"tail (ours only) = {args.tail_clients:,} clients `js_sub` the {TAIL_STREAM} stream "
        f"(`{TAIL_STREAM}.>`, allow_direct) with the default start (new messages only), first "
        f"all with the filter `{TAIL_STREAM}.all`, then each with its own "
        f"(`{TAIL_STREAM}.c.<pid>.<i>`); consumers counted 1 s after every `ok`, then "
        f"{args.tail_messages} message published per filter",
        "- how to read it: server, nats-server and the load clients share the same 2 "
        "cores, so a run's figure is bounded by all of them together (CPU per process is in "
        "*Every run* below). For peer all the fan-out work is inside nats-server; for ours "
        "and ceiling nats-server delivers each message once and the Python process fans it "
        "out. Delivered msg/s at max publish rate rewards batching: ours and ceiling join "
        "what queued in one event-loop tick into one frame (the *frames* column), nats-server "
        "writes about one WebSocket frame per flush per connection",
        "- deliveries per server-side CPU-second: delivered messages ÷ the CPU time the "
        "server side used in the max-rate run (peer: nats-server; ours and ceiling: the "
        "Python process + nats-server), over all the repeats; less sensitive to a busy "
        "machine than msg/s (CPU time is counted in 10 ms ticks: coarse at N = 100)",
        f"- machine load before the run (1-minute load average of 2 cores): {load_before:.2f}; "
        f"after: {os.getloadavg()[0]:.2f} (the run itself keeps about 2 busy). Above ~0.5 "
        "before, something else was running and the figures are noisier",
        "- target: issue 18's, on ours ÷ peer of this run unless it names a value (KiB, "
        "consumers, deliveries: ours' own figure); *0, as today*: issue 18's \"no figure of "
        "today's RESULTS.md gets worse\" for the figures that are 0 today. Benchmark figures, "
        f"not test assertions. Of {len(verdicts)} targets: **{verdicts.count(True)} met, "
        f"{verdicts.count(False)} missed**, {verdicts.count(None)} n/a (a server not in this "
        "run)",
        "",
        "| figure | better | ours | peer | ceiling | ours/peer | ours/ceiling | target "
        "(issue 18) | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    notes: list[str] = []
    for r in rows:
        cells = [fmt(r.vals[k], r.unit) for k in KINDS]
        lines.append(
            f"| {r.name} ({r.unit}) | {r.better} | {' | '.join(cells)} | "
            f"{ratio(r.vals['ours'], r.vals['peer'])} | "
            f"{ratio(r.vals['ours'], r.vals['ceiling'])} | "
            f"{r.target.text if r.target else ''} | {met_cell(r)} |"
        )
        if r.note:
            notes.append(f"{r.name}: {r.note}")
    lines += [
        "",
        "n/a: " + "; ".join(notes),
        "",
        f"![fan-out]({png.name})",
        "",
        "## Every run",
        "",
        "CPU is the share of one core over the run (the load client: each process; "
        "a process near 100% means the client may be the bottleneck). Lost = expected - "
        "received when the window ended (all received, or its timeout: a timed-out run's "
        "lost messages may have been late rather than dropped); seq holes = sequence "
        "numbers skipped before the last one received.",
        "",
        "| server | run | conns | delivered / expected | lost | seq holes | closed | "
        "time s | msg/s | frames | server CPU | nats CPU | client CPU | msg per "
        "server-side CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for k in KINDS:
        for name, w in all_runs(results.get(k, {}), args):
            if w.get("timed_out"):
                name += " **timed out**"
            lines.append(
                f"| {k} | {name} | {w['conns']:,} | {w['delivered']:,} / {w['expected']:,} | "
                f"{w['lost']:,} | {w['seq_holes']:,} | {w['closed']} | {w['elapsed']:.2f} | "
                f"{w['rate']:,.0f} | {w['frames']:,} | {w['server_cpu']:.0%} | "
                f"{w['nats_cpu']:.0%} | {' + '.join(f'{c:.0%}' for c in w['client_cpu'])} | "
                f"{fmt(w.get('per_cpu_s'), 'msg/s')} |"
            )
    busy = [
        f"{k} {name} ({' + '.join(f'{c:.0%}' for c in w['client_cpu'])})"
        for k in KINDS
        for name, w in all_runs(results.get(k, {}), args)
        if max(w["client_cpu"], default=0) >= 0.8
    ]
    hot = [
        f"{k} {name} ({w['server_cpu']:.0%})"
        for k in KINDS
        for name, w in all_runs(results.get(k, {}), args)
        if w["server_cpu"] >= 0.9
    ]
    lines += [
        "",
        "Runs where a load-client process used ≥ 80% of a core (the client may limit "
        "them): " + ("; ".join(busy) if busy else "none") + ".",
        "",
        "Runs where the server process used ≥ 90% of a core (server-bound; peer's "
        "server is nats-server, multi-threaded, so it can exceed 100%): "
        + ("; ".join(hot) if hot else "none")
        + ".",
        "",
        "## Other figures",
        "",
    ]
    for k in KINDS:
        lines += other_figures(k, results.get(k, {}))
    out.write_text("\n".join(lines) + "\n")


def other_figures(k: str, res: dict[str, Any]) -> list[str]:
    lines = []
    if "idle" in res:
        i, c = res["idle"], res["connect"]
        lines.append(
            f"- {k}: idle {i['n']:,} connections: server RSS {i['server_rss_mb'][0]:.0f} → "
            f"{i['server_rss_mb'][1]:.0f} MiB, nats-server {i['nats_rss_mb'][0]:.0f} → "
            f"{i['nats_rss_mb'][1]:.0f} MiB; opening them: server CPU "
            f"{c['server_cpu']:.0%}, clients "
            f"{' + '.join(f'{x:.0%}' for x in c['client_cpu'])}"
        )
    if "kv" in res:
        v = res["kv"]
        lines.append(
            f"- {k}: KV fan-out, {v['updates']} sequential PUTs to {v['n']:,} kv_sub "
            f"clients: PUT → last client p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms, max "
            f"{v['max']:.1f} ms; → first client p50 {v['first_p50']:.1f} ms; HTTP "
            f"response p50 {v['http_p50']:.1f} ms; missing {v['lost']}; NATS consumers "
            f"on KV_articles with the {v['n']:,} clients subscribed to one key: "
            f"{v['consumers'][0]} (1 s after all synced), {v['consumers'][1]} (after the "
            "PUTs)"
        )
    if "js" in res:
        j = res["js"]
        lines.append(
            f"- {k}: JetStream catch-up: NATS consumers on stream {JS_STREAM}: at most "
            f"{j['consumers_max']} in {j['consumer_samples']} samples during the run "
            f"({j['consumer_samples_failed']} samples failed), {j['consumers']} when all were "
            "done"
        )
    for mode, t in res.get("tail", {}).items():
        gone = t["released_s"]
        lines.append(
            f"- {k}: tail, {'one filter' if mode == 'same' else 'a filter each'}: "
            f"{t['subscribed']:,} of {t['n']:,} js_sub answered `ok`; NATS consumers on stream "
            f"{TAIL_STREAM}: {t['consumers']} 1 s after, at most {t['consumers_max']} from the "
            f"first js_sub to the last delivery ({t['consumer_samples']} samples); "
            f"{t['delivered']:,} of "
            f"{t['expected']:,} deliveries in {t['elapsed'] * 1000:.0f} ms (publish → last "
            "client); consumers gone "
            + (f"{gone:.1f} s after the clients closed" if gone is not None else "NOT within 15 s")
        )
    for e in res.get("errors", []):
        lines.append(f"- {k}: error: {e}")
    return lines


# ---------------------------------------------------------------------- chart


def chart(results: dict[str, dict[str, Any]], args: argparse.Namespace, png: Path) -> None:
    """Fan-out and latency by N for each server; catch-up and connect rate, ours beside the
    peer; ours ÷ peer against issue 18's target for every figure it sets one on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(12, 8.4))
    style = {"ours": ("tab:blue", "o"), "peer": ("tab:orange", "s"), "ceiling": ("tab:green", "^")}
    names = {
        "ours": "ours (ws_gateway)",
        "peer": "peer (nats-server WebSocket)",
        "ceiling": "ceiling (Python broadcast)",
    }
    for k in KINDS:
        fan = results.get(k, {}).get("fanout", {})
        ns = sorted(fan)
        if not ns:
            continue
        color, marker = style[k]
        ax1.plot(
            ns,
            [fan[n]["throughput"]["rate"] for n in ns],
            marker=marker,
            color=color,
            label=names[k],
        )
        ax2.plot(
            ns,
            [fan[n]["latency"]["p99"] for n in ns],
            marker=marker,
            color=color,
            label=f"{names[k]} p99",
        )
        ax2.plot(
            ns,
            [fan[n]["latency"]["p50"] for n in ns],
            marker=marker,
            color=color,
            linestyle="--",
            alpha=0.6,
            label=f"{k} p50",
        )
    ax1.set(
        xscale="log",
        xlabel="subscribers N",
        ylabel="delivered msg/s",
        title=f"fan-out at max publish rate ({args.messages:,}-msg bursts)",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="subscribers N",
        ylabel="latency (ms)",
        title=f"end-to-end p99 (solid) and p50 (dashed) at {args.rate:g} msg/s",
    )
    ticker = matplotlib.ticker
    ax1.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax2.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(args.n, [f"{n:,}" for n in args.n])
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.legend(fontsize=7)
    ax1.set_ylim(bottom=0)
    side_by_side(ax3, results, style, names)
    against_targets(ax4, figures(results, args))
    ax3.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax4.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax4.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax4.xaxis.set_minor_formatter(ticker.NullFormatter())
    fig.suptitle(
        f"ws_gateway vs nats-server WebSocket vs Python ceiling — {os.cpu_count()} "
        f"cores, loopback, {dt.datetime.now(dt.UTC):%Y-%m-%d}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def side_by_side(
    ax: Any, results: dict[str, dict[str, Any]], style: dict[str, Any], names: dict[str, str]
) -> None:
    groups = [
        ("JetStream catch-up\n(msg/s)", ("js", "rate")),
        ("connect rate\n(handshakes/s)", ("connect", "rate")),
    ]
    width = 0.38
    for j, k in enumerate(("ours", "peer")):
        vals = []
        for _, (part, key) in groups:
            v = results.get(k, {}).get(part, {}).get(key)
            vals.append(v if known(v) else 0.0)
        xs = [i + (j - 0.5) * width for i in range(len(groups))]
        bars = ax.bar(xs, vals, width, color=style[k][0], label=names[k])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "n/a" for v in vals], fontsize=7)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set(yscale="log", title="ours beside the peer")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)


def against_targets(ax: Any, rows: list[Row]) -> None:
    shown = [r for r in rows if r.target is not None and r.target.of == "ratio"]
    labels, ratios, colors, bounds = [], [], [], []
    for r in shown:
        assert r.target is not None
        labels.append(r.short or r.name)
        q = quotient(r.vals["ours"], r.vals["peer"])
        ratios.append(float("nan") if q is None else q)
        met = r.target.met(r.vals)
        colors.append("tab:green" if met else ("tab:red" if met is False else "tab:gray"))
        bounds.append(r.target.bound)
    ys = list(range(len(shown)))
    ax.barh(ys, [x if x == x else 0 for x in ratios], color=colors, alpha=0.8)
    ax.scatter(bounds, ys, marker="|", s=250, color="black", label="issue-18 target", zorder=3)
    for y, x in zip(ys, ratios, strict=True):
        ax.annotate(
            f"{x:.2f}x" if x == x else "n/a",
            (x if x == x else 0, y),
            fontsize=7,
            xytext=(3, -3),
            textcoords="offset points",
        )
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(
        xscale="log",
        xlabel="ours ÷ peer (green: target met; latency: lower is better)",
        title="ours ÷ peer against issue 18's targets",
    )
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7)
