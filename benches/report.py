"""Statistics, ratios, targets, the text tables and the chart of a benchmark run."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import catalog

LABELS = {entry.name: entry.label for entry in catalog.SCENARIOS}
SHORT = {entry.name: entry.short for entry in catalog.SCENARIOS}
CPY2PY = [name for name in catalog.named("latency") if name.startswith("cpy2py-")]
#: startup bars: bare interpreters, the floor, cpy2py, peers (the rest)
COLORS = {"bare": "#bbbbbb", "raw": "#555555", "cpy2py": "#2ca02c"}
PAYLOADS = catalog.PAYLOADS
WAKEUP_NOTE = (
    "Unpinned, master and child may run on different cores: on a 2-core machine the wake-up of\n"
    "the idle core can add tens of microseconds to a round trip, and noise from other work lands\n"
    "on either core; compare transports in the pinned pass."
)


def wakeup_note(results: Dict[str, Any]) -> str:
    """The note, with what this run measured."""
    passes = results["passes"]
    if "pinned" not in passes or "unpinned" not in passes:
        return WAKEUP_NOTE
    parts = []
    for name in ("raw-cpython", "raw-pypy"):
        a, b = med(passes["pinned"]["noop"], name), med(passes["unpinned"]["noop"], name)
        if a and b:
            parts.append(f"{SHORT[name]} {b / 1e3:.1f} us unpinned vs {a / 1e3:.1f} us pinned")
    if not parts:
        return WAKEUP_NOTE
    return WAKEUP_NOTE + "\nIn this run the floor was " + ", ".join(parts) + "."


def percentile(ordered: List[float], q: float) -> float:
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats(values: List[float]) -> Dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "min": float(ordered[0]),
        "p10": percentile(ordered, 0.10),
        "p25": percentile(ordered, 0.25),
        "median": percentile(ordered, 0.50),
        "p75": percentile(ordered, 0.75),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": float(ordered[-1]),
    }


def interp(name: str) -> str:
    return name.rsplit("-", 1)[-1]


def floor_of(name: str) -> str:
    return "raw-pypy" if interp(name) == "pypy" else "raw-cpython"


def med(table: Dict[str, Any], name: str) -> Optional[float]:
    entry = table.get(name)
    return entry["median"] if entry else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# -- derived figures ------------------------------------------------------------------


def derive(results: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for label, p in results["passes"].items():
        noop, payload, startup = p["noop"], p["payload"], p["startup"]
        d: Dict[str, Any] = {
            "noop_ratios": {},
            "payload_ratios": {},
            "startup_over_bare_ns": {},
            "targets": [],
        }
        for name in noop:
            i = interp(name)
            peers = {
                "floor": floor_of(name),
                "mp-pipe": "mp-pipe",
                "execnet": f"execnet-{'pypy' if i == 'pypy' else 'cpython'}",
                "rpyc": f"rpyc-{'pypy' if i == 'pypy' else 'cpython'}",
                "original": f"original-{'pypy' if i == 'pypy' else 'cpython'}",
            }
            d["noop_ratios"][name] = {k: ratio(med(noop, name), med(noop, v)) for k, v in peers.items()}
        for name, kinds in payload.items():
            d["payload_ratios"][name] = {
                kind: {
                    "floor": ratio(med(kinds, kind), med(payload.get(floor_of(name), {}), kind)),
                    "mp-pipe": ratio(med(kinds, kind), med(payload.get("mp-pipe", {}), kind)),
                }
                for kind in kinds
            }
        for name, parts in startup.items():
            bare = startup.get(f"bare-{'pypy' if interp(name) == 'pypy' else 'cpython'}")
            # a WASI guest runs inside the master and mp.Pipe forks without exec: no bare start to compare
            if bare and not name.startswith("bare-") and name not in ("cpy2py-wasi", "mp-pipe"):
                d["startup_over_bare_ns"][name] = parts["startup"]["median"] - bare["startup"]["median"]
        d["targets"] = targets(p)
        out[label] = d
    return out


def targets(p: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The call path's targets (issues 10 and 16), checked against this pass (never asserted)."""
    noop, payload, startup = p["noop"], p["payload"], p["startup"]
    rows = []

    def add(
        what: str, target: str, measured: Optional[float], limit: Optional[float], unit: str, scale: float
    ):
        met = None if measured is None or limit is None else measured <= limit
        rows.append(
            {
                "target": what,
                "limit": target,
                "measured": None if measured is None else measured / scale,
                "limit_value": None if limit is None else limit / scale,
                "unit": unit,
                "met": met,
            }
        )

    for name, floor in (("cpy2py-cpython", "raw-cpython"), ("cpy2py-pypy", "raw-pypy")):
        kind = SHORT[name]
        f = med(noop, floor)
        add(f"{kind} no-op <= 1.5x floor", "1.5x raw pipe", med(noop, name), f and 1.5 * f, "us", 1e3)
        m = med(noop, "mp-pipe")
        add(f"{kind} no-op <= mp.Pipe / 2", "0.5x mp.Pipe", med(noop, name), m and m / 2, "us", 1e3)
        add(f"{kind} no-op <= mp.Pipe", "mp.Pipe", med(noop, name), m, "us", 1e3)  # (unpinned)
    # (issue 10: 20 us, and 10 us the goal after it)
    add("cpy2py wasi no-op <= 20 us", "20 us", med(noop, "cpy2py-wasi"), 20e3, "us", 1e3)
    f = med(noop, "raw-ssh-cpython")
    add(
        "cpy2py ssh py3 no-op <= 1.5x raw ssh",
        "1.5x raw SSH round trip",
        med(noop, "cpy2py-ssh-cpython"),
        f and 1.5 * f,
        "us",
        1e3,
    )
    for name, bare in (("cpy2py-cpython", "bare-cpython"), ("cpy2py-pypy", "bare-pypy")):
        s = startup.get(name, {}).get("startup", {}).get("median")
        b = startup.get(bare, {}).get("startup", {}).get("median")
        add(f"{SHORT[name]} start <= bare + 15 ms", "bare + 15 ms", s, b and b + 15e6, "ms", 1e6)
    s = startup.get("cpy2py-wasi", {}).get("startup", {}).get("median")
    add("cpy2py wasi start <= 10 ms", "10 ms", s, 10e6, "ms", 1e6)
    for name, floor in (("cpy2py-cpython", "raw-cpython"), ("cpy2py-pypy", "raw-pypy")):
        got = med(payload.get(name, {}), "bytes-1MiB")
        f = med(payload.get(floor, {}), "bytes-1MiB")
        add(f"{SHORT[name]} 1 MiB echo <= 1.3x floor", "1.3x raw pipe", got, f and 1.3 * f, "ms", 1e6)
        got = med(payload.get(name, {}), "bytes-64MiB")
        f = med(payload.get(floor, {}), "bytes-64MiB")
        add(f"{SHORT[name]} 64 MiB echo <= 1.5x floor", "1.5x raw pipe", got, f and 1.5 * f, "ms", 1e6)
        for kind, what in (("list-10k-ints", "10k-int list"), ("dict-10k-nested", "10k nested dict")):
            got = med(payload.get(name, {}), kind)
            m = med(payload.get("mp-pipe", {}), kind)
            add(f"{SHORT[name]} {what} <= mp.Pipe", "mp.Pipe", got, m, "ms", 1e6)
    for kind, what in (("list-10k-ints", "10k-int list"), ("dict-10k-nested", "10k nested dict")):
        got = med(payload.get("cpy2py-wasi", {}), kind)
        py3 = med(payload.get("cpy2py-cpython", {}), kind)
        add(f"cpy2py wasi {what} <= 5x py3", "5x python3 twin", got, py3 and 5 * py3, "ms", 1e6)
    return rows


