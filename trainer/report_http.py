"""The reporter a dispatched trainer uses: posts each event to the api's callback URL.

Training must never wait on the api, and no event may be lost when the api is away (restarting,
deploying, a network blip), so:
- `emit` only puts the event's JSON on an in-memory queue; a background thread posts it.
- Connection errors, 429 and 5xx are retried with exponential backoff (a `Retry-After` header
  wins) for `retry_budget_seconds`; after that the event goes to the spool file (JSON lines).
- While the spool holds anything, new events are appended to it too (order is kept and training
  is not slowed by waiting on a dead api event by event), and the spool is re-sent every
  `resend_interval_seconds` until the api takes it.
- Other 4xx answers (a malformed event, an expired token, a 409 for a place in the log that
  holds another event) are logged and dropped: retrying cannot fix them, and one bad event must
  not block the ones behind it.
- What accumulated while a post was under way (or in the spool) goes in one request to the
  batch endpoint (`events:batch`, at most MAX_BATCH_EVENTS events and MAX_EVENT_BYTES), in order;
  its per-event receipts say which were stored and which refused (dropped, as above). A trainer
  reporting every step thus sends one request per round trip, not one per event. An api without
  the batch endpoint (404/405) gets single posts from then on.
- A spool left by an earlier process of the same run (a crashed or finished segment) is re-sent
  at start; `close` keeps trying until its timeout and leaves what is still undelivered on disk.
The api stores each event once by its id, so re-sending something that did arrive is harmless.
"""

from __future__ import annotations

import email.utils
import enum
import logging
import os
import queue
import threading
import time
from pathlib import Path

import httpx

from trainer.contract import events as ev
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spool import spool_file

log = logging.getLogger("trainer.report")


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    DROPPED = "dropped"  # refused for good (4xx): logged, not retried
    RETRY = "retry"  # connection error, 429, 5xx


_STOP = object()


