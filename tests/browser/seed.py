"""Runs for the dashboard tests, made the way real runs are made.

Runs are created by the runs service (as the REST API and the form do), moved to `dispatched`
the way the worker does it, and from there driven only by signed callback events posted over
HTTP to the real endpoint, so the metrics tables hold what the event ingest writes. Only what a
person cannot do through the API is written directly: spreading creation times over days (for
the history chart) and a tag holding markup (tags are validated, but the page must still escape
one that got into the table another way).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlmodel import Session, select

from api.auth.callback import mint_token
from api.config import Settings
from api.events.models import RunEvent
from api.runs import service as runs_service
from api.runs.models import Run, RunCreate, RunTag
from api.runs.states import RunStatus
from api.runs.status import set_status
from trainer.contract import events as ev
from trainer.contract.spec import RunSpec

# Markup that would run if any page forgot to escape it: a script element, an attribute break
# with an event handler (double and single quotes) and a `</textarea>` break-out. Each sets a
# global the browser tests check, and is visible as literal text when escaped.
XSS = (
    "<script>window.__xss='script'</script>"
    '"><img src=x onerror="window.__xss=\'img\'">'
    "'><svg onload=window.__xss='svg'>"
    '</textarea><b id="xss-bold">bold</b>'
)
XSS_TAG = "x\"><img src=x onerror=window.__xss='tag'>"
XSS_LABEL = "<img src=x onerror=\"window.__xss='label'\">"

LABELS = ["Abyssinian", "Bengal", "Birman", "Bombay", "British Shorthair", "Egyptian Mau"]


class Poster(Protocol):
    def post(self, url: str, *, content: str, headers: dict[str, str]) -> Any: ...


def spec(**overrides: Any) -> RunSpec:
    values: dict[str, Any] = {
        "model_id": "google/gemma-3-4b-it",
        "dataset": "oxford-iiit-pet",
        "train_size": 1000,
        "eval_size": 300,
        "batch_size": 4,
        "gradient_accumulation_steps": 4,
    }
    values.update(overrides)
    return RunSpec.model_validate(values)


def evaluation(
    stage: str, labels: Sequence[str], quality: Sequence[float], per_class: int = 6
) -> ev.Evaluation:
    """A consistent evaluation: class i gets `quality[i]` of its samples right; its mistakes go to
    the next class, or (every third) to "no label". Metrics are computed from that matrix."""
    n = len(labels)
    matrix = [[0] * (n + 1) for _ in range(n)]
    predictions: list[ev.Prediction] = []
    sample = itertools.count()
    for i, label in enumerate(labels):
        right = round(per_class * quality[i % len(quality)])
        for k in range(per_class):
            if k < right:
                j: int | None = i
            else:
                j = None if k % 3 == 2 else (i + 1) % n
            matrix[i][n if j is None else j] += 1
            predicted = None if j is None else labels[j]
            raw = f"This is a {predicted}." if predicted else "I cannot tell <b>which</b> breed."
            predictions.append(
                ev.Prediction(
                    sample_id=f"s{next(sample):04d}",
                    true_label=label,
                    predicted_label=predicted,
                    raw_answer=raw,
                    correct=j == i,
                )
            )
    per: list[ev.ClassMetrics] = []
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted_as = sum(matrix[r][i] for r in range(n))
        support = sum(matrix[i])
        p = tp / predicted_as if predicted_as else 0.0
        r = tp / support if support else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per.append(ev.ClassMetrics(label=label, precision=p, recall=r, f1=f1, support=support))
    total = n * per_class
    return ev.Evaluation(
        stage=stage,  # type: ignore[arg-type]
        accuracy=sum(matrix[i][i] for i in range(n)) / total,
        macro_f1=sum(m.f1 for m in per) / n,
        unknown_rate=sum(matrix[i][n] for i in range(n)) / total,
        num_samples=total,
        labels=list(labels),
        per_class=per,
        confusion_matrix=matrix,
        predictions=predictions,
        samples_per_second=12.5,
        seconds=total / 12.5,
    )


@dataclass
class Seeder:
    engine: Engine
    settings: Settings
    http: Poster
    _seq: dict[str, itertools.count[int]] = field(default_factory=dict)

    # -- what people and the worker do --

    def create(
        self, name: str = "", notes: str = "", tags: Sequence[str] = (), **spec_kw: Any
    ) -> str:
        with Session(self.engine) as session:
            body = RunCreate(spec=spec(**spec_kw), name=name, notes=notes, tags=list(tags))
            return runs_service.create_run(session, self.settings, body).run.id

    def dispatch(self, run_id: str, log_text: str = "") -> None:
        """What the worker records when it starts an execution: its name and its log file."""
        log = self.settings.logs_dir / f"{run_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(log_text or f"trainer log of {run_id}\nstep 1 loss 2.5\n")
        with Session(self.engine) as session:
            run = session.get(Run, run_id)
            assert run is not None
            set_status(session, run, RunStatus.dispatched)
            run.execution_name = f"local/{run_id}/1"
            run.log_uri = str(log.resolve())
            session.add(run)
            session.commit()

    def cancel(self, run_id: str, reason: str | None = None) -> None:
        with Session(self.engine) as session:
            runs_service.cancel_run(session, self.settings, run_id, reason=reason)

    # -- what the trainer reports, over HTTP --

    def post(self, run_id: str, event: ev._Envelope) -> None:
        token = mint_token(
            self.settings.signing_key, run_id, datetime.now(UTC) + timedelta(hours=1)
        )
        response = self.http.post(
            f"/api/v1/runs/{run_id}/events",
            content=event.model_dump_json(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code in (200, 201), response.text

    def _envelope(self, run_id: str) -> dict[str, Any]:
        seq = self._seq.setdefault(run_id, itertools.count())
        return {"run_id": run_id, "seq": next(seq)}

    def started(self, run_id: str) -> None:
        self.post(
            run_id,
            ev.StartedEvent(
                **self._envelope(run_id), data=ev.Started(device="cuda:0", host="tuneplane-test")
            ),
        )

    def phase(self, run_id: str, phase: str) -> None:
        self.post(run_id, ev.PhaseEvent(**self._envelope(run_id), data=ev.PhaseChange(phase=phase)))  # type: ignore[arg-type]

    def progress(self, run_id: str, steps: range, total: int, start_loss: float = 2.6) -> None:
        for step in steps:
            loss = 0.35 + (start_loss - 0.35) * (0.97**step) + 0.04 * ((step * 7919) % 11) / 11
            data = ev.Progress(
                step=step, total_steps=total, epoch=step / total, loss=loss, learning_rate=2e-4
            )
            self.post(run_id, ev.ProgressEvent(**self._envelope(run_id), data=data))

    def evaluate(
        self, run_id: str, stage: str, quality: Sequence[float], labels: Sequence[str] = LABELS
    ) -> None:
        data = evaluation(stage, labels, quality)
        self.post(run_id, ev.EvaluationEvent(**self._envelope(run_id), data=data))

    def completed(self, run_id: str, step: int) -> None:
        self.post(run_id, ev.CompletedEvent(**self._envelope(run_id), data=ev.Completed(step=step)))

    def failed(self, run_id: str, error: str) -> None:
        data = ev.Failed(
            error=error,
            traceback_tail="Traceback (most recent call last):\n  ...\nRuntimeError: " + error,
        )
        self.post(run_id, ev.FailedEvent(**self._envelope(run_id), data=data))

    # -- whole runs --

    def succeeded_run(
        self,
        name: str,
        base_q: Sequence[float],
        final_q: Sequence[float],
        steps: int = 24,
        labels: Sequence[str] = LABELS,
        **kw: Any,
    ) -> str:
        run_id = self.create(name, **kw)
        self.dispatch(run_id)
        self.started(run_id)
        self.phase(run_id, "baseline_eval")
        self.evaluate(run_id, "baseline", base_q, labels)
        self.phase(run_id, "training")
        self.progress(run_id, range(1, steps + 1), steps)
        self.phase(run_id, "final_eval")
        self.evaluate(run_id, "final", final_q, labels)
        self.phase(run_id, "uploading")
        uri = f"gs://tuneplane-test/runs/{run_id}/adapter"
        self.post(
            run_id,
            ev.ArtifactEvent(**self._envelope(run_id), data=ev.Artifact(kind="adapter", uri=uri)),
        )
        self.completed(run_id, steps)
        return run_id

    # -- templates (CI retrains), over REST --

    def template(self, name: str, gates: dict[str, Any], auto_promote: bool = False) -> None:
        body = {
            "name": name,
            "spec": spec().model_dump(mode="json"),
            "gates": gates,
            "auto_promote": auto_promote,
        }
        response = self.http.post(
            "/api/v1/templates",
            content=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 201, response.text

    def template_run(
        self, template: str, final_q: Sequence[float], labels: Sequence[str] = LABELS
    ) -> str:
        """A run triggered from `template` that succeeds with `final_q`; the api gates it (and
        auto-promotes it if the template says so) as it ends. Every such run evaluates the
        same samples (ids s0000...), so the champion checks pair them."""
        response = self.http.post(
            f"/api/v1/templates/{template}/runs",
            content="{}",
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code in (200, 201), response.text
        run_id: str = response.json()["run_id"]
        self.dispatch(run_id)
        self.started(run_id)
        self.evaluate(run_id, "baseline", [0.3] * len(labels), labels)
        self.evaluate(run_id, "final", final_q, labels)
        self.completed(run_id, 10)
        return run_id

    def running_run(self, name: str, steps_done: int = 10, total: int = 60, **kw: Any) -> str:
        run_id = self.create(name, **kw)
        self.dispatch(run_id)
        self.started(run_id)
        self.phase(run_id, "baseline_eval")
        self.evaluate(run_id, "baseline", [0.5, 0.3, 0.6, 0.2])
        self.phase(run_id, "training")
        self.progress(run_id, range(1, steps_done + 1), total)
        return run_id

    def failed_run(self, name: str, error: str, **kw: Any) -> str:
        run_id = self.create(name, **kw)
        self.dispatch(run_id)
        self.started(run_id)
        self.phase(run_id, "loading")
        self.failed(run_id, error)
        return run_id

    def backdate(self, run_id: str, days: float) -> None:
        """Move a run's times `days` into the past (the history needs runs spread over time)."""
        delta = timedelta(days=days)
        with Session(self.engine) as session:
            run = session.get(Run, run_id)
            assert run is not None
            for attr in ("created_at", "started_at", "finished_at", "updated_at"):
                if getattr(run, attr) is not None:
                    setattr(run, attr, getattr(run, attr) - delta)
            session.add(run)
            for row in session.exec(select(RunEvent).where(RunEvent.run_id == run_id)):
                row.time -= delta
                session.add(row)
            session.commit()

    def add_raw_tag(self, run_id: str, tag: str) -> None:
        with Session(self.engine) as session:
            session.add(RunTag(run_id=run_id, tag=tag))
            session.commit()


