"""HttpReporter against a real local HTTP server that fails on demand (refuses connections,
answers 503 / 429 / 400), with the spool on a real disk."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from trainer.contract import events as ev
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spool import spool_file
from trainer.report import EventLog
from trainer.report_http import HttpReporter, _retry_after

# status, extra headers; None = store the event and answer 201
Rule = Callable[[dict[str, object]], tuple[int, dict[str, str]] | None]


class CallbackServer:
    """A stand-in for the api's callback endpoint: stores what it accepts, answers what `rule`
    says, can be stopped and started again on the same port (connection refused meanwhile)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/runs/run_1/events"
        self.accepted: list[dict[str, object]] = []
        self.requests: list[tuple[float, str, dict[str, object]]] = []  # (time, auth, event)
        self.batches = 0  # requests to the batch endpoint (each event of one is in `requests`)
        self.posts = 0  # HTTP requests, single or batch
        self.rule: Rule = lambda body: None
        # Cleared, the server takes requests and answers none until it is set again: an api that
        # hangs, for as long as the test wants, instead of a delay a slow machine could outlast.
        self.answering = threading.Event()
        self.answering.set()
        self.stopping = False
        self._httpd: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def start(self) -> CallbackServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                batch = self.path.endswith(":batch")
                events = json.loads(raw)["events"] if batch else [json.loads(raw)]
                with server._lock:
                    server.batches += batch
                    server.posts += 1
                    for body in events:
                        server.requests.append(
                            (time.monotonic(), self.headers.get("Authorization", ""), body)
                        )
                server.answering.wait(timeout=600)
                if server.stopping:  # a held request the client gave up on: never answered
                    return
                answers = [server.rule(body) for body in events]
                # Like the api: a 429 or 5xx is the whole request's; any other refusal is the
                # event's own (a batch's receipt says so, the batch itself is a 200).
                retry = [a for a in answers if a and (a[0] == 429 or a[0] >= 500)]
                receipts = []
                for body, answer in zip(events, answers, strict=True):
                    if answer is None and not retry:
                        with server._lock:
                            server.accepted.append(body)
                    receipts.append({"id": body["id"], "status": answer[0] if answer else 201})
                status, headers = (
                    retry[0] if retry else (200, {}) if batch else answers[0] or (201, {})
                )
                reply = json.dumps({"receipts": receipts} if batch else {}).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.stopping = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.answering.set()  # the held requests end, so that their threads can be joined
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def accepted_seqs(self) -> list[int]:
        with self._lock:
            return [int(str(b["seq"])) for b in self.accepted]


@pytest.fixture
def server() -> Iterator[CallbackServer]:
    s = CallbackServer().start()
    yield s
    s.stop()


def _progress(log: EventLog, n: int) -> list[ev.Event]:
    return [
        log.emit("progress", ev.Progress(step=i, total_steps=n, epoch=i / n, loss=1.0))
        for i in range(n)
    ]