class _Spool:
    """The JSON-lines file of undelivered events. Appends are flushed and synced one by one, so
    a trainer killed right after `emit` has its event on disk; removal rewrites the file through
    a temporary one, so a crash mid-way leaves either the old or the new file, never half."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.count = len(self.read())

    def read(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line.strip()]

    def append(self, lines: list[str]) -> None:
        if not lines:
            return
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            self.count += len(lines)

    def drop_first(self, n: int) -> None:
        if n <= 0:
            return
        with self.lock:
            rest = self.read()[n:]
            if rest:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in rest), encoding="utf-8")
                os.replace(tmp, self.path)
            else:
                self.path.unlink(missing_ok=True)
            self.count = len(rest)


class HttpReporter:
    """`trainer.report.Reporter` that posts to the api (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        spool_path: Path,
        *,
        retry_budget_seconds: float = 10.0,
        resend_interval_seconds: float = 5.0,
        request_timeout_seconds: float = 10.0,
        first_backoff_seconds: float = 0.25,
        max_backoff_seconds: float = 4.0,
        auth: httpx.Auth | None = None,
    ) -> None:
        self.url = url
        self.retry_budget = retry_budget_seconds
        self.resend_interval = resend_interval_seconds
        self.request_timeout = request_timeout_seconds
        self.first_backoff = first_backoff_seconds
        self.max_backoff = max_backoff_seconds
        self.delivered = self.dropped = self.spooled = 0  # counters, for logs and tests
        self.batches = 0  # batch requests the api took
        self.batch_url: str | None = ev.batch_url(url)  # None once the api said it has none

        headers = {"Content-Type": "application/json", "User-Agent": "tuneplane-trainer"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(headers=headers, timeout=request_timeout_seconds, auth=auth)
        self._spool = _Spool(Path(spool_path))
        self._queue: queue.Queue[object] = queue.Queue()
        self._wake = threading.Event()  # cuts a backoff short when close() is called
        self._deadline: float | None = None  # set by close(): give up (spool) after this
        self._closed = False
        if self._spool.count:
            log.info(
                "re-sending %d events left in %s by an earlier process",
                self._spool.count,
                self._spool.path,
            )
        self._thread = threading.Thread(target=self._run, name="tuneplane-reporter", daemon=True)
        self._thread.start()

    @classmethod
    def for_execution(cls, env: ExecutionEnv, output_dir: Path) -> HttpReporter:
        """The reporter of a dispatched execution: its URL, its token, and the spool in the
        dispatcher's spool directory (or the output directory when it names none)."""
        if not env.callback_url or not env.run_id:
            raise ValueError("an HTTP reporter needs TUNEPLANE_CALLBACK_URL and TUNEPLANE_RUN_ID")
        token = env.callback_token.get_secret_value() if env.callback_token else None
        auth = None
        if token is None and env.execution:
            # Cloud Run with CALLBACK_AUTH=oidc: the service account's ID token instead.
            from trainer.id_token import GoogleIdTokenAuth, audience_of

            auth = GoogleIdTokenAuth(audience_of(env.callback_url), env.execution)
        spool = spool_file(env.spool_dir or output_dir, env.run_id)
        return cls(env.callback_url, token, spool, auth=auth)

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    @property
    def spool_count(self) -> int:
        return self._spool.count

    # -- the Reporter protocol -------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        body = event.model_dump_json()
        if self._closed:
            # Too late for the thread; on disk it still reaches the api (next process, or the
            # local dispatcher's check of a finished execution).
            log.warning("event %s emitted after close(); spooled", event.id)
            self._spool.append([body])
            return
        self._queue.put(body)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is pending, trying for at most `timeout` seconds; whatever is still
        undelivered then stays in the spool file."""
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join(timeout + self.request_timeout + 5)
        if self._thread.is_alive():
            log.warning("the reporter's thread did not stop; events may be left in the queue")
        if self._spool.count:
            log.warning(
                "%d events could not be delivered to %s; they are kept in %s",
                self._spool.count,
                self.url,
                self._spool.path,
            )

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug here must not lose events: what is queued goes to disk
            log.exception("the reporter's thread failed")
        finally:
            pending = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, str):
                    pending.append(item)
            self._to_spool(pending)
            self._client.close()

    def _loop(self) -> None:
        resend_at = time.monotonic()  # an earlier process's spool: try it at once
        close_pause = self.first_backoff
        while True:
            deadline = self._deadline
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if self._spool.count and now >= resend_at:
                pause = self._resend_spool()
                if pause is not None:
                    if deadline is not None:  # closing: try more often, the deadline bounds it
                        pause, close_pause = min(pause, close_pause), close_pause * 2
                    resend_at = time.monotonic() + pause
            if self._spool.count:
                # The api is away: new events queue up behind the spooled ones, in order.
                wait = max(0.0, resend_at - time.monotonic())
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                item = self._get(wait)
                if isinstance(item, str):
                    self._to_spool([item])
                continue
            item = self._get(None if deadline is None else 0.0)
            if isinstance(item, str):
                items = [item, *self._backlog(len(item))]
                if self._deliver(items) is _Outcome.RETRY:
                    self._to_spool(items)
                    resend_at = time.monotonic() + self.resend_interval
            elif deadline is not None and self._queue.empty():
                return  # closing, and everything is delivered

    def _backlog(self, size: int) -> list[str]:
        """The events queued behind the one at hand that fit in its batch (without waiting)."""
        out: list[str] = []
        while self.batch_url and len(out) + 1 < ev.MAX_BATCH_EVENTS:
            try:
                item = self._queue.queue[0]  # a peek: an event that does not fit stays queued
            except IndexError:
                break
            if isinstance(item, str) and size + len(item) + 16 > ev.MAX_EVENT_BYTES:
                break
            self._queue.get_nowait()
            if isinstance(item, str):  # (_STOP only wakes the loop; close set the deadline)
                out.append(item)
                size += len(item) + 1
        return out

    def _get(self, timeout: float | None) -> object | None:
        try:
            if timeout is not None and timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _to_spool(self, items: list[str]) -> None:
        if not items:
            return
        if not self._spool.count:
            log.warning("cannot reach %s; keeping events in %s", self.url, self._spool.path)
        self._spool.append(items)
        self.spooled += len(items)

    def _resend_spool(self) -> float | None:
        """Send the spool in order until the api stops taking it. Returns how long to wait
        before the next try, or None when the spool is empty."""
        items = self._spool.read()
        done, pause = 0, None
        for chunk in self._chunks(items):
            if self._deadline is not None and time.monotonic() >= self._deadline:
                pause = 0.0
                break
            outcome, retry_after = self._attempt(chunk)
            if outcome is _Outcome.RETRY:
                pause = retry_after if retry_after is not None else self.resend_interval
                break
            done += len(chunk)
        self._spool.drop_first(done)
        if done:
            log.info("re-sent %d spooled events; %d left", done, self._spool.count)
        return pause if self._spool.count else None

    def _chunks(self, items: list[str]) -> list[list[str]]:
        """`items` in order, cut into batches that the api takes (one each without batches)."""
        if not self.batch_url:
            return [[item] for item in items]
        chunks: list[list[str]] = []
        size = 0
        for item in items:
            if (
                not chunks
                or len(chunks[-1]) >= ev.MAX_BATCH_EVENTS
                or size + len(item) + 16 > ev.MAX_EVENT_BYTES
            ):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += len(item) + 1
        return chunks

    def _deliver(self, items: list[str]) -> _Outcome:
        """Post with retries for the retry budget (bounded by close's deadline)."""
        give_up = time.monotonic() + self.retry_budget
        delay = self.first_backoff
        while True:
            outcome, retry_after = self._attempt(items)
            if outcome is not _Outcome.RETRY:
                return outcome
            wait = retry_after if retry_after is not None else delay
            limit = give_up if self._deadline is None else min(give_up, self._deadline)
            if time.monotonic() + wait > limit:
                return _Outcome.RETRY
            if self._wake.wait(wait):
                self._wake.clear()
            delay = min(delay * 2, self.max_backoff)

    def _attempt(self, items: list[str]) -> tuple[_Outcome, float | None]:
        """One request: a single post, or a batch when there are several events."""
        timeout = self.request_timeout
        if self._deadline is not None:
            timeout = max(0.5, min(timeout, self._deadline - time.monotonic()))
        batch = len(items) > 1 and self.batch_url is not None
        url = self.batch_url if batch and self.batch_url else self.url
        body = '{"events": [' + ", ".join(items) + "]}" if batch else items[0]
        try:
            response = self._client.post(url, content=body, timeout=timeout)
        except httpx.TransportError as exc:
            log.debug("posting events failed: %r", exc)
            return _Outcome.RETRY, None
        status = response.status_code
        if status == 429 or status >= 500:
            return _Outcome.RETRY, _retry_after(response)
        if batch and status in (404, 405) and "receipts" not in response.text:
            # An api without the batch endpoint (a 404 of an unknown run is a problem
            # document, and single posts would get it too): one post each from now on.
            log.info("the api has no batch endpoint; posting events one by one")
            self.batch_url = None
            outcomes = [self._attempt([item])[0] for item in items]
            return (_Outcome.RETRY if _Outcome.RETRY in outcomes else _Outcome.DELIVERED), None
        if 200 <= status < 300:
            refused = _refused(response) if batch else []
            self.batches += batch
            self.delivered += len(items) - len(refused)
            self.dropped += len(refused)
            for receipt in refused[:5]:
                log.warning("the api refused an event of a batch and it is dropped: %s", receipt)
            return _Outcome.DELIVERED, None
        self.dropped += len(items)
        log.warning(
            "the api refused %d event(s) with %d and they are dropped (retrying cannot fix it): %s",
            len(items),
            status,
            response.text[:500],
        )
        return _Outcome.DROPPED, None


def _refused(response: httpx.Response) -> list[str]:
    """The receipts of a batch's refused events (each final: a 409 or a 422), in words."""
    try:
        receipts = response.json().get("receipts", [])
    except (ValueError, AttributeError):
        return []
    return [
        f"{r.get('status')} {r.get('id')}: {r.get('outcome')}"
        for r in receipts
        if isinstance(r, dict) and isinstance(r.get("status"), int) and r["status"] >= 400
    ]


def _retry_after(response: httpx.Response, cap: float = 300.0) -> float | None:
    """The `Retry-After` header in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), cap)
