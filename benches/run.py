"""`just bench`: what a cpy2py call costs, against the floor and the peers, in one run.

    .venv-bench/bin/python benches/run.py [--quick] [--rust] [--out results]

The coordinator starts one driver process (benches/driver.py) per scenario,
each the master of its own child or twin, and sends them batches round-robin
in a shuffled order per round, so that machine noise hits all scenarios
alike. Two passes: every process pinned to one CPU (affinity set here and
inherited by drivers, children and twins; checked on the far side), then
unpinned. Prints tables, writes results/bench-<time>.json and .png (and
bench-latest.*). See benches/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import catalog  # noqa: E402
import report  # noqa: E402

# -- what is measured -----------------------------------------------------------------

# the scenarios and their roles: catalog.py
LATENCY = catalog.named("latency")
START_ONLY = catalog.named("start-only")
#: BENCH_CPY2PY_BASELINE=/other/checkout/guest-python (with its own _host built):
#: that copy's python3 and pypy3 twins start in the same rounds as this copy's
#: (startup only), so that a before/after comparison sees the same machine noise
BASELINE = catalog.named("baseline")
PAYLOAD_SCENARIOS = catalog.named("payload")
PAYLOADS = catalog.PAYLOADS
MANY = catalog.named("many")
START_MAIN = set(catalog.named("start-main"))


def start_only(name: str) -> bool:
    return name in START_ONLY or name in BASELINE


PLANS = {
    "full": {
        "rounds": 20,
        "warmup": 5000,
        "warmup_halves": 500,
        # round trips of each payload (but 64 MiB) before any is timed: PyPy's
        # JIT takes about 100 of a 10k-int list and 200 of a 1 MiB bytes to
        # settle (pypy3 twin, pinned: 1.5 -> 0.9 ms and 3.7 -> 1.7 ms)
        "payload_warmup": 200,
        "noop": 1000,  # per round
        "halves": 250,  # per round
        "payload": {"bytes-1MiB": 100, "bytes-64MiB": 10, "list-10k-ints": 100, "dict-10k-nested": 60},
        "start_main": 20,
        "start_peer": 8,
        "many": 5,
        "many_calls": 5000,
        "e2e": 3,
        "e2e_max_n": 10_000_000,
    },
    "quick": {
        "rounds": 4,
        "warmup": 2000,
        "warmup_halves": 100,
        # as many as the full plan's: fewer left a pypy3 twin's JIT unsettled,
        # and the quick run then reported its payloads twice as slow
        "payload_warmup": 200,
        "noop": 500,
        "halves": 100,
        "payload": {"bytes-1MiB": 12, "bytes-64MiB": 2, "list-10k-ints": 12, "dict-10k-nested": 8},
        "start_main": 4,
        "start_peer": 2,
        "many": 2,
        "many_calls": 2000,
        "e2e": 1,
        "e2e_max_n": 3_000_000,
    },
}


def spread(total: int, rounds: int) -> List[int]:
    """``total`` repetitions over ``rounds`` rounds, as evenly as possible."""
    base, extra = divmod(total, rounds)
    sizes = [base] * rounds
    if extra:
        step = rounds / extra
        for k in range(extra):
            sizes[int(k * step)] += 1
    return sizes


# -- drivers --------------------------------------------------------------------------


class DriverFailed(Exception):
    """The driver is gone (or unavailable): nothing more can be asked of it."""


class OpFailed(DriverFailed):
    """One command failed; the driver lives on (other tasks go on)."""


class Driver:
    """A driver process and its control pipes."""

    def __init__(self, name: str, env: Dict[str, str]) -> None:
        self.name = name
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "driver.py"), name, str(cmd_r), str(res_w)],
            pass_fds=(cmd_r, res_w),
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # killable as a group on a hang
        )
        os.close(cmd_r)
        os.close(res_w)
        self.results = os.fdopen(self.res_r, "r")
        self.failed: Optional[str] = None
        self.unavailable: Optional[str] = None
        self.reported: set = set()  # ops whose traceback was printed

    def ask(self, timeout: float, op: str, **args: Any) -> Any:
        if self.failed or self.unavailable:
            raise DriverFailed(self.failed or self.unavailable)
        os.write(self.cmd_w, (json.dumps({"op": op, **args}) + "\n").encode())
        ready, _, _ = select.select([self.results], [], [], timeout)
        if not ready:
            self.kill()
            self.failed = f"{op} did not answer within {timeout:.0f} s (killed)"
            raise DriverFailed(self.failed)
        line = self.results.readline()
        if not line:
            self.failed = f"the driver ended during {op} (exit status {self.proc.wait()})"
            raise DriverFailed(self.failed)
        answer = json.loads(line)
        if answer["ok"]:
            return answer["result"]
        if "unavailable" in answer:
            self.unavailable = answer["unavailable"]
            raise DriverFailed(self.unavailable)
        if answer["traceback"] and op not in self.reported:
            self.reported.add(op)
            sys.stderr.write(f"[{self.name}] {op} failed:\n{answer['traceback']}\n")
        raise OpFailed(f"{op}: {answer['error']}")

    def close(self) -> None:
        if self.proc.poll() is None and not self.failed:
            try:
                self.ask(60, "close")
            except DriverFailed:
                pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
        os.close(self.cmd_w)
        self.results.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def driver_env(name: str) -> Dict[str, str]:
    env = dict(os.environ)
    # as in an activated venv: `python3` is the benchmark's CPython, not a pyenv shim
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # twins start with cached bytecode, as users' do
    env.pop("CPY2PY_DEBUG", None)
    # Every driver and its child (raw, multiprocessing, a peer's or a twin) gets
    # the malloc thresholds cpy2py gives its twins: by default, glibc grows and
    # trims its heap by 1 MiB steps as payloads come and go, and whether a reply
    # lands in fresh pages (256 faults, 0.3 ms of a 1 MiB echo) depends on how
    # the caller's earlier buffers happen to fit, not on the transport.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(64 << 20))
    paths = [HERE]
    if name.startswith("original-"):
        paths.append(os.path.join(ROOT, ".venv-bench", "original"))
        # its twins start with `-m cpy2py.twinterpreter.bootstrap`, which runpy warns about
        env["PYTHONWARNINGS"] = "ignore::RuntimeWarning"
    elif name in BASELINE:
        paths.insert(0, os.environ["BENCH_CPY2PY_BASELINE"])
    elif os.environ.get("BENCH_CPY2PY_PATH"):  # benchmark another checkout's cpy2py
        paths.insert(0, os.environ["BENCH_CPY2PY_PATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# -- one pass -------------------------------------------------------------------------


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class Pass:
    """One pass (pinned or unpinned): its drivers, the failed tasks and the result."""

    def __init__(self, label: str, cpus: List[int], plan: Dict[str, Any], only: Optional[List[str]]) -> None:
        self.label, self.cpus, self.plan, self.only = label, cpus, plan, only
        self.result: Dict[str, Any] = {
            "cpus": cpus,
            "scenarios": {},
            "noop": {},
            "halves": {},
            "startup": {},
            "payload": {},
            "many": {},
            "e2e": {},
            "loadavg_before": os.getloadavg(),
            "many_calls": plan["many_calls"],
        }
        self.names = [n for n in LATENCY + START_ONLY if self.wanted(n)]
        if os.environ.get("BENCH_CPY2PY_BASELINE"):  # beside this copy's twins, whenever they run
            self.names += [n for n in BASELINE if n.replace("baseline", "cpy2py") in self.names]
        self.drivers: Dict[str, Driver] = {}
        self.e2e_driver: Optional[Driver] = None
        self.task_errors: Dict[tuple, str] = {}
        self.started = time.monotonic()

    def wanted(self, name: str) -> bool:
        return self.only is None or any(o in name for o in self.only)

    def start_drivers(self) -> None:
        for name in self.names:
            self.drivers[name] = Driver(name, driver_env(name))
        if self.wanted("e2e"):
            self.e2e_driver = Driver("e2e", driver_env("e2e"))

    def open_scenarios(self) -> None:
        """Open the long-lived instances, one at a time."""
        for name in self.names:
            info: Dict[str, Any] = {}
            self.result["scenarios"][name] = info
            if start_only(name):
                info["status"] = "ok"
                continue
            try:
                opened = self.drivers[name].ask(300, "open")
                info.update(opened, status="ok")
                if opened["affinity"] and sorted(opened["affinity"]) != sorted(self.cpus):
                    info["affinity_warning"] = (
                        f"far side runs on CPUs {opened['affinity']}, expected {self.cpus}"
                    )
                    log(f"{name}: {info['affinity_warning']}")
            except DriverFailed as err:
                d = self.drivers[name]
                d.failed = d.failed or (None if d.unavailable else str(err))
                info["status"] = "unavailable" if d.unavailable else "failed"
                info["reason"] = str(err)
                log(f"{name}: {info['status']}: {err}")

    def warm(self, key: tuple, name: str, op: str, **args: Any) -> None:
        try:
            self.drivers[name].ask(600, op, **args)
        except OpFailed as err:
            self.task_errors[key] = str(err)
            log(f"{name}: {op} failed in warm-up: {err}")
        except DriverFailed as err:
            self.result["scenarios"][name].update(status="failed", reason=str(err))
            log(f"{name}: failed in warm-up: {err}")

    def warm_up(self) -> None:
        live = [n for n in self.names if self.drivers[n].failed is None and not self.drivers[n].unavailable]
        log(f"{self.label}: warming up {len(live)} scenarios")
        for name in live:
            self.warm(("startup", name), name, "start", n=1)  # first start: byte-code caches, imports
            if start_only(name):
                continue
            self.warm(("noop", name), name, "warmup", n=self.plan["warmup"])
            self.warm(("halves", name), name, "warmup", n=0, halves=self.plan["warmup_halves"])
            if name in PAYLOAD_SCENARIOS:
                for kind in PAYLOADS:
                    if kind != "bytes-64MiB":
                        self.warm(
                            ("payload", name, kind), name, "payload", kind=kind, n=self.plan["payload_warmup"]
                        )

    def schedule(self) -> List[tuple]:
        """Every task as (key, per-round sizes, driver, op, args): its batches
        spread over the rounds."""
        plan, rounds = self.plan, self.plan["rounds"]
        tasks = []
        for name in self.names:
            d = self.drivers[name]
            if not start_only(name):
                tasks.append((("noop", name), [plan["noop"]] * rounds, d, "noop", {}))
                tasks.append((("halves", name), [plan["halves"]] * rounds, d, "halves", {}))
            reps = plan["start_main"] if name in START_MAIN else plan["start_peer"]
            tasks.append((("startup", name), spread(reps, rounds), d, "start", {}))
            if name in PAYLOAD_SCENARIOS:
                for kind in PAYLOADS:
                    sizes = spread(plan["payload"][kind], rounds)
                    tasks.append((("payload", name, kind), sizes, d, "payload", {"kind": kind}))
            if name in MANY:
                sizes = spread(plan["many"], rounds)
                tasks.append((("many", name), sizes, d, "many", {"calls": plan["many_calls"]}))
        if self.e2e_driver is not None:
            for mode in ("pinned-cold", "pinned-warm", "unpinned"):
                args = {"mode": mode, "max_n": plan["e2e_max_n"]}
                tasks.append((("e2e", mode), spread(plan["e2e"], rounds), self.e2e_driver, "e2e", args))
        return tasks

    def run_rounds(self, tasks: List[tuple]) -> Dict[tuple, list]:
        """Every round runs each task's batch, in a shuffled order."""
        samples: Dict[tuple, list] = {t[0]: [] for t in tasks}
        rng = random.Random(5)
        rounds = self.plan["rounds"]
        for r in range(rounds):
            order = list(tasks)
            rng.shuffle(order)
            for key, sizes, d, op, args in order:
                size = sizes[r]
                if not size or d.failed or d.unavailable or key in self.task_errors:
                    continue
                self.run_batch(samples, key, size, d, op, args)
            log(f"{self.label}: round {r + 1}/{rounds} done ({time.monotonic() - self.started:.0f} s)")
        return samples

    def run_batch(
        self, samples: Dict[tuple, list], key: tuple, size: int, d: Driver, op: str, args: dict
    ) -> None:
        try:
            if op == "e2e":
                got = [d.ask(600, "e2e", **args) for _ in range(size)]
            else:
                got = d.ask(600, op, n=size, **args)
            samples[key].extend(got)
        except OpFailed as err:
            self.task_errors[key] = str(err)
            log(f"{key[1]}: {op} failed: {err}")
        except DriverFailed as err:
            name = key[1] if key[0] != "e2e" else "e2e"
            log(f"{name}: {op} failed: {err}")
            if name in self.result["scenarios"]:
                self.result["scenarios"][name].update(status="failed", reason=str(err))
            else:
                self.result["e2e_error"] = str(err)

    def close(self) -> None:
        for d in list(self.drivers.values()) + ([self.e2e_driver] if self.e2e_driver else []):
            d.close()

    def summarize(self, samples: Dict[tuple, list]) -> Dict[str, Any]:
        result = self.result
        for key, values in samples.items():
            if values:
                summarize_task(result, key, values)
        for name, info in result["scenarios"].items():
            d = self.drivers.get(name)
            if d is not None and d.unavailable and info.get("status") == "ok":
                info.update(status="unavailable", reason=d.unavailable)
        result["errors"] = {"/".join(key): msg for key, msg in self.task_errors.items()}
        result["seconds"] = time.monotonic() - self.started
        result["loadavg_after"] = os.getloadavg()
        return result


