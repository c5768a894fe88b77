"""Callback ingest: tuneplane's event endpoints side by side with an MLflow tracking server.

    python bench/ingest.py                      # both servers; writes bench/results/ingest/
    python bench/ingest.py --skip-mlflow        # tuneplane only
    python bench/ingest.py --duration 5 --clients 1,8

What it measures, on this machine and SQLite for both servers (each started here, each serving
loopback only, in a process of its own; the clients run in another process):
- single: one training-step metric per request, closed loop, at 1 / 8 / 32 concurrent clients,
  each client a run of its own (a sweep's trainers): requests/s, p50 and p99 latency.
  tuneplane: `POST /api/v1/runs/{id}/events` with a `progress` event; MLflow:
  `POST /api/2.0/mlflow/runs/log-metric`.
- batch: what a trainer with a backlog sends, --batch-size points per request: events/s.
  tuneplane: `POST /api/v1/runs/{id}/events:batch`; MLflow: `POST /api/2.0/mlflow/runs/log-batch`
  (whose limit is 1,000 metrics a request).
One client machinery for both: a small asyncio HTTP/1.1 client, one keep-alive connection per
client, so the client's own cost is the same on either side. Every answer must be a 2xx (the
count of others is reported), and tuneplane's stored events are counted in its database after
each case, so a figure cannot hide lost events.

MLflow is run from its own virtual environment (--mlflow-venv, default /tmp/mlflow-venv), made
with `pip install mlflow` when missing; `mlflow server` with its default of 4 worker processes.
tuneplane is `python -m api serve`: one process, as a user runs it. The load average at the start
is recorded: on a shared machine the figures are only as good as the machine is quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlmodel import col, func, select  # noqa: E402  (after the path: the api's own venv)

from api.auth.callback import mint_token  # noqa: E402
from api.config import Settings  # noqa: E402
from api.db import make_engine, session_scope  # noqa: E402
from api.events.models import RunEvent  # noqa: E402
from api.runs.seed import insert_runs  # noqa: E402
from api.runs.states import RunStatus  # noqa: E402

OUT = ROOT / "bench" / "results" / "ingest"


# -- the client (runs in a process of its own) -----------------------------------------------


def _request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _response(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while size := int((await reader.readline()).strip(), 16):
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    return status


def _bodies(target: str, mode: str, run: str, batch: int, n: int) -> tuple[str, bytes, int]:
    """The n-th request of a client: path, body, number of points in it."""
    now = int(time.time() * 1000)
    count = batch if mode == "batch" else 1
    steps = range(n * count, n * count + count)
    if target == "mlflow":
        metrics = [{"key": "loss", "value": 1.5, "timestamp": now, "step": s} for s in steps]
        if mode == "single":
            body = {"run_id": run, **metrics[0]}
            return "/api/2.0/mlflow/runs/log-metric", json.dumps(body).encode(), 1
        body = {"run_id": run, "metrics": metrics}
        return "/api/2.0/mlflow/runs/log-batch", json.dumps(body).encode(), count
    data = '"total_steps":100000000,"epoch":0.5,"loss":1.5,"learning_rate":0.0002'
    events = [
        f'{{"type":"progress","id":"{run}-{s}","run_id":"{run}","seq":{s},'
        f'"data":{{"step":{s},{data}}}}}'
        for s in steps
    ]
    if mode == "single":
        return f"/api/v1/runs/{run}/events", events[0].encode(), 1
    return (
        f"/api/v1/runs/{run}/events:batch",
        ('{"events":[' + ",".join(events) + "]}").encode(),
        count,
    )


async def _client(
    args: argparse.Namespace, run: str, token: str | None, stop_at: float, out: dict[str, Any]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    n = 0
    while time.perf_counter() < stop_at:
        path, body, points = _bodies(args.target, args.mode, run, args.batch_size, n)
        n += 1
        request = _request(f"127.0.0.1:{args.port}", path, body, headers)
        t0 = time.perf_counter()
        writer.write(request)
        status = await _response(reader)
        out["latencies"].append(time.perf_counter() - t0)
        out["statuses"][status] = out["statuses"].get(status, 0) + 1
        if 200 <= status < 300:
            out["points"] += points
    writer.close()


async def _clients(args: argparse.Namespace) -> dict[str, Any]:
    runs = json.loads(args.runs)
    out: dict[str, Any] = {"latencies": [], "statuses": {}, "points": 0}
    start = time.perf_counter()
    stop_at = start + args.duration
    await asyncio.gather(*(_client(args, run, tok, stop_at, out) for run, tok in runs))
    seconds = time.perf_counter() - start
    lat = sorted(out["latencies"])

    def pct(p: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else 0.0

    return {
        "requests": len(lat),
        "points": out["points"],
        "seconds": round(seconds, 3),
        "requests_per_second": round(len(lat) / seconds, 1),
        "points_per_second": round(out["points"] / seconds, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": {str(k): v for k, v in sorted(out["statuses"].items())},
    }


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for name in ("--target", "--mode", "--runs"):
        p.add_argument(name, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--batch-size", type=int, default=1000)
    print(json.dumps(asyncio.run(_clients(p.parse_args(argv)))))


# -- the servers -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_up(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 300  # a hang guard: MLflow's first start is slow
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start")


class Tuneplane:
    def __init__(self, work: Path) -> None:
        self.port = _free_port()
        self.settings = Settings(data_dir=work / "tuneplane", run_worker=False, hub_url="")
        env = {**os.environ, "TUNEPLANE_DATA_DIR": str(self.settings.data_dir)}
        env |= {"TUNEPLANE_RUN_WORKER": "false", "PYTHONPATH": str(ROOT)}
        self.log = (work / "tuneplane.log").open("wb")
        cmd = [sys.executable, "-m", "api", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        _wait_up(f"http://127.0.0.1:{self.port}/healthz", self.proc, "tuneplane")
        self.engine = make_engine(self.settings.db_url)

    def runs(self, n: int) -> list[tuple[str, str | None]]:
        made = insert_runs(self.engine, n, status=RunStatus.running, execution_name="bench")
        expires = datetime.now(UTC) + timedelta(hours=2)
        return [(r, mint_token(self.settings.signing_key, r, expires)) for r in made]

    def stored(self, run_ids: list[str]) -> int:
        query = select(func.count()).select_from(RunEvent).where(col(RunEvent.run_id).in_(run_ids))
        with session_scope(self.engine) as session:
            return int(session.exec(query).one())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.engine.dispose()


class Mlflow:
    def __init__(self, work: Path, venv: Path) -> None:
        if not (venv / "bin" / "mlflow").exists():
            print(f"installing mlflow into {venv} ...", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mlflow"], check=True)
        self.version = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import mlflow; print(mlflow.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.port = _free_port()
        store = work / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        self.log = (work / "mlflow.log").open("wb")
        cmd = [str(venv / "bin" / "mlflow"), "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
        cmd += ["--default-artifact-root", str(store / "artifacts")]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        _wait_up(f"http://127.0.0.1:{self.port}/health", self.proc, "mlflow")
        self.base = f"http://127.0.0.1:{self.port}/api/2.0/mlflow"

    def runs(self, n: int) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        for _ in range(n):
            r = httpx.post(f"{self.base}/runs/create", json={"experiment_id": "0"}, timeout=60)
            r.raise_for_status()
            out.append((r.json()["run"]["info"]["run_id"], None))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# -- the cases ---------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its live descendants (MLflow's server runs its workers a
    level below): what serving cost, whatever else the shared machine was doing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(int(c)) for c in children)


def _run_case(
    server: Tuneplane | Mlflow, target: str, mode: str, clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    runs = server.runs(clients)
    cmd = [sys.executable, __file__, "client", "--target", target, "--mode", mode]
    cmd += ["--port", str(server.port), "--duration", str(args.duration)]
    cmd += ["--batch-size", str(args.batch_size), "--runs", json.dumps(runs)]
    cpu = _cpu_seconds(server.proc.pid)
    result: dict[str, Any] = json.loads(
        subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    )
    cpu = _cpu_seconds(server.proc.pid) - cpu
    result |= {"target": target, "mode": mode, "clients": clients}
    result["server_cpu_ms_per_request"] = round(1000 * cpu / max(1, result["requests"]), 2)
    result["server_cpu_us_per_point"] = round(1e6 * cpu / max(1, result["points"]), 1)
    if isinstance(server, Tuneplane):
        result["stored"] = server.stored([r for r, _ in runs])
    print(json.dumps(result), flush=True)
    return result


def _cases(args: argparse.Namespace) -> list[tuple[str, int]]:
    single = [("single", int(c)) for c in args.clients.split(",")]
    return single + [("batch", int(c)) for c in args.batch_clients.split(",")]


def _cell(r: dict[str, Any] | None, mode: str) -> str:
    if r is None:
        return "-"
    if mode == "single":
        text = f"{r['requests_per_second']:,} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
    else:
        text = f"{r['points_per_second']:,} events/s"
    text += f"; server CPU {r['server_cpu_us_per_point']:,} µs/event"
    bad = sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    return text + (f", {bad} non-2xx" if bad else "")


def _table(results: list[dict[str, Any]]) -> str:
    by = {(r["target"], r["mode"], r["clients"]): r for r in results}
    lines = ["| case | tuneplane | MLflow | ratio |", "|---|---|---|---|"]
    for mode, clients in sorted({(r["mode"], r["clients"]) for r in results}, reverse=True):
        t, m = by.get(("tuneplane", mode, clients)), by.get(("mlflow", mode, clients))
        key = "requests_per_second" if mode == "single" else "points_per_second"
        ratio = f"{t[key] / m[key]:.1f}x" if t and m and m[key] else "-"
        lines.append(
            f"| {mode}, {clients} client(s) | {_cell(t, mode)} | {_cell(m, mode)} | {ratio} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    """The processor's name: the same code measured 316 requests/s at 8 clients on one 2-core
    machine and 748 on another a day later, so a result says what it was measured on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        client_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    p.add_argument("--clients", default="1,8,32", help="single-event cases")
    p.add_argument("--batch-clients", default="1,4", help="batch cases")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--skip-mlflow", action="store_true")
    p.add_argument("--mlflow-venv", type=Path, default=Path("/tmp/mlflow-venv"))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    load = os.getloadavg()
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "duration_per_case_s": args.duration,
        "batch_size": args.batch_size,
    }
    print(f"load average at start: {meta['load_average_at_start']}", flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = Path(tmp)
        targets: list[tuple[str, Any]] = [("tuneplane", lambda: Tuneplane(work))]
        if not args.skip_mlflow:
            targets.append(("mlflow", lambda: Mlflow(work, args.mlflow_venv)))
        for target, start in targets:
            server = start()
            if isinstance(server, Mlflow):
                meta["mlflow_version"] = server.version
            try:
                # Not counted: MLflow's workers import and connect on their first requests.
                _run_case(
                    server, target, "single", 8, argparse.Namespace(**{**vars(args), "duration": 3})
                )
                for mode, clients in _cases(args):
                    results.append(_run_case(server, target, mode, clients, args))
            finally:
                server.stop()
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    table = _table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    head = (
        f"Measured {meta['started']} on {meta['cpus']} CPUs ({meta['cpu_model']}), load average"
        " at start "
        f"{meta['load_average_at_start']}, at end {meta['load_average_at_end']}; "
        f"{args.duration:g} s a case, batches of {args.batch_size}"
        + (f"; MLflow {meta['mlflow_version']}" if "mlflow_version" in meta else "")
        + ".\n\n"
    )
    (args.out / "ingest.md").write_text("# Callback ingest\n\n" + head + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