def concurrency_targets(found: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 10's many threads and issue 15's awaited calls, checked against
    benches/concurrency.py's run (never asserted)."""
    rows: List[Dict[str, Any]] = []
    if not found or "error" in found:
        return rows

    def add(what: str, target: str, measured: Optional[float], limit: float, at_least: bool) -> None:
        met = None if measured is None else (measured >= limit if at_least else measured <= limit)
        rows.append({"target": what, "limit": target, "measured": measured, "limit_value": limit, "met": met})

    for kind, m in found["kinds"].items():
        if "error" in m or kind == FLOOR:
            continue
        threads = ratio(m.get("eight_threads_per_s"), m.get("one_thread_per_s"))
        add(f"{kind}: 8 threads >= 1 thread", "1.0x", threads, 1.0, True)
        add(f"{kind}: await <= 1.3x sync", "1.3x", ratio(m.get("async_us"), m.get("sync_us")), 1.3, False)
        awaits = ratio(m.get("hundred_awaits_per_s"), m.get("eight_threads_per_s"))
        add(f"{kind}: 100 awaits >= 8 threads", "1.0x", awaits, 1.0, True)
        mixed = ratio(m.get("hundred_awaits_mixed_per_s"), m.get("eight_threads_mixed_per_s"))
        if mixed is not None:  # (a run from before the figure existed has none)
            add(f"{kind}: ... 1 call in 50 of 3 ms", "1.0x", mixed, 1.0, True)
    return rows


# -- text -----------------------------------------------------------------------------


def fmt(value: Optional[float], scale: float, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def fx(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(header: List[str], rows: List[List[str]], first_width: Optional[int] = None) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    if first_width:
        widths[0] = max(widths[0], first_width)
    lines = []
    for k, row in enumerate([header] + rows):
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def missing_rows(p: Dict[str, Any], names: List[str]) -> List[str]:
    out = []
    for name in names:
        info = p["scenarios"].get(name)
        if info and info.get("status") != "ok":
            out.append(f"  {LABELS.get(name, name)}: {info.get('status')}: {info.get('reason')}")
    return out


def _ratio_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The ratios against peers of a pass."""
    out: List[str] = []
    rows = []
    for name in CPY2PY:
        r = d["noop_ratios"].get(name)
        if r:
            rows.append(
                [LABELS[name]] + [fx(r.get(k)) for k in ("floor", "mp-pipe", "execnet", "rpyc", "original")]
            )
    if rows:
        out.append(
            "\ncpy2py no-op median as a multiple of (same child interpreter; < 1 means cpy2py is faster)"
        )
        out.append(table(["", "floor", "mp.Pipe", "execnet", "RPyC", "original"], rows, 38))
    return out


def _halves_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The halves of a pass."""
    out: List[str] = []
    rows = []
    for name in p["scenarios"]:
        h = p["halves"].get(name)
        if h:
            rows.append(
                [LABELS.get(name, name)]
                + [fmt(h["call"][k], 1e3) for k in ("p10", "median", "p90")]
                + [fmt(h["reply"][k], 1e3) for k in ("p10", "median", "p90")]
            )
    if rows:
        out.append("\nCall and reply halves (us; CLOCK_MONOTONIC, which all processes share)")
        out.append(table(["", "call p10", "median", "p90", "reply p10", "median", "p90"], rows, 38))
    return out


def _startup_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The startup of a pass."""
    out: List[str] = []
    rows = []
    for name in p["scenarios"]:
        s = p["startup"].get(name)
        if not s:
            continue
        over = d["startup_over_bare_ns"].get(name)
        rows.append(
            [LABELS.get(name, name)]
            + [fmt(s["startup"][k], 1e6) for k in ("p10", "median", "p90", "p99")]
            + [str(s["startup"]["n"]), "-" if over is None else f"{over / 1e6:+.1f}"]
            + (
                [fmt(s["first_call"]["median"], 1e3), fmt(s["stop"]["median"], 1e6)]
                if not name.startswith("bare")
                else ["-", "-"]
            )
        )
    if rows:
        out.append("\nStartup: launch to first answered call (ms); first call alone (us); stop (ms)")
        out.append(
            table(
                ["", "p10", "median", "p90", "p99", "starts", "vs bare", "1st call us", "stop ms"], rows, 38
            )
        )
    return out


def _original_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The original's scenarios of a pass."""
    out: List[str] = []
    rows = []
    for name in p["scenarios"]:
        m = p["many"].get(name)
        s = p["startup"].get(name)
        n = p["noop"].get(name)
        if m or (s and name in catalog.named("many")):
            rows.append(
                [
                    LABELS.get(name, name),
                    fmt(m and m["median"], 1e3),
                    str(m["n"]) if m else "-",
                    fmt(s and s["first_call"]["median"], 1e3),
                    fmt(n and n["median"], 1e3),
                ]
            )
    if rows:
        out.append(
            "\nThe original's scenarios (us per call): many calls per start (mean over "
            f"{p.get('many_calls')} calls incl. warm-up, median over starts); one call per start; "
            "warm steady state"
        )
        out.append(table(["", "many/start", "starts", "one/start", "steady"], rows, 38))
    return out


def _payload_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The payloads of a pass."""
    out: List[str] = []
    rows, ratio_rows = [], []
    for name in p["scenarios"]:
        kinds = p["payload"].get(name)
        if not kinds:
            continue
        rows.append([LABELS.get(name, name)] + [fmt(med(kinds, k), 1e6, 2) for k in PAYLOADS])
        if name.startswith("cpy2py") or name == "mp-pipe":
            r = d["payload_ratios"][name]
            ratio_rows.append(
                [LABELS.get(name, name)]
                + [f"{fx(r.get(k, {}).get('floor'))} / {fx(r.get(k, {}).get('mp-pipe'))}" for k in PAYLOADS]
            )
    if rows:
        out.append("\nPayload echo round trip, a fresh object each time (median ms)")
        out.append(table([""] + PAYLOADS, rows, 38))
        out.append(
            "  raw pipe: bytes written as they are, other payloads as pickle protocol 5 "
            "(loaded and dumped again by the child)"
        )
        out.append("\nPayload echo as a multiple of the raw pipe (same child) / of multiprocessing.Pipe")
        out.append(table([""] + PAYLOADS, ratio_rows, 38))
    return out


def _e2e_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The end to end of a pass."""
    out: List[str] = []
    if p["e2e"]:
        e = p["e2e"]
        out.append("\nEnd to end: the tutorial's sum_series (examples/tutorial.py), median s")
        rows = [
            ["pinned to PyPy, including the twin's start", fmt(med(e, "pinned-cold"), 1e9, 3)],
            ["pinned to PyPy, twin already running", fmt(med(e, "pinned-warm"), 1e9, 3)],
            ["unpinned, in the master (CPython)", fmt(med(e, "unpinned"), 1e9, 3)],
        ]
        out.append(table(["", "seconds"], rows, 38))
    elif p.get("e2e_error"):
        out.append(f"\nEnd to end failed: {p['e2e_error']}")

    if p.get("errors"):
        out.append("\nFailed or skipped measurements (the rest of their scenario went on):")
        out += [f"  {key}: {msg}" for key, msg in p["errors"].items()]
    return out


def _targets_section(p: Dict[str, Any], d: Dict[str, Any]) -> List[str]:
    """The call path's targets and whether this pass met them."""
    out: List[str] = []
    rows = []
    for t in d["targets"]:
        state = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        digits = 1 if t["unit"] == "us" else 2
        rows.append(
            [
                t["target"],
                "-" if t["measured"] is None else f"{t['measured']:.{digits}f} {t['unit']}",
                "-" if t["limit_value"] is None else f"{t['limit_value']:.{digits}f} {t['unit']}",
                state,
            ]
        )
    out.append("\nTargets of issues 10 and 16 (median vs limit; benchmarks measure, tests never assert them)")
    out.append(table(["", "measured", "limit", ""], rows, 38))
    return out


def render_pass(label: str, p: Dict[str, Any], d: Dict[str, Any], note: str = WAKEUP_NOTE) -> str:
    cpus = p["cpus"]
    where = f"all processes pinned to CPU {cpus[0]}" if label == "pinned" else f"unpinned, CPUs {cpus}"
    load = f"load average before {p['loadavg_before'][0]:.2f}, after {p['loadavg_after'][0]:.2f}"
    out = [f"=== {label} pass: {where} ({p['seconds']:.0f} s; {load}) ==="]
    if label != "pinned":
        out.append(note)
    for name, info in p["scenarios"].items():
        if info.get("affinity_warning"):
            out.append(f"WARNING {name}: {info['affinity_warning']}")

    # no-op calls
    rows = []
    for name in p["scenarios"]:
        s = p["noop"].get(name)
        if s is None:
            continue
        r = d["noop_ratios"].get(name, {})
        rows.append(
            [LABELS.get(name, name)]
            + [fmt(s[k], 1e3) for k in ("p10", "median", "p90", "p99")]
            + [str(s["n"]), fx(r.get("floor"))]
        )
    out.append("\nNo-op call round trip (us)")
    out.append(table(["", "p10", "median", "p90", "p99", "calls", "x floor"], rows, 38))
    out += missing_rows(p, [n for n in p["scenarios"] if not n.startswith("bare-")])
    out += _ratio_section(p, d)
    out += _halves_section(p, d)
    out += _startup_section(p, d)
    out += _original_section(p, d)
    out += _payload_section(p, d)
    out += _e2e_section(p, d)
    out += _targets_section(p, d)
    return "\n".join(out)


def render(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    dirty = " + uncommitted changes" if meta["cpy2py"]["dirty"] else ""
    out = [
        f"cpy2py benchmark, {meta['mode']} run, {meta['date']}",
        f"machine: {meta['machine']['cpu']}, {meta['machine']['cpus']} CPUs, {meta['machine']['platform']}",
        f"master: {meta['master']['version'].splitlines()[0]} ({meta['master']['executable']})",
        f"python3: {meta['python3']['version']}  |  pypy3: {meta['pypy3']['version'].replace(chr(10), ' ')}",
        f"cpy2py: {meta['cpy2py']['commit'][:12]}{dirty}; "
        + ", ".join(f"{k} {v}" for k, v in meta["peers"].items()),
    ]
    if meta["cpy2py"].get("overridden"):
        out.append(f"cpy2py benchmarked from {meta['cpy2py']['source']} (BENCH_CPY2PY_PATH)")
    if meta["cpy2py"].get("baseline"):
        out.append(f"baseline rows: the cpy2py in {meta['cpy2py']['baseline']} (BENCH_CPY2PY_BASELINE)")
    first = next(iter(results["passes"].values()), {"scenarios": {}})
    for name in ("cpy2py-cpython", "cpy2py-pypy", "cpy2py-wasi"):
        desc = first["scenarios"].get(name, {}).get("describe") or {}
        if desc:
            out.append(
                f"{name}: twin {desc.get('implementation')} {desc.get('version')}, "
                f"codec {desc.get('codec')} there and {desc.get('master_codec')} in the master"
            )
    for label, p in results["passes"].items():
        out.append("")
        out.append(render_pass(label, p, results["derived"][label], wakeup_note(results)))
    passes = results["passes"]
    if "pinned" in passes and "unpinned" in passes:
        rows = []
        for name in passes["pinned"]["noop"]:
            a, b = med(passes["pinned"]["noop"], name), med(passes["unpinned"]["noop"], name)
            rows.append(
                [
                    LABELS.get(name, name),
                    fmt(a, 1e3),
                    fmt(b, 1e3),
                    "-" if a is None or b is None else f"{(b - a) / 1e3:+.1f}",
                ]
            )
        out.append("\n=== pinned vs unpinned: no-op median (us) ===")
        out.append(wakeup_note(results))
        out.append(table(["", "pinned", "unpinned", "difference"], rows, 38))
    out.extend(_concurrency_section(results.get("concurrency")))
    out.extend(_concurrency_section(results.get("concurrency_unpinned"), "unpinned"))
    out.extend(_sandbox_section(results.get("sandbox")))
    rust = results.get("rust")
    if rust:
        out.append("\n=== Rust: codec and framing (criterion, benches/codec.rs) ===")
        if "error" in rust:
            out.append("cargo bench failed:\n" + rust["error"])
        else:
            rows = []
            for name, e in rust["benches"].items():
                ns = e["median_ns"]
                when = (
                    f"{ns:.1f} ns" if ns < 1e3 else f"{ns / 1e3:.2f} us" if ns < 1e6 else f"{ns / 1e6:.2f} ms"
                )
                thr = f"{e['bytes'] / ns:.2f} GB/s" if e.get("bytes", 0) >= 1024 else ""
                rows.append([name, when, thr])
            out.append(
                f"(run on CPUs {rust.get('cpus')}; pipe-round-trip: a frame to an echo thread and back)"
            )
            out.append(table(["", "median", "throughput"], rows, 38))
    return "\n".join(out)


def _concurrency_section(found: Optional[Dict[str, Any]], label: str = "") -> List[str]:
    if not found:
        return []
    title = "many threads and asyncio, one twin" + (f", {label}" if label else "")
    out = [f"\n=== {title} (benches/concurrency.py) ==="]
    if "error" in found:
        return out + ["failed:\n" + found["error"]]
    out.append(
        f"(run on CPUs {found.get('cpus')}; no-op calls unless mixed; an awaited call is "
        "`await twin.execute_async`, 100 awaits are concurrent tasks on one event loop)"
    )
    rows = []
    for kind, m in found["kinds"].items():
        if "error" in m:
            rows.append([kind, m["error"][:60], *([""] * (3 + len(_RATES)))])
            continue
        rates = [f"{m[key]:.0f}" if key in m else "-" for key in _RATES]
        ratio = f"{m['async_us'] / m['sync_us']:.2f}x"
        rows.append([kind, f"{m['sync_us']:.1f}", f"{m['async_us']:.1f}", ratio, *rates])
    header = [
        "",
        "sync us",
        "await us",
        "await/sync",
        "1 thread/s",
        "8 threads/s",
        "100 awaits/s",
        "mixed: 8 thr/s",
        "100 aw/s",
    ]
    note = (
        "raw pipe: an os.pipe ping-pong, the awaited one read by a reader callback that resolves the "
        "awaited future (benches/asyncio_floor.py): what asyncio itself adds; mixed: calls of which "
        "one in 50 runs 3 ms"
    )
    out += [table(header, rows, 14), note]
    pauses = [(kind, m["loop_pause_ms"]) for kind, m in found["kinds"].items() if "loop_pause_ms" in m]
    for kind, pause in pauses:
        out.append(
            f"{kind}: the event loop waited at most {pause:.1f} ms (median over calls) while an awaited "
            "call ran for 50 ms (the loop runs the guest for its first 2 ms slice)"
        )
    goals = concurrency_targets(found)
    if goals:
        out.append(
            "\nTargets of issues 10 (many threads) and 15 (asyncio); ratios of the table above"
            + (
                " (the targets are for the pinned run; this one is what users on many cores see)"
                if label
                else ""
            )
        )
        rows = [
            [
                t["target"],
                "-" if t["measured"] is None else f"{t['measured']:.2f}x",
                t["limit"],
                {True: "met", False: "NOT met", None: "-"}[t["met"]],
            ]
            for t in goals
        ]
        out.append(table(["", "measured", "limit", ""], rows, 38))
    return out


#: the row of the raw pipe in the concurrency table (benches/concurrency.py)
FLOOR = "raw pipe"
#: the calls per second of the concurrency table, by key
_RATES = (
    "one_thread_per_s",
    "eight_threads_per_s",
    "hundred_awaits_per_s",
    "eight_threads_mixed_per_s",
    "hundred_awaits_mixed_per_s",
)


#: eryx's published figures (the README of https://github.com/eryx-org/eryx,
#: measured on its machine, not this one): Rust + wasmtime +
#: componentize-py CPython, the closest peer of the sandboxed twin
ERYX = {
    "fresh_ms": "about 1.3 (pass in a fresh instance from a warm pool)",
    "rss_mib": "4-10 per extra sandbox",
    "preinit_ms": "1-5 per run with pre-initialization",
}


def _sandbox_section(found: Optional[Dict[str, Any]]) -> List[str]:
    if not found:
        return []
    out = [
        "\n=== sandbox pools and fresh guests (benches/sandbox_pool.py), beside eryx's published figures "
        "(github.com/eryx-org/eryx, README; measured on its machine) ==="
    ]
    if "error" in found:
        return out + ["failed:\n" + found["error"]]
    fresh, reused = found["fresh_call_ms"], found["reused_call_ms"]
    nan = float("nan")  # (a run from before the figure existed)
    rows = [
        ["fresh guest, started by the call (ms)", f"{fresh['median']:.2f}", f"{fresh['p99']:.2f}", ""],
        [
            "fresh guest from a warm pool, preloaded (ms)",
            f"{found['warm_fresh_call_ms']['median']:.2f}",
            f"{found['warm_fresh_call_ms']['p99']:.2f}",
            ERYX["fresh_ms"],
        ],
        ["same guest, no-op call (ms)", f"{reused['median']:.3f}", f"{reused['p99']:.3f}", ""],
        ["idle pooled guest (MiB of master RSS)", f"{found['idle_guest_rss_mib']:.1f}", "", ERYX["rss_mib"]],
        ["... of which it wrote (MiB)", f"{found.get('idle_guest_written_mib', nan):.1f}", "", ""],
        ["... its proportional share, PSS (MiB)", f"{found.get('idle_guest_pss_mib', nan):.1f}", "", ""],
        [
            "idle pooled guest, preloaded (MiB of RSS)",
            f"{found.get('idle_preloaded_guest_rss_mib', nan):.1f}",
            "",
            "",
        ],
        ["... of which it wrote (MiB)", f"{found.get('idle_preloaded_guest_written_mib', nan):.1f}", "", ""],
    ]
    if found.get("stdlib_import_ms") is not None:
        rows.append(
            ["import 12 stdlib modules in a new guest (ms)", f"{found['stdlib_import_ms']:.0f}", "", ""]
        )
    imported = found.get("packages_import_ms")
    if imported:
        rows.append(["import markdown+dateutil, from source (ms)", f"{imported['from_source']:.0f}", "", ""])
        rows.append(["... packages= with cached bytecode (ms)", f"{imported['cached_bytecode']:.0f}", "", ""])
        if "cached_bytecode_ready" in imported:  # (a run from before the figure existed: none)
            rows.append(
                ["... a new guest started and ready (ms)", f"{imported['cached_bytecode_ready']:.0f}", "", ""]
            )
    snapshot = found.get("snapshot_fresh_call_ms")
    if snapshot:
        preloaded, importing = snapshot["preloaded"], snapshot["importing"]
        rows.append(
            [
                "fresh guest, markdown+dateutil preloaded: snapshot (ms)",
                f"{preloaded['median']:.2f}",
                f"{preloaded['p99']:.2f}",
                ERYX["preinit_ms"],
            ]
        )
        warm = snapshot.get("warm_pool")  # (a run from before the figure existed: none)
        if warm:
            rows.append(
                [
                    "... from a warm pool (ms)",
                    f"{warm['median']:.2f}",
                    f"{warm['p99']:.2f}",
                    ERYX["fresh_ms"],
                ]
            )
        rows.append(
            [
                "... the same guest importing them itself (ms)",
                f"{importing['median']:.1f}",
                f"{importing['p99']:.1f}",
                "",
            ]
        )
    big = found.get("big_module_fresh_call_ms")
    if big:
        rows.append(
            [
                "fresh guest, snapshot of a 1,000-line module (ms)",
                f"{big['median']:.2f}",
                f"{big['p99']:.2f}",
                "",
            ]
        )
    rss = found.get("fresh_calls_rss_mib")
    if rss:
        rows.append(
            [
                "master RSS after " + ", ".join(f"{n}" for n in rss) + " fresh calls (MiB)",
                " / ".join(f"{mib:.0f}" for mib in rss.values()),
                "",
                "",
            ]
        )
    out.append(table(["", "median", "p99", "eryx (README)"], rows, 12))
    rates = " ".join(
        f"{n} guest(s): {rate:.0f}/s ({found['speedup'][n]:.2f}x, {found['cores_busy'][n]:.2f} cores busy)"
        for n, rate in found["pool_calls_per_s"].items()
    )
    out.append(f"CPU-bound calls through a SandboxPool ({found['work_per_call']} iterations each): {rates}")
    rows = [
        [t["target"], t["measured"], t["limit"], {True: "met", False: "NOT met", None: "n/a"}[t["met"]]]
        for t in sandbox_targets(found)
    ]
    out.append("\nTargets of issue 14 (benchmarks measure, tests never assert this)")
    out.append(table(["", "measured", "limit", ""], rows, 38))
    return out


def sandbox_targets(found: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue 14's targets, checked against benches/sandbox_pool.py's figures."""
    rows: List[Dict[str, Any]] = []

    def add(what: str, measured: Optional[float], limit: float, unit: str, at_least: bool = False) -> None:
        met = None if measured is None else (measured >= limit if at_least else measured <= limit)
        shown = "-" if measured is None else f"{measured:.2f} {unit}"
        rows.append({"target": what, "measured": shown, "limit": f"{limit:g} {unit}", "met": met})

    warm = found.get("warm_fresh_call_ms") or {}
    add("fresh guest, warm pool: median <= 1 ms", warm.get("median"), 1, "ms")
    add("fresh guest, warm pool: p99 <= 3 ms", warm.get("p99"), 3, "ms")
    add("idle pooled guest <= 4 MiB of RSS", found.get("idle_guest_rss_mib"), 4, "MiB")
    two = found.get("speedup", {}).get(2) or found.get("speedup", {}).get("2")
    add("2 guests on 2 cores >= 1.8x one", two, 1.8, "x", at_least=True)
    rss = list((found.get("fresh_calls_rss_mib") or {}).values())
    # "flat": what 950 more fresh guests leave is less than one idle guest holds
    add("RSS flat over 1,000 fresh calls (growth)", rss[-1] - rss[0] if len(rss) > 1 else None, 2, "MiB")
    big, fresh = found.get("big_module_fresh_call_ms"), found.get("fresh_call_ms")
    if big and fresh:
        add("1,000-line module snapshot: fresh <= none", big["median"], fresh["median"], "ms")
    imported = found.get("packages_import_ms") or {}
    # ready: the guest started and the imports done (the guest's start included)
    ready = imported.get("cached_bytecode_ready", imported.get("cached_bytecode"))
    add("markdown+dateutil, cached: ready <= 50 ms", ready, 50, "ms")
    snapshot = (found.get("snapshot_fresh_call_ms") or {}).get("warm_pool") or {}
    add("markdown+dateutil preloaded, fresh <= 1 ms", snapshot.get("median"), 1, "ms")
    return rows


# -- chart ----------------------------------------------------------------------------


def chart(results: Dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    passes = results["passes"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 7.5), gridspec_kw={"width_ratios": [1.25, 1.2, 0.9]})
    _chart_noop(axes[0], passes)
    # payloads and startup of the pinned pass if present
    label = "pinned" if "pinned" in passes else list(passes)[0]
    _chart_payload(axes[1], passes, label, plt.get_cmap("tab10"))
    _chart_startup(axes[2], passes, label)
    meta = results["meta"]
    fig.suptitle(
        f"cpy2py benchmark ({meta['mode']}, {meta['date'][:16]}, {meta['machine']['cpus']} CPUs)", fontsize=12
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _chart_noop(ax: Any, passes: Dict[str, Any]) -> None:
    """No-op medians with p10-p90 whiskers, a bar per pass."""
    labels = list(passes)
    colors = {"pinned": "#1f77b4", "unpinned": "#ff7f0e"}
    names = [
        n for n in next(iter(passes.values()))["scenarios"] if any(n in p["noop"] for p in passes.values())
    ]
    height = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        noop = passes[label]["noop"]
        ys, xs, lo, hi = [], [], [], []
        for i, name in enumerate(names):
            s = noop.get(name)
            if s:
                ys.append(i + (k - (len(labels) - 1) / 2) * height)
                xs.append(s["median"] / 1e3)
                lo.append((s["median"] - s["p10"]) / 1e3)
                hi.append((s["p90"] - s["median"]) / 1e3)
        ax.barh(
            ys,
            xs,
            height=height,
            xerr=[lo, hi],
            color=colors.get(label),
            label=label,
            capsize=2,
            error_kw={"elinewidth": 0.8},
        )
        for y, x, h in zip(ys, xs, hi):
            ax.text(x + h, y, f" {x:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([SHORT.get(n, n) for n in names])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("microseconds (log scale); bar = median, whiskers p10-p90")
    ax.set_title("No-op call round trip")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)


def _chart_payload(ax: Any, passes: Dict[str, Any], label: str, cmap: Any) -> None:
    """Payload echo medians of one pass, a bar per transport."""
    payload = passes[label]["payload"]
    transports = [n for n in passes[label]["scenarios"] if n in payload]
    width = 0.8 / max(len(transports), 1)
    for k, name in enumerate(transports):
        xs, ys = [], []
        for i, kind in enumerate(PAYLOADS):
            m = med(payload[name], kind)
            if m is not None:
                xs.append(i + (k - (len(transports) - 1) / 2) * width)
                ys.append(m / 1e6)
        ax.bar(xs, ys, width=width, label=SHORT.get(name, name), color=cmap(k))
    ax.set_xticks(range(len(PAYLOADS)))
    ax.set_xticklabels(PAYLOADS)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds per round trip (log scale), median")
    ax.set_title(f"Payload echo ({label} pass)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)


def _chart_startup(ax: Any, passes: Dict[str, Any], label: str) -> None:
    """Startup medians of one pass with p10-p90 whiskers."""
    startup = passes[label]["startup"]
    names = [n for n in passes[label]["scenarios"] if n in startup]
    ax.barh(
        range(len(names)),
        [startup[n]["startup"]["median"] / 1e6 for n in names],
        xerr=[
            [(startup[n]["startup"]["median"] - startup[n]["startup"]["p10"]) / 1e6 for n in names],
            [(startup[n]["startup"]["p90"] - startup[n]["startup"]["median"]) / 1e6 for n in names],
        ],
        color=[COLORS.get(n.split("-")[0], "#9467bd") for n in names],
        capsize=2,
    )
    for i, n in enumerate(names):
        ax.text(
            startup[n]["startup"]["p90"] / 1e6,
            i,
            f" {startup[n]['startup']['median'] / 1e6:.0f}",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([SHORT.get(n, n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds, launch to first answered call (median, p10-p90)")
    ax.set_title(f"Startup ({label} pass)")
    ax.grid(axis="x", alpha=0.3)
