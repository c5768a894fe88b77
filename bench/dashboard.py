"""How fast the dashboard's runs page and history render with 10,000 runs in the database.

    .venv/bin/python bench/dashboard.py                      # SQLite, 10,000 runs
    .venv/bin/python bench/dashboard.py --db postgresql      # the local PostgreSQL server
    .venv/bin/python bench/dashboard.py --out bench/dashboard.md

Seeds runs shaped like real ones (every status, four models, three data sets, two tags each,
baseline and final metrics on the succeeded ones, spread over six months), serves the real app
with uvicorn on a loopback port, and times whole HTTP requests from a client in the same process
(`httpx`): server work, the socket and the client's reading of the page. Each URL is requested
a few times to warm up, then `--requests` times; p50 and p95 are of those.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.config import Settings
from api.db import make_engine, migrate
from api.main import create_app
from api.runs.models import Run, RunTag
from tests.conftest import LiveServer

MODELS = [
    "google/gemma-3-4b-it",
    "google/gemma-3-12b-it",
    "google/gemma-3-27b-it",
    "Qwen/Qwen2.5-VL-7B-Instruct",
]
DATASETS = ["oxford-iiit-pet", "digits", "imagefolder:/data/flowers"]
TAGS = ["nightly", "pets", "sweep", "ci", "baseline", "lr-search", "r8", "r16", "r32", "prod"]
STATUSES = (
    ["succeeded"] * 70 + ["failed"] * 10 + ["cancelled"] * 5 + ["running"] * 5 + ["queued"] * 10
)


def seed(engine: Any, n: int, rng: random.Random) -> None:
    now = datetime.now(UTC)
    runs, tags = [], []
    for i in range(n):
        status = rng.choice(STATUSES)
        model, dataset = rng.choice(MODELS), rng.choice(DATASETS)
        created = now - timedelta(seconds=rng.uniform(0, 180 * 86400))
        started = created + timedelta(minutes=rng.uniform(1, 30)) if status != "queued" else None
        finished = (
            started + timedelta(minutes=rng.uniform(20, 200))
            if started and status in ("succeeded", "failed", "cancelled")
            else None
        )
        base_acc = rng.uniform(0.3, 0.7)
        ok = status == "succeeded"
        spec = {
            "model_id": model,
            "dataset": dataset,
            "train_size": rng.choice([500, 1000, 2500, 3600]),
            "eval_size": 500,
            "num_epochs": 1.0,
            "learning_rate": rng.choice([1e-4, 2e-4, 3e-4]),
            "batch_size": 4,
            "gradient_accumulation_steps": 4,
            "lora_r": rng.choice([8, 16, 32]),
            "gpu_type": "nvidia-rtx-pro-6000",
        }
        runs.append(
            {
                "id": f"run_{uuid.UUID(int=rng.getrandbits(128)).hex[:20]}",
                "name": f"{model.split('/')[-1]} {rng.choice(TAGS)} #{i}",
                "notes": "",
                "status": status,
                "status_reason": None if status != "failed" else "CUDA out of memory",
                "spec": spec,
                "model_id": model,
                "dataset": dataset,
                "gpu_type": "nvidia-rtx-pro-6000",
                "created_at": created,
                "updated_at": finished or started or created,
                "started_at": started,
                "finished_at": finished,
                "segment": 0,
                "last_step": 100 if ok else 40,
                "total_steps": 100,
                "baseline_accuracy": base_acc if status != "queued" else None,
                "baseline_macro_f1": base_acc - 0.03 if status != "queued" else None,
                "final_accuracy": min(0.99, base_acc + rng.uniform(0.05, 0.3)) if ok else None,
                "final_macro_f1": min(0.99, base_acc + rng.uniform(0.03, 0.28)) if ok else None,
                "dispatch_attempts": 1,
            }
        )
        for tag in rng.sample(TAGS, 2):
            tags.append({"run_id": runs[-1]["id"], "tag": tag})
    with engine.begin() as conn:
        for start in range(0, n, 2000):
            conn.execute(insert(Run), runs[start : start + 2000])
        for start in range(0, len(tags), 4000):
            conn.execute(insert(RunTag), tags[start : start + 4000])


def measure(client: httpx.Client, url: str, requests: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        client.get(url).raise_for_status()
    times = []
    size = 0
    for _ in range(requests):
        t0 = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
        size = len(response.content)
    times.sort()
    return {
        "p50": statistics.median(times),
        "p95": times[round(0.95 * (len(times) - 1))],
        "max": times[-1],
        "kb": size / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)

    rng = random.Random(5)
    tmp = Path(tempfile.mkdtemp(prefix="tuneplane-bench-"))
    schema = None
    if args.db == "sqlite":
        db_url = f"sqlite:///{tmp / 'bench.db'}"
    else:
        schema = "bench_" + uuid.uuid4().hex[:8]
        admin = create_engine(args.pg_url.replace("postgresql://", "postgresql+psycopg://"))
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        db_url = f"{args.pg_url}?options=-csearch_path%3D{schema}"
    settings = Settings(data_dir=tmp / "data", database_url=db_url, run_worker=False)
    engine = make_engine(settings.db_url)
    migrate(engine)
    t0 = time.perf_counter()
    seed(engine, args.runs, rng)
    seeded = time.perf_counter() - t0
    if args.db == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))

    load = os.getloadavg()
    server = LiveServer(create_app(settings)).start()
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            first = client.get("/").text
            after = first.split('rel="next" class="button subtle" href="/?after=')[1].split('"')[0]
            # A deep page: follow "Older" 50 times (keyset paging costs the same at any depth).
            deep = after
            for _ in range(49):
                page = client.get(f"/?after={deep}").text
                deep = page.split('rel="next" class="button subtle" href="/?after=')[1].split('"')[
                    0
                ]
            urls = [
                ("/", "runs, first page (50 rows)"),
                (f"/?after={after}", "runs, page 2"),
                (f"/?after={deep}", "runs, page 51"),
                ("/?status=succeeded", "runs, status filter"),
                ("/?model=google/gemma-3-12b-it", "runs, model filter"),
                ("/?tag=nightly", "runs, tag filter"),
                ("/?q=sweep", "runs, text search"),
                ("/?status=failed&tag=prod&q=27b", "runs, all filters"),
                ("/history", "history (6 groups x 60 runs)"),
            ]
            for url, label in urls:
                rows.append((label, measure(client, url, args.requests)))
    finally:
        server.stop()
        engine.dispose()
        if schema:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))

    command = "python bench/dashboard.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Dashboard render time, {args.runs:,} runs ({args.db})",
        "",
        f"Command: `{command.strip()}`  ",
        f"Measured: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, Python "
        f"{platform.python_version()}, {args.requests} requests per URL after 5 warm-up requests, "
        f"one client, whole HTTP round trip over loopback. Seeding took {seeded:.1f} s. "
        f"{os.cpu_count()} CPUs; load average {load[0]:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (the machine is shared: other jobs were running).",
        "",
        "| page | p50 ms | p95 ms | max ms | KiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['p50']:.1f} | {r['p95']:.1f} | {r['max']:.1f} | {r['kb']:.0f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with args.out.open("a") as f:
            f.write(report + "\n")
    worst = max(r["p95"] for label, r in rows if label.startswith(("runs", "history")))
    print(f"worst p95: {worst:.1f} ms (target < 200 ms)")
    return 0 if worst < 200 else 1


if __name__ == "__main__":
    raise SystemExit(main())