def summarize_task(result: Dict[str, Any], key: tuple, values: list) -> None:
    """The statistics of one task's samples, into its table of ``result``."""
    kind = key[0]
    if kind == "halves":
        result["halves"][key[1]] = {
            "call": report.stats([v[0] for v in values]),
            "reply": report.stats([v[1] for v in values]),
        }
    elif kind == "startup":
        result["startup"][key[1]] = {
            part: report.stats([v[part] for v in values]) for part in ("startup", "first_call", "stop")
        }
    elif kind == "payload":
        result["payload"].setdefault(key[1], {})[key[2]] = report.stats(values)
    elif kind in ("noop", "many", "e2e"):
        result[kind][key[1]] = report.stats(values)


def run_pass(label: str, cpus: List[int], plan: Dict[str, Any], only: Optional[List[str]]) -> Dict[str, Any]:
    os.sched_setaffinity(0, cpus)  # inherited by every process started from here on
    one = Pass(label, cpus, plan, only)
    try:
        one.start_drivers()
        one.open_scenarios()
        one.warm_up()
        samples = one.run_rounds(one.schedule())
    finally:
        one.close()
    return one.summarize(samples)


# -- versions and builds --------------------------------------------------------------


def capture(cmd: List[str], **kw: Any) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"


def metadata(args: argparse.Namespace, plan: Dict[str, Any]) -> Dict[str, Any]:
    env = driver_env("meta")
    pypy = shutil.which("pypy3")
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        pass
    versions: Dict[str, Any] = {}
    for module in ("execnet", "rpyc", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001
            versions[module] = f"unavailable: {err}"
    versions["cpy2py original"] = capture(
        [sys.executable, "-c", "import cpy2py.meta as m; print(m.__version__)"],
        env={**env, "PYTHONPATH": os.path.join(ROOT, ".venv-bench", "original")},
    )
    so = os.path.join(ROOT, "guest-python", "cpy2py", "_host.abi3.so")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "plan": plan,
        "machine": {
            "cpu": cpu_model,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg": os.getloadavg(),
        },
        "master": {
            # (inside the checkout: named from its root, so that results
            # committed to the repository name no path of this machine)
            "executable": os.path.relpath(sys.executable, ROOT)
            if os.path.abspath(sys.executable).startswith(ROOT + os.sep)
            else sys.executable,
            "version": sys.version,
            "implementation": sys.implementation.name,
        },
        "python3": {
            "path": shutil.which("python3", path=env["PATH"]),
            "version": capture(["python3", "-VV"], env=env),
        },
        "pypy3": {"path": pypy, "version": capture([pypy, "-VV"]) if pypy else "not installed"},
        "cpy2py": {
            "commit": capture(["git", "-C", ROOT, "rev-parse", "HEAD"]),
            "dirty": capture(
                ["git", "-C", ROOT, "status", "--porcelain", "--", "guest-python", "host"]
            ).splitlines(),
            "source": os.environ.get("BENCH_CPY2PY_PATH") or os.path.join(ROOT, "guest-python"),
            "overridden": bool(os.environ.get("BENCH_CPY2PY_PATH")),
            "baseline": os.environ.get("BENCH_CPY2PY_BASELINE"),
            "host_extension_mtime": time.ctime(os.path.getmtime(so)) if os.path.exists(so) else "missing",
        },
        "rustc": capture(["rustc", "-V"]),
        "peers": versions,
        "environment_notes": [
            "PATH starts with the benchmark venv's bin, so 'python3' is the benchmark's CPython",
            "PYTHONDONTWRITEBYTECODE is unset for the benchmark processes",
        ],
    }


