#!/usr/bin/env python3
"""skysnap's end-to-end benchmark: one run, one machine, every figure of
docs/PERFORMANCE.md next to the baseline it is judged against.

Scenarios, each measured --runs times (median reported):
  bare_grpc     examples/bare_grpc: tonic + prost decoding streams and dropping them
  discard       skysnap, pipeline.mode discard (validate, shard, batch, drop)
  sqlite        skysnap, direct mode into SQLite
  clickhouse    skysnap, direct mode into ClickHouse
  raw_clickhouse examples/raw_clickhouse: the same rows inserted by the clickhouse crate
  kafka         skysnap, kafka mode (receiver into Kafka)
  consume       skysnap consume, the kafka run's topic into ClickHouse
then the ack latency at half the measured maximum rate (sqlite, clickhouse), and once
the memory of skysnap while ClickHouse is stopped under load. --soak-minutes N runs
only the long half-rate memory run. Results go to docs/perf/results.json (soak:
docs/perf/soak.json) and into the generated block of docs/PERFORMANCE.md.

Run it through benches/run.sh, which builds the release binaries and starts the
loopback ClickHouse and Kafka of scripts/services.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKYSNAP = os.path.join(ROOT, "target/release/skysnap")
BARE_GRPC = os.path.join(ROOT, "target/release/examples/bare_grpc")
RAW_CLICKHOUSE = os.path.join(ROOT, "target/release/examples/raw_clickhouse")
CLICKHOUSE_SH = os.path.join(ROOT, "scripts/services/clickhouse.sh")
KAFKA_SH = os.path.join(ROOT, "scripts/services/kafka.sh")
RESULTS = os.path.join(ROOT, "docs/perf/results.json")
SOAK = os.path.join(ROOT, "docs/perf/soak.json")
DOC = os.path.join(ROOT, "docs/PERFORMANCE.md")
CLICKHOUSE_URL = os.environ.get("SKYSNAP_BENCH_CLICKHOUSE_URL", "http://127.0.0.1:18123")
KAFKA_BROKERS = os.environ.get("SKYSNAP_BENCH_KAFKA_BROKERS", "127.0.0.1:19092")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FLUSH_INTERVAL_MS = 200  # pipeline.batch_flush_interval_ms's default
# Concurrent INSERTs of the raw ClickHouse baseline; the best is the limit. skysnap has
# up to shards x pipeline.shard_commits_in_flight = 2 x 2 = 4 INSERTs in flight.
RAW_CONCURRENCY = (2, 4, 8)

# The load every scenario gets: 8 agents (one connection each) x 4 concurrent streams x
# 500 snapshots of 40 frames, as fast as the server acknowledges.
LOAD = {"agents": 8, "streams": 4, "batch": 500, "depth": 40, "frame_pool": 3000}


SERVICE_PID_FILES = {
    "clickhouse": "/tmp/skysnap-services/clickhouse/clickhouse.pid",
    "kafka": "/tmp/skysnap-services/kafka/kafka.pid",
}


def service_cpu():
    """CPU seconds used so far by each loopback server, to show where a run's time went."""
    used = {}
    for name, pid_file in SERVICE_PID_FILES.items():
        try:
            with open(pid_file) as handle:
                used[name] = cpu_seconds(int(handle.read().strip()))
        except (OSError, ValueError):
            used[name] = None
    return used


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_megabytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    """Samples a process's resident memory until stopped."""

    def __init__(self, pid, every=0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples = []  # (seconds since start, MB)
        self._halt = threading.Event()

    def run(self):
        begun = time.monotonic()
        while not self._halt.is_set():
            try:
                self.samples.append((time.monotonic() - begun, rss_megabytes(self.pid)))
            except OSError:
                return
            self._halt.wait(self.every)

    def stop(self):
        self._halt.set()
        self.join()
        return max((mb for _, mb in self.samples), default=0.0)


class Server:
    """A server process started with a clean environment, ready once it prints its line."""

    def __init__(self, command, env, ready_pattern):
        clean = {key: value for key, value in os.environ.items() if not key.startswith("SKYSNAP_")}
        clean.update(env)
        self.process = subprocess.Popen(
            command, env=clean, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 60
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{command[0]} exited before it was ready")
            match = re.search(ready_pattern, line)
            if match:
                self.addresses = match.groupdict()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} not ready in 60 s")
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def skysnap_serve(data_dir, extra_env):
    env = {
        "SKYSNAP_GRPC_ADDR": "127.0.0.1:0",
        "SKYSNAP_HTTP_ADDR": "127.0.0.1:0",
        "SKYSNAP_METRICS_ADDR": "127.0.0.1:0",
        "SKYSNAP_SQLITE_PATH": os.path.join(data_dir, "skysnap.db"),
        "SKYSNAP_LOG": "warn",
    }
    env.update(extra_env)
    return Server(
        [SKYSNAP, "serve"],
        env,
        r"skysnap ready grpc=(?P<grpc>\S+) http=(?P<http>\S+) metrics=(?P<metrics>\S+)",
    )


def run_load(grpc, http=None, seconds=10, rate=0):
    command = [SKYSNAP, "load", "--target", f"http://{grpc}", "--json",
               "--duration", f"{seconds}s", "--rate", str(rate),
               "--agents", str(LOAD["agents"]), "--streams", str(LOAD["streams"]),
               "--batch", str(LOAD["batch"]), "--depth", str(LOAD["depth"]),
               "--frame-pool", str(LOAD["frame_pool"])]
    command += ["--server", f"http://{http}"] if http else ["--no-check"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SKYSNAP_")}
    timed = ["/usr/bin/time", "-f", "load_cpu_seconds=%U+%S"] + command
    finished = subprocess.run(timed, env=env, capture_output=True, text=True, timeout=seconds + 600)
    if not finished.stdout.strip():
        raise RuntimeError(f"skysnap load failed: {finished.stderr[-2000:]}")
    report = json.loads(finished.stdout)
    used = re.search(r"load_cpu_seconds=([\d.]+)\+([\d.]+)", finished.stderr)
    report["load_cpu_seconds"] = float(used.group(1)) + float(used.group(2)) if used else None
    return report


def measured_load(server, http=None, seconds=10, rate=0):
    """Runs the load against a started server; the server's CPU and peak RSS count only
    the load's time (not the final check through the API)."""
    sampler = RssSampler(server.pid)
    cpu_before = cpu_seconds(server.pid)
    services_before = service_cpu()
    sampler.start()
    report_holder = {}

    def load():
        report_holder["report"] = run_load(server.addresses["grpc"], http, seconds, rate)

    began = time.monotonic()
    runner = threading.Thread(target=load)
    runner.start()
    # The load ends sending after `seconds`; stop the meters then, before its check.
    runner.join(timeout=seconds + 2)
    cpu_after = cpu_seconds(server.pid)
    services_after = service_cpu()
    elapsed = time.monotonic() - began
    peak_rss = sampler.stop()
    runner.join()
    report = report_holder["report"]
    services = {
        f"{name}_cpu_cores": (services_after[name] - services_before[name]) / elapsed
        for name in services_before
        if services_before[name] is not None and services_after[name] is not None
    }
    return {
        **services,
        "load_cpu_cores": (report["load_cpu_seconds"] or 0) / report["seconds"],
        "snapshots_per_second": report["snapshots_per_second"],
        "megabytes_per_second": report["megabytes_per_second"],
        "ack_p50_ms": report["ack_latency_ms_p50"],
        "ack_p99_ms": report["ack_latency_ms_p99"],
        "ack_max_ms": report["ack_latency_ms_max"],
        "snapshots_acknowledged": report["snapshots_acknowledged"],
        "errors": report["errors"],
        "missing": report["missing_opt"],
        "peak_rss_mb": peak_rss,
        "cpu_cores": (cpu_after - cpu_before) / elapsed,
    }


def clickhouse(query):
    url = f"{CLICKHOUSE_URL}/?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, data=b"", timeout=60) as response:
        return response.read().decode().strip()


def clickhouse_disk(database):
    row = clickhouse(
        "SELECT sum(bytes_on_disk), sum(rows) FROM system.parts "
        f"WHERE database = '{database}' AND table = 'profile_thread_snapshot' AND active"
    )
    size, rows = (int(value or 0) for value in row.split("\t"))
    return size, rows


def clickhouse_env(database):
    return {"SKYSNAP_STORE_KIND": "clickhouse", "SKYSNAP_CLICKHOUSE_URL": CLICKHOUSE_URL,
            "SKYSNAP_CLICKHOUSE_DATABASE": database}


def scenario_bare(seconds):
    server = Server([BARE_GRPC, "--addr", "127.0.0.1:0"], {}, r"bare_grpc ready grpc=(?P<grpc>\S+)")
    try:
        return measured_load(server, None, seconds)
    finally:
        server.stop()


def scenario_discard(seconds):
    with tempfile.TemporaryDirectory(prefix="skysnap-bench-") as data:
        server = skysnap_serve(data, {"SKYSNAP_PIPELINE_MODE": "discard"})
        try:
            return measured_load(server, None, seconds)
        finally:
            server.stop()


def scenario_sqlite(seconds, rate=0):
    with tempfile.TemporaryDirectory(prefix="skysnap-bench-") as data:
        server = skysnap_serve(data, {})
        try:
            result = measured_load(server, server.addresses["http"], seconds, rate)
        finally:
            server.stop()
        database = os.path.join(data, "skysnap.db")
        size = sum(os.path.getsize(database + suffix) for suffix in ("", "-wal")
                   if os.path.exists(database + suffix))
        rows = sqlite3.connect(database).execute(
            "SELECT count(*) FROM profile_thread_snapshot").fetchone()[0]
        result["bytes_per_snapshot"] = size / rows if rows else None
        return result


def scenario_clickhouse(seconds, rate=0):
    database = f"skysnap_bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="skysnap-bench-") as data:
        server = skysnap_serve(data, clickhouse_env(database))
        try:
            result = measured_load(server, server.addresses["http"], seconds, rate)
        finally:
            server.stop()
    size, rows = clickhouse_disk(database)
    result["bytes_per_snapshot"] = size / rows if rows else None
    clickhouse(f"DROP DATABASE IF EXISTS {database}")
    return result


def scenario_raw_clickhouse(seconds, concurrency):
    database = f"skysnap_bench_raw_{uuid.uuid4().hex[:8]}"
    command = [RAW_CLICKHOUSE, "--url", CLICKHOUSE_URL, "--database", database,
               "--concurrency", str(concurrency),
               "--seconds", str(seconds), "--depth", str(LOAD["depth"]),
               "--pool", str(LOAD["frame_pool"]), "--segment-snapshots", str(LOAD["batch"]),
               "--json"]
    services_before = service_cpu()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = RssSampler(process.pid)
    sampler.start()
    cpu = 0.0
    while process.poll() is None:
        try:
            cpu = cpu_seconds(process.pid)
        except OSError:
            break
        time.sleep(0.1)
    output, _ = process.communicate()
    services_after = service_cpu()
    peak = sampler.stop()
    report = json.loads(output)
    clickhouse(f"DROP DATABASE IF EXISTS {database}")
    return {
        "concurrency": concurrency,
        "clickhouse_cpu_cores": (services_after["clickhouse"] - services_before["clickhouse"])
        / report["seconds"],
        "snapshots_per_second": report["rows_per_second"],
        "megabytes_per_second": report["megabytes_per_second"],
        "ack_p50_ms": None, "ack_p99_ms": None, "ack_max_ms": None,
        "snapshots_acknowledged": report["rows"], "errors": {}, "missing": None,
        "peak_rss_mb": peak, "cpu_cores": cpu / report["seconds"],
        "bytes_per_snapshot": report["bytes_per_row"],
    }


def scenario_kafka_and_consume(seconds):
    topic = f"skysnap-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run([KAFKA_SH, "topic-create", topic, "4"], check=True, capture_output=True)
    kafka_env = {"SKYSNAP_KAFKA_BROKERS": KAFKA_BROKERS, "SKYSNAP_KAFKA_TOPIC": topic}
    with tempfile.TemporaryDirectory(prefix="skysnap-bench-") as data:
        server = skysnap_serve(data, dict(kafka_env, SKYSNAP_PIPELINE_MODE="kafka"))
        try:
            produced = measured_load(server, None, seconds)
        finally:
            server.stop()

    database = f"skysnap_bench_{uuid.uuid4().hex[:8]}"
    env = dict(kafka_env, **clickhouse_env(database),
               SKYSNAP_KAFKA_GROUP_ID=f"bench-{topic}", SKYSNAP_METRICS_ADDR="127.0.0.1:0",
               SKYSNAP_LOG="warn")
    expected = produced["snapshots_acknowledged"]
    consumer = Server([SKYSNAP, "consume"], env, r"skysnap consumer ready metrics=(?P<metrics>\S+)")
    sampler = RssSampler(consumer.pid)
    sampler.start()
    began, cpu_before, services_before = time.monotonic(), cpu_seconds(consumer.pid), service_cpu()
    stored = 0
    try:
        while time.monotonic() - began < 300:
            stored = int(clickhouse(
                f"SELECT count() FROM {database}.profile_thread_snapshot") or 0)
            if stored >= expected:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - began
        cpu = cpu_seconds(consumer.pid) - cpu_before
        services_after = service_cpu()
    finally:
        peak = sampler.stop()
        consumer.stop()
    size, rows = clickhouse_disk(database)
    clickhouse(f"DROP DATABASE IF EXISTS {database}")
    consumed = {
        **{f"{name}_cpu_cores": (services_after[name] - services_before[name]) / elapsed
           for name in services_before},
        "snapshots_per_second": stored / elapsed,
        "megabytes_per_second": produced["megabytes_per_second"] * (stored / elapsed)
        / produced["snapshots_per_second"],
        "ack_p50_ms": None, "ack_p99_ms": None, "ack_max_ms": None,
        "snapshots_acknowledged": stored, "errors": {}, "missing": max(expected - stored, 0),
        "peak_rss_mb": peak, "cpu_cores": cpu / elapsed,
        "bytes_per_snapshot": size / rows if rows else None,
    }
    return produced, consumed


def clickhouse_outage(seconds, rate):
    """Direct mode into ClickHouse at `rate`; ClickHouse stopped from 1/4 to 1/2 of the run."""
    database = f"skysnap_bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="skysnap-bench-") as data:
        server = skysnap_serve(data, clickhouse_env(database))
        sampler = RssSampler(server.pid, every=0.25)
        sampler.start()
        holder = {}
        runner = threading.Thread(target=lambda: holder.update(
            report=run_load(server.addresses["grpc"], server.addresses["http"], seconds, rate)))
        began = time.monotonic()
        runner.start()
        time.sleep(seconds / 4)
        stopped_at = time.monotonic() - began
        subprocess.run([CLICKHOUSE_SH, "stop"], check=True, capture_output=True)
        time.sleep(seconds / 4)
        subprocess.run([CLICKHOUSE_SH, "start"], check=True, capture_output=True)
        started_at = time.monotonic() - began
        runner.join()
        sampler.stop()
        server.stop()
    clickhouse(f"DROP DATABASE IF EXISTS {database}")
    report = holder["report"]

    def peak(low, high):
        return max((mb for at, mb in sampler.samples if low <= at < high), default=0.0)

    return {
        "rate": rate, "seconds": seconds,
        "clickhouse_stopped_s": round(stopped_at, 1), "clickhouse_started_s": round(started_at, 1),
        "peak_rss_mb_before": peak(0, stopped_at),
        "peak_rss_mb_during": peak(stopped_at, started_at),
        "peak_rss_mb_after": peak(started_at, seconds + 60),
        "snapshots_acknowledged": report["snapshots_acknowledged"],
        "errors": report["errors"], "missing": report["missing_opt"],
    }


def soak(minutes, rate):
    """Direct mode into ClickHouse at `rate` for `minutes`; RSS every second."""
    database = f"skysnap_bench_{uuid.uuid4().hex[:8]}"
    seconds = int(minutes * 60)
    with tempfile.TemporaryDirectory(prefix="skysnap-bench-") as data:
        server = skysnap_serve(data, clickhouse_env(database))
        sampler = RssSampler(server.pid, every=1.0)
        sampler.start()
        report = run_load(server.addresses["grpc"], server.addresses["http"], seconds, rate)
        sampler.stop()
        server.stop()
    clickhouse(f"DROP DATABASE IF EXISTS {database}")
    samples = [(at, mb) for at, mb in sampler.samples if at <= seconds]
    first = [mb for at, mb in samples if 60 <= at < 120]
    last = [mb for at, mb in samples if at >= seconds - 60]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(), "minutes": minutes, "rate": rate,
        "snapshots_per_second": report["snapshots_per_second"],
        "ack_p50_ms": report["ack_latency_ms_p50"], "ack_p99_ms": report["ack_latency_ms_p99"],
        "errors": report["errors"], "missing": report["missing_opt"],
        "rss_mb_min_after_first_minute": min(mb for at, mb in samples if at >= 60),
        "rss_mb_max": max(mb for _, mb in samples),
        "rss_mb_second_minute_mean": statistics.mean(first),
        "rss_mb_last_minute_mean": statistics.mean(last),
        "rss_per_minute": [round(statistics.mean([mb for at, mb in samples if m * 60 <= at < (m + 1) * 60]), 1)
                           for m in range(int(minutes))],
    }


def git_commit():
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def machine():
    with open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cores": os.cpu_count(), "memory_gib": round(total_kb / 1024 / 1024, 1), "cpu": model,
        "kernel": platform.release(), "rustc": rustc,
        "clickhouse": clickhouse("SELECT version()"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }


def median_of(runs):
    """The run with the median throughput, plus the spread of every figure."""
    ordered = sorted(runs, key=lambda run: run["snapshots_per_second"])
    middle = dict(ordered[len(ordered) // 2])
    middle["runs_snapshots_per_second"] = [round(run["snapshots_per_second"]) for run in runs]
    for key in ("megabytes_per_second", "ack_p50_ms", "ack_p99_ms", "peak_rss_mb", "cpu_cores",
                "bytes_per_snapshot"):
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            middle[key] = statistics.median(values)
    middle["peak_rss_mb_max"] = max(run["peak_rss_mb"] for run in runs)
    middle["missing_total"] = sum(run["missing"] or 0 for run in runs)
    errors = {}
    for run in runs:
        for code, count in run["errors"].items():
            errors[code] = errors.get(code, 0) + count
    middle["errors"] = errors
    return middle


def measure_all(runs, seconds):
    scenarios = [("bare_grpc", scenario_bare), ("discard", scenario_discard),
                 ("sqlite", scenario_sqlite), ("clickhouse", scenario_clickhouse)]
    scenarios += [(f"raw_clickhouse_{concurrency}",
                   lambda seconds, concurrency=concurrency: scenario_raw_clickhouse(seconds, concurrency))
                  for concurrency in RAW_CONCURRENCY]
    results = {name: [] for name, _ in scenarios}
    results.update(kafka=[], consume=[])
    for run in range(runs):
        # Interleaved, so a slow minute of the machine touches every scenario alike.
        for name, scenario in scenarios:
            log(f"run {run + 1}/{runs}: {name}")
            results[name].append(scenario(seconds))
            log(f"  {results[name][-1]['snapshots_per_second']:.0f} snapshots/s")
        log(f"run {run + 1}/{runs}: kafka + consume")
        produced, consumed = scenario_kafka_and_consume(seconds)
        results["kafka"].append(produced)
        results["consume"].append(consumed)
        log(f"  {produced['snapshots_per_second']:.0f} / {consumed['snapshots_per_second']:.0f} snapshots/s")
    medians = {name: median_of(values) for name, values in results.items()}

    half_rate = {}
    for name, scenario in (("sqlite", scenario_sqlite), ("clickhouse", scenario_clickhouse)):
        rate = int(medians[name]["snapshots_per_second"] / 2)
        values = []
        for run in range(runs):
            log(f"half rate {run + 1}/{runs}: {name} at {rate}/s")
            values.append(scenario(seconds, rate))
        half_rate[name] = dict(median_of(values), rate=rate)

    log("ClickHouse outage under load")
    outage = clickhouse_outage(max(seconds * 4, 40), int(medians["clickhouse"]["snapshots_per_second"] / 2))
    return {"machine": machine(), "load": LOAD, "runs": runs, "seconds": seconds,
            "medians": medians, "half_rate": half_rate, "outage": outage}


def fmt(value, digits=0):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def render(results, soak_result):
    medians, half = results["medians"], results["half_rate"]
    m = results["machine"]
    lines = [
        f"Measured {m['date']} at commit `{m['commit']}`: {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, {m['rustc']}, ClickHouse {m['clickhouse']}. "
        "Load generator, skysnap and the servers all share the machine.",
        "",
        f"Load: `skysnap load --agents {LOAD['agents']} --streams {LOAD['streams']} --batch {LOAD['batch']} "
        f"--depth {LOAD['depth']} --frame-pool {LOAD['frame_pool']}` for {results['seconds']} s "
        f"as fast as acknowledged; median of {results['runs']} runs (the run with the median "
        "throughput; the other columns are medians of their own). CPU is cores of the measured "
        "process over the load; RSS its peak during the load.",
        "",
        "| scenario | snapshots/s | MB/s | ack p50 ms | ack p99 ms | peak RSS MB | CPU cores "
        "| bytes on disk / snapshot | runs (snapshots/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    raw_keys = [f"raw_clickhouse_{c}" for c in RAW_CONCURRENCY]
    limit_key = max(raw_keys, key=lambda key: medians[key]["snapshots_per_second"])
    names = [("bare_grpc", "bare tonic server (gRPC limit)"), ("discard", "skysnap, discard sink"),
             ("sqlite", "skysnap → SQLite")]
    names += [(key, f"raw clickhouse-crate INSERTs, {key.rsplit('_', 1)[1]} at once"
               + (" (**ClickHouse limit**)" if key == limit_key else "")) for key in raw_keys]
    names += [("clickhouse", "skysnap → ClickHouse (direct)"), ("kafka", "skysnap → Kafka (kafka mode)"),
              ("consume", "skysnap consume, Kafka → ClickHouse")]
    for key, label in names:
        r = medians[key]
        lines.append(
            f"| {label} | {fmt(r['snapshots_per_second'])} | {fmt(r['megabytes_per_second'], 1)} "
            f"| {fmt(r['ack_p50_ms'], 1)} | {fmt(r['ack_p99_ms'], 1)} | {fmt(r['peak_rss_mb'])} "
            f"| {fmt(r['cpu_cores'], 2)} | {fmt(r.get('bytes_per_snapshot'), 1)} "
            f"| {', '.join(f'{v:,}' for v in r['runs_snapshots_per_second'])} |")
    ratio = lambda a, b: medians[a]["snapshots_per_second"] / medians[b]["snapshots_per_second"]
    lost = sum(medians[key]["missing_total"] for key in ("sqlite", "clickhouse", "consume"))
    errors = {key: medians[key]["errors"] for key in medians if medians[key]["errors"]}
    lines += [
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        f"| skysnap discard / bare tonic | {ratio('discard', 'bare_grpc'):.0%} | ≥ 80 % |",
        f"| skysnap → ClickHouse / ClickHouse limit (raw, {limit_key.rsplit('_', 1)[1]} INSERTs at once) "
        f"| {ratio('clickhouse', limit_key):.0%} | ≥ 60 % |",
        f"| skysnap → ClickHouse / raw with 4 INSERTs at once, as skysnap has at most "
        f"| {ratio('clickhouse', 'raw_clickhouse_4'):.0%} | – |",
        f"| skysnap → SQLite | {fmt(medians['sqlite']['snapshots_per_second'])} snapshots/s | ≥ 40,000 |",
        f"| skysnap → Kafka / bare tonic | {ratio('kafka', 'bare_grpc'):.0%} | – |",
        f"| consume → ClickHouse / ClickHouse limit | {ratio('consume', limit_key):.0%} | – |",
        f"| peak RSS at maximum rate (highest run of any skysnap scenario) | "
        f"{max(medians[k]['peak_rss_mb_max'] for k in ('discard', 'sqlite', 'clickhouse', 'kafka')):.0f} MB | ≤ 300 MB |",
        "",
        "Where the CPU went, in cores (medians of the runs; the machine has "
        f"{m['cores']}): the measured process, the load generator and the loopback servers.",
        "",
        "| scenario | measured process | load generator | ClickHouse server | Kafka broker | sum |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in names:
        r = medians[key]
        parts = [r.get("cpu_cores"), r.get("load_cpu_cores"), r.get("clickhouse_cpu_cores"),
                 r.get("kafka_cpu_cores")]
        lines.append(f"| {label} | " + " | ".join(fmt(v, 2) for v in parts)
                     + f" | {fmt(sum(v for v in parts if v), 2)} |")
    lines += [
        "",
        f"Acknowledged snapshots missing from the store, all runs: **{lost}**. "
        f"Errors: {json.dumps(errors) if errors else 'none'}.",
        "",
        f"Ack latency at half the maximum rate (`--rate`), median of {results['runs']} runs; "
        f"the target is p99 ≤ 2 × `pipeline.batch_flush_interval_ms` = {2 * FLUSH_INTERVAL_MS} ms:",
        "",
        "| scenario | rate | achieved | ack p50 ms | ack p99 ms | max ms | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("sqlite", "clickhouse"):
        r = half[key]
        lines.append(f"| {key} | {fmt(r['rate'])} | {fmt(r['snapshots_per_second'])} | {fmt(r['ack_p50_ms'], 1)} "
                     f"| {fmt(r['ack_p99_ms'], 1)} | {fmt(r['ack_max_ms'], 1)} | {fmt(r['peak_rss_mb'])} |")
    o = results["outage"]
    lines += [
        "",
        f"ClickHouse stopped under load (direct mode, {fmt(o['rate'])} snapshots/s offered for "
        f"{o['seconds']} s; ClickHouse stopped at {o['clickhouse_stopped_s']} s, started again at "
        f"{o['clickhouse_started_s']} s): peak RSS {o['peak_rss_mb_before']:.0f} MB before, "
        f"**{o['peak_rss_mb_during']:.0f} MB while stopped**, {o['peak_rss_mb_after']:.0f} MB after; "
        f"{o['snapshots_acknowledged']:,} snapshots acknowledged, missing {o['missing']}, "
        f"refused streams by code: {json.dumps(o['errors']) if o['errors'] else 'none'}.",
    ]
    if soak_result:
        s = soak_result
        drift = s["rss_mb_last_minute_mean"] / s["rss_mb_second_minute_mean"] - 1
        lines += [
            "",
            f"Soak ({s['date']}, commit `{s['commit']}`, run once with `benches/run.sh --soak-minutes "
            f"{s['minutes']:g}`): direct mode into ClickHouse at {fmt(s['rate'])} snapshots/s for "
            f"{s['minutes']:g} minutes, {fmt(s['snapshots_per_second'])} achieved, ack p99 "
            f"{fmt(s['ack_p99_ms'], 1)} ms, missing {s['missing']}. RSS mean of minute 2 "
            f"{s['rss_mb_second_minute_mean']:.0f} MB, of the last minute {s['rss_mb_last_minute_mean']:.0f} MB "
            f"({drift:+.1%}); max {s['rss_mb_max']:.0f} MB. Per minute: "
            f"{', '.join(str(v) for v in s['rss_per_minute'])} MB.",
        ]
    return "\n".join(lines)


def write_doc(results, soak_result):
    with open(DOC) as doc:
        text = doc.read()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(DOC, "w") as doc:
        doc.write(f"{head}{begin}\n{render(results, soak_result)}\n{end}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--soak-minutes", type=float, default=0,
                        help="run only the long half-rate memory run (ClickHouse direct)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from the JSON files")
    args = parser.parse_args()
    if not args.render_only:
        for binary in (SKYSNAP, BARE_GRPC, RAW_CLICKHOUSE):
            if not os.path.exists(binary):
                sys.exit(f"{binary} is missing; run benches/run.sh, which builds it")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    soak_result = json.load(open(SOAK)) if os.path.exists(SOAK) else None
    if args.render_only:
        results = json.load(open(RESULTS))
    elif args.soak_minutes:
        results = json.load(open(RESULTS))
        rate = int(results["medians"]["clickhouse"]["snapshots_per_second"] / 2)
        log(f"soak: {args.soak_minutes} min at {rate} snapshots/s")
        soak_result = soak(args.soak_minutes, rate)
        with open(SOAK, "w") as out:
            json.dump(soak_result, out, indent=2)
    else:
        results = measure_all(args.runs, args.seconds)
        with open(RESULTS, "w") as out:
            json.dump(results, out, indent=2)
    write_doc(results, soak_result)
    log(f"wrote {os.path.relpath(DOC, ROOT)}")


if __name__ == "__main__":
    main()