def _wait_for(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    # A guard against a hang, not a measurement.
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_emit_never_waits_and_close_delivers_in_order_with_the_token(
    server: CallbackServer, tmp_path: Path
) -> None:
    server.answering.clear()  # an api that answers nothing yet: emit must not wait for it
    reporter = HttpReporter(server.url, "tok-123", tmp_path / "spool.jsonl")
    log = EventLog(reporter, "run_1")
    _progress(log, 20)  # returns while the first post is still unanswered
    _wait_for(lambda: server.posts == 1)
    assert server.accepted == [] and reporter.delivered == 0
    server.answering.set()
    reporter.close(timeout=120)
    assert server.accepted_seqs() == list(range(20))
    assert {auth for _, auth, _ in server.requests} == {"Bearer tok-123"}
    assert reporter.delivered == 20 and reporter.spooled == 0
    # What queued up went in batches, not one post each: the first request took what was
    # queued when it left, the second (if any) everything queued behind it.
    assert server.posts <= 2 and server.batches == reporter.batches >= 1
    assert not (tmp_path / "spool.jsonl").exists()


def test_retries_5xx_and_honours_retry_after(server: CallbackServer, tmp_path: Path) -> None:
    answers = iter([(503, {}), (429, {"Retry-After": "1"})])
    server.rule = lambda body: next(answers, None)
    reporter = HttpReporter(server.url, None, tmp_path / "spool.jsonl", first_backoff_seconds=0.05)
    EventLog(reporter, "run_1").emit("started")
    _wait_for(lambda: len(server.accepted) == 1)
    reporter.close()
    times = [t for t, _, _ in server.requests]
    assert len(times) == 3  # 503, 429, then accepted
    assert times[1] - times[0] < 0.9  # backoff after a 503 is short
    assert times[2] - times[1] >= 0.95  # the 429 said one second
    assert server.requests[0][1] == ""  # no token, no Authorization header


def test_a_refused_event_is_dropped_and_does_not_block_the_rest(
    server: CallbackServer, tmp_path: Path
) -> None:
    server.rule = lambda body: (422, {}) if body["seq"] == 1 else None
    reporter = HttpReporter(server.url, "t", tmp_path / "spool.jsonl")
    _progress(EventLog(reporter, "run_1"), 4)
    reporter.close()
    assert server.accepted_seqs() == [0, 2, 3]
    assert reporter.dropped == 1
    assert [b["seq"] for _, _, b in server.requests].count(1) == 1  # never retried


def test_api_outage_spools_then_resends_everything_in_order(
    server: CallbackServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    reporter = HttpReporter(
        server.url, "t", spool, retry_budget_seconds=0.3, resend_interval_seconds=0.2
    )
    log = EventLog(reporter, "run_1")
    _progress(log, 3)
    _wait_for(lambda: len(server.accepted) == 3)
    server.stop()
    for i in range(3, 10):
        log.emit("progress", ev.Progress(step=i, total_steps=10, epoch=0.5))
    # Undeliverable events reach the disk (so a crash now loses nothing)...
    _wait_for(lambda: spool.exists() and len(spool.read_text().splitlines()) == 7)
    server.start()
    # ...and arrive once the api is back, without waiting for close().
    _wait_for(lambda: len(server.accepted) == 10)
    _wait_for(lambda: not spool.exists())
    reporter.close()
    assert server.accepted_seqs() == list(range(10))
    assert reporter.spooled == 7


def test_close_gives_up_at_its_timeout_and_the_next_process_resends(
    server: CallbackServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    server.answering.clear()  # an api that takes the request and never answers
    # Retries that would go on for an hour: only close's own timeout ends them. A request
    # already in flight when close is called keeps its own timeout (1 s here), so close may
    # take up to timeout + request timeout; the limit below only guards against a hang.
    first = HttpReporter(
        server.url, "t", spool, retry_budget_seconds=3600, request_timeout_seconds=1
    )
    events = _progress(EventLog(first, "run_1"), 5)
    started = time.monotonic()
    first.close(timeout=1.0)
    assert time.monotonic() - started < 120
    server.stop()
    # Every event is on disk: the thread gave up on all of them (it would still be retrying
    # the first without close's timeout).
    kept = [json.loads(line)["id"] for line in spool.read_text().splitlines()]
    assert kept == [e.id for e in events]

    # A later process of the same run (the next segment) re-sends the spool at start.
    server.start()
    second = HttpReporter(server.url, "t", spool)
    EventLog(second, "run_1", segment=1).emit("started")
    second.close()
    assert server.accepted_seqs() == [0, 1, 2, 3, 4, 1_000_000]
    assert not spool.exists()


def test_emit_after_close_goes_to_the_spool(server: CallbackServer, tmp_path: Path) -> None:
    reporter = HttpReporter(server.url, "t", tmp_path / "s.jsonl")
    reporter.close()
    event = EventLog(reporter, "run_1").emit("started")
    assert json.loads((tmp_path / "s.jsonl").read_text())["id"] == event.id


def test_for_execution_reads_url_token_and_spool_dir(tmp_path: Path) -> None:
    env = ExecutionEnv(
        run_id="run_9",
        callback_url="http://127.0.0.1:9/api/v1/runs/run_9/events",
        callback_token="secret",
        spool_dir=str(tmp_path / "spool"),
    )
    reporter = HttpReporter.for_execution(env, tmp_path / "out")
    try:
        assert reporter.spool_path == spool_file(tmp_path / "spool", "run_9")
        assert reporter.url == env.callback_url
    finally:
        reporter.close(timeout=0)
    with pytest.raises(ValueError, match="TUNEPLANE_CALLBACK_URL"):
        HttpReporter.for_execution(ExecutionEnv(run_id="r"), tmp_path)


def test_retry_after_forms() -> None:
    def response(value: str) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value})

    assert _retry_after(response("7")) == 7
    assert _retry_after(response("100000")) == 300  # capped
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (_retry_after(response(soon)) or 0) <= 31
    assert _retry_after(response("soon")) is None