# -- rust benches ---------------------------------------------------------------------


def rust_benches(quick: bool, cpus: List[int]) -> Dict[str, Any]:
    """cargo bench of benches/codec.rs (criterion, a [[bench]] of host/Cargo.toml):
    built unpinned, run pinned like the pinned pass; estimates from target/criterion."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    env = {**os.environ, "CARGO_TARGET_DIR": target}
    cmd = ["cargo", "bench", "--quiet", "-p", "cpy2py-host", "--bench", "codec"]
    log("cargo bench --no-run (benches/codec.rs)")
    built = subprocess.run(cmd + ["--no-run"], capture_output=True, text=True, env=env, cwd=ROOT)
    if built.returncode != 0:
        return {"error": built.stderr[-3000:]}
    log(f"cargo bench (benches/codec.rs) on CPUs {cpus}")
    started = time.time()
    timing = ["--warm-up-time", "0.5", "--measurement-time", "1" if quick else "2", "--noplot"]
    proc = subprocess.run(
        cmd + ["--"] + timing,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    found: Dict[str, Any] = {}
    for dirpath, _dirs, files in os.walk(os.path.join(target, "criterion")):
        if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
            continue
        if os.path.getmtime(os.path.join(dirpath, "estimates.json")) < started:
            continue  # from an earlier run
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        entry = {"median_ns": est["median"]["point_estimate"], "mean_ns": est["mean"]["point_estimate"]}
        tp = bench.get("throughput") or {}
        if "Bytes" in tp:
            entry["bytes"] = tp["Bytes"]
        found[bench["full_id"]] = entry
    return {"cpus": cpus, "benches": dict(sorted(found.items()))}


def concurrency_benches(quick: bool, cpus: List[int]) -> Dict[str, Any]:
    """benches/concurrency.py: many threads and asyncio against one twin of
    each kind, in a master of its own run on ``cpus`` (the pinned pass's, or
    all of them)."""
    log(f"concurrency and asyncio (benches/concurrency.py) on CPUs {cpus}")
    cmd = [sys.executable, os.path.join(HERE, "concurrency.py")] + (["--quick"] if quick else [])
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=driver_env("concurrency"),
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return {"cpus": cpus, "kinds": json.loads(proc.stdout.strip().splitlines()[-1])}


def sandbox_benches(quick: bool) -> Dict[str, Any]:
    """benches/sandbox_pool.py: pools, fresh guests, idle guest RSS and the
    import of packages, on every CPU (a pool uses them all)."""
    log("sandbox pools and fresh guests (benches/sandbox_pool.py)")
    cmd = [sys.executable, os.path.join(HERE, "sandbox_pool.py")] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=driver_env("sandbox_pool"))
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="about a minute instead of about eight (no Rust benches)"
    )
    parser.add_argument("--rust", action="store_true", help="also run the Rust codec and framing benches")
    parser.add_argument("--out", default=os.path.join(ROOT, "results"))
    parser.add_argument("--cpu", type=int, help="the CPU of the pinned pass (default: the last one)")
    parser.add_argument("--passes", default="pinned,unpinned")
    parser.add_argument("--only", help="comma-separated name fragments of scenarios to run (development)")
    args = parser.parse_args()

    plan = PLANS["quick" if args.quick else "full"]
    all_cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else all_cpus[-1]
    only = args.only.split(",") if args.only else None
    if only and not any(o in name for o in only for name in LATENCY + START_ONLY + ["e2e"]):
        parser.error(
            f"--only {args.only}: no scenario's name has that in it; "
            f"they are {', '.join(LATENCY + START_ONLY)}"
        )
    started = time.monotonic()
    results: Dict[str, Any] = {"meta": metadata(args, plan), "passes": {}}
    if len(all_cpus) < 2:
        log("only one CPU is available: the unpinned pass equals the pinned one")
    for label in args.passes.split(","):
        cpus = [cpu] if label == "pinned" else all_cpus
        log(f"pass {label}: CPUs {cpus}")
        results["passes"][label] = run_pass(label, cpus, plan, only)
    os.sched_setaffinity(0, all_cpus)
    if args.rust and args.quick:
        log("--quick skips the Rust benches (cargo bench -p cpy2py-host --bench codec runs them)")
    elif args.rust:
        results["rust"] = rust_benches(args.quick, [cpu])
    if not only:
        results["concurrency"] = concurrency_benches(args.quick, [cpu])
        if "unpinned" in args.passes.split(",") and len(all_cpus) > 1:
            # (as users run: threads of master and twin on every core)
            results["concurrency_unpinned"] = concurrency_benches(args.quick, all_cpus)
        results["sandbox"] = sandbox_benches(args.quick)
    results["meta"]["seconds"] = time.monotonic() - started

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"bench-{stamp}")
    results["derived"] = report.derive(results)
    text = report.render(results)
    print(text)
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    try:
        chart = report.chart(results, base + ".png")
        why = "matplotlib missing"
    except ValueError as err:  # (a run of a few scenarios, --only: a panel without data)
        chart, why = False, f"{type(err).__name__}: {err}"
    for ext in ("json", "txt") + (("png",) if chart else ()):
        shutil.copyfile(f"{base}.{ext}", os.path.join(args.out, f"bench-latest.{ext}"))
    print(f"\nwrote {base}.json, {base}.txt" + (f", {base}.png" if chart else f" (no chart: {why})"))
    print(f"(bench-latest.* are copies; the run took {results['meta']['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