@dataclass
class Fleet:
    """The seeded runs, by role."""

    succeeded: str
    improved: str
    regressed: str
    running: str
    failed: str
    cancelled: str
    queued: str
    xss: str


def seed_fleet(seeder: Seeder) -> Fleet:
    """Runs in every state, finished ones spread over two weeks, and one full of markup."""
    s = seeder
    base = [0.5, 0.35, 0.65, 0.15, 0.5, 0.3]
    older = s.succeeded_run(
        "gemma-4b baseline recipe",
        base,
        [0.85, 0.7, 0.95, 0.5, 0.8, 0.7],
        tags=["pets", "nightly"],
        notes="First recipe.",
    )
    s.backdate(older, 14)
    improved = s.succeeded_run(
        "gemma-4b lr 3e-4",
        base,
        [1.0, 0.85, 1.0, 0.7, 0.85, 0.8],
        learning_rate=3e-4,
        tags=["pets"],
    )
    s.backdate(improved, 7)
    regressed = s.succeeded_run(
        "gemma-4b r8", base, [0.85, 0.5, 0.95, 0.35, 0.7, 0.7], lora_r=8, tags=["pets", "nightly"]
    )
    s.backdate(regressed, 2)
    digits = s.succeeded_run(
        "digits smoke",
        [0.1] * 4,
        [0.9, 0.8, 1.0, 0.7],
        labels=["zero", "one", "two", "three"],
        dataset="digits",
        train_size=200,
        eval_size=40,
    )
    s.backdate(digits, 1)
    failed = s.failed_run(
        "gemma-12b oom",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        model_id="google/gemma-3-12b-it",
        gpu_type="nvidia-rtx-pro-6000",
    )
    cancelled = s.create("abandoned sweep", tags=["sweep"])
    s.cancel(cancelled, reason="superseded: " + XSS)
    running = s.running_run("gemma-4b long run", tags=["pets"])
    queued = s.create("waiting for a GPU", tags=["nightly"])
    xss = s.succeeded_run(
        XSS,
        [0.5, 0.2, 0.4],
        [0.9, 0.6, 0.8],
        labels=[XSS_LABEL, "Siamese", "Sphynx"],
        notes=XSS,
        tags=["xss"],
        dataset=f"imagefolder:{s.settings.data_dir.resolve() / 'pets'}",  # under the roots
    )
    s.add_raw_tag(xss, XSS_TAG)
    with Session(s.engine) as session:
        # A log location that is a script URL must never become a link.
        run = session.get(Run, xss)
        assert run is not None
        run.log_uri = "javascript:window.__xss='log'"
        session.add(run)
        session.commit()
    return Fleet(older, improved, regressed, running, failed, cancelled, queued, xss)
