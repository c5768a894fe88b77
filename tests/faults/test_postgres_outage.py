"""PostgreSQL stopped for 20 s under a running `tuneplane serve` while a run's trainer reports
(the real reporter, trainer/report_http.py), then started again: the api answers 503 with
Retry-After meanwhile (never a 500), /readyz says 503, no event is lost, and the same process
serves again once the database is back. The cluster is the test's own (tests/faults/
private_postgres.py): the shared server is not this test's to stop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from api.auth.callback import mint_token
from api.db import make_engine, migrate
from api.events.models import RunEvent
from api.runs.states import RunStatus
from tests.api.factories import insert_runs
from tests.faults.private_postgres import PrivateCluster, binaries
from tests.faults.serve import Serve
from tests.runs_client import HANG_GUARD_S
from trainer.contract import events as ev
from trainer.report import EventLog
from trainer.report_http import HttpReporter

OUTAGE_S = 20.0  # the outage; a fixed length of the fault, not a bound on anything
KEY = "outage-test-signing-key-0123456789abcdef"
BEFORE = AFTER = 20  # events the trainer sends while the database is up, on either side
TOTAL_STEPS = 1000


def _stored(engine: Engine, run_id: str) -> list[int]:
    with Session(engine) as s:
        return list(s.exec(select(RunEvent.seq).where(RunEvent.run_id == run_id)))


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S  # a hang guard only
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_postgres_outage_is_503_with_retry_after_and_loses_no_event(
    db_kind: str, tmp_path: Path
) -> None:
    # One function over 60 lines, on purpose: the phases (up, down, up again) share one
    # cluster, one server and one reporter, and read in the order the fault happens.
    if db_kind != "postgresql":
        pytest.skip("PostgreSQL only: SQLite is a file, not a server that can be away")
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    with PrivateCluster(bin_dir) as pg:
        engine = make_engine(pg.url)
        migrate(engine)
        [run_id] = insert_runs(engine, 1, status=RunStatus.running)
        with Serve(
            tmp_path / "data", pg.url, run_worker="false", callback_signing_key=KEY
        ) as server:
            token = mint_token(KEY.encode(), run_id, datetime.now(UTC) + timedelta(hours=1))
            url = f"{server.url}/api/v1/runs/{run_id}/events"
            reporter = HttpReporter(url, token, tmp_path / "spool.jsonl")
            trainer = EventLog(reporter, run_id)
            sent: list[ev.Event] = []

            def report() -> None:
                step = len(sent) + 1
                data = ev.Progress(step=step, total_steps=TOTAL_STEPS, epoch=0.01, loss=1.0)
                sent.append(trainer.emit("progress", data))

            for _ in range(BEFORE):
                report()
            _wait(lambda: len(_stored(engine, run_id)) == BEFORE, "the first events never came")

            pg.stop()
            stopped = time.monotonic()
            probes: list[httpx.Response] = []
            replay = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while time.monotonic() - stopped < OUTAGE_S:
                    report()  # the trainer trains on, and reports
                    probes.append(http.get("/readyz"))
                    probes.append(http.get("/api/v1/runs"))
                    # The trainer's own retry of an event stored before the outage.
                    probes.append(http.post(url, content=sent[0].model_dump_json(), headers=replay))
                    time.sleep(0.5)
                during = len(sent) - BEFORE
                pg.start()
                restarted = time.monotonic()
                _wait(lambda: http.get("/readyz").status_code == 200, "the api never recovered")
                recovered = time.monotonic() - restarted
                assert http.get("/api/v1/runs").status_code == 200
            for _ in range(AFTER):
                report()
            reporter.close(timeout=HANG_GUARD_S)
            assert server.proc is not None and server.proc.poll() is None  # never restarted
            log = server.faults_in_log()
        stored = _stored(engine, run_id)
        engine.dispose()

    assert {r.status_code for r in probes} == {503}, [(r.status_code, r.text) for r in probes]
    assert all(r.headers.get("Retry-After") for r in probes)
    for r in probes:  # the database's address is in the server's log only
        assert str(pg.port) not in r.text and "127.0.0.1" not in r.text, r.text
    titles = {json.loads(r.text)["title"] for r in probes}
    assert titles == {"Database unreachable", "Database unavailable"}, titles
    assert reporter.dropped == 0 and reporter.spool_count == 0
    assert sorted(stored) == [e.seq for e in sent], "an event was lost or stored twice"
    assert log == [], "\n".join(log[:20])
    print(
        f"FIGURE postgresql outage: {OUTAGE_S:.0f} s down, {len(probes)} probes all 503 with "
        f"Retry-After, /readyz 200 again {recovered:.2f} s after the restart; "
        f"{len(sent)} events sent ({during} during the outage, {reporter.spooled} spooled), "
        f"{len(stored)} stored"
    )
