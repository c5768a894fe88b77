"""`tuneplane retrain TEMPLATE [--set key=value ...] --wait [--timeout 2h]`: what a CI job runs.

Starts a run of a template over the REST api (`TUNEPLANE_URL`, `TUNEPLANE_TOKEN`), and with
`--wait` follows it to the end and turns the outcome into the exit status:

    0  the run succeeded and passed its gates (or its template has none)
    1  the run succeeded but failed a quality gate
    2  the run failed or was cancelled
    3  --timeout passed first (the run goes on unless --cancel-on-timeout)
    4  the run could not be started or followed (bad arguments, refused request, api unreachable)

The trigger carries an Idempotency-Key (`--idempotency-key`, or a fresh one per invocation), so
retrying the request after a dropped connection can never start a second run; give a key that
is stable across re-runs of the CI job (e.g. the commit and the pipeline's run id) to make a
re-run of the job follow the run its first attempt started.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from typing import Any, NoReturn

from api.cli.http import ApiError, call, make_client

EXIT_OK, EXIT_GATE, EXIT_RUN, EXIT_TIMEOUT, EXIT_ERROR = 0, 1, 2, 3, 4
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in `2h`, `90m`, `1h30m`, `45s` or a plain number of seconds."""
    text = text.strip().lower()
    try:
        value = float(text)
    except ValueError:
        match = _DURATION.match(text)
        if not text or match is None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration: use e.g. 2h, 90m, 1h30m, 45s or seconds"
            ) from None
        hours, minutes, seconds = match.groups()
        value = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be more than zero")
    return value


def parse_set(text: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it is JSON (numbers, true/false, lists),
    else kept as a string (`dataset=oxford-iiit-pet`)."""
    key, sep, raw = text.partition("=")
    if not sep or not re.match(r"^[a-z_][a-z0-9_]*$", key.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not key=value (a spec field, e.g. train_size=2500)"
        )
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "retrain",
        help="start a run of a template (for CI: --wait turns its outcome into the exit status)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("template", help="the template's name")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=parse_set,
        action="append",
        default=[],
        help="replace a spec field for this run (repeatable)",
    )
    p.add_argument("--wait", action="store_true", help="follow the run to its end")
    p.add_argument("--timeout", type=parse_duration, help="with --wait: give up after (e.g. 2h)")
    p.add_argument(
        "--cancel-on-timeout", action="store_true", help="cancel the run when --timeout passes"
    )
    p.add_argument("--poll", type=parse_duration, default=5.0, help="seconds between checks")
    p.add_argument("--idempotency-key", help="the same key never starts a second run")
    p.add_argument("--git-sha", help="commit the run is for (stored with the run)")
    p.add_argument("--pipeline-url", help="the CI run's URL (stored with the run)")
    p.add_argument("--ref", help="branch or tag (stored with the run)")
    p.add_argument("--repository", help="e.g. owner/repo (stored with the run)")
    p.add_argument("--name", help="the run's name (default: TEMPLATE vN @ SHA)")
    p.add_argument("--tag", action="append", default=[], help="a tag for the run (repeatable)")
    p.set_defaults(func=run)

    def _error(message: str) -> NoReturn:  # usage errors are "could not start", not "run failed"
        p.print_usage(sys.stderr)
        print(f"tuneplane retrain: error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)

    p.error = _error  # type: ignore[method-assign]


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"overrides": dict(args.overrides)}
    ci = {
        k: v
        for k, v in {
            "git_sha": args.git_sha,
            "pipeline_url": args.pipeline_url,
            "ref": args.ref,
            "repository": args.repository,
        }.items()
        if v
    }
    if ci:
        body["ci"] = ci
    if args.name:
        body["name"] = args.name
    if args.tag:
        body["tags"] = args.tag
    return body


def _progress(run: dict[str, Any]) -> str:
    text = str(run["status"])
    if run.get("total_steps"):
        pct = 100 * run["last_step"] / max(run["total_steps"], 1)
        text += f"  step {run['last_step']}/{run['total_steps']} ({pct:.0f}%)"
    return text


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _report(run: dict[str, Any]) -> int:
    status = run["status"]
    _say(
        f"run {run['id']} {status}"
        + (f": {run['status_reason']}" if run.get("status_reason") else "")
    )
    if run.get("final_accuracy") is not None:
        _say(
            f"accuracy {_pct(run.get('baseline_accuracy'))} -> {_pct(run['final_accuracy'])}, "
            f"macro F1 {_pct(run.get('baseline_macro_f1'))} -> {_pct(run.get('final_macro_f1'))}"
        )
    gate = run.get("gate_status")
    for reason in run.get("gate_reasons") or []:
        _say(f"  gate {reason.get('check')}: {reason.get('outcome')}: {reason.get('reason')}")
    if status != "succeeded":
        return EXIT_RUN
    if gate == "failed":
        _say("gate FAILED")
        return EXIT_GATE
    _say(f"gate {gate}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    key = args.idempotency_key or f"cli-{uuid.uuid4()}"
    try:
        with make_client() as client:
            response = call(
                lambda: client.post(
                    f"/api/v1/templates/{args.template}/runs",
                    json=_body(args),
                    headers={"Idempotency-Key": key},
                ),
                on_retry=_say,
            )
            created = response.json()
            replay = " (already started by an earlier request with this key)"
            _say(
                f"run {created['run_id']} of {created['template']} v{created['template_version']}"
                f"{replay if response.status_code == 200 else ''}"
            )
            _say(f"  api:       {created['url']}")
            _say(f"  dashboard: {created['dashboard_url']}")
            if not args.wait:
                return EXIT_OK
            return _follow(client, created["run_id"], args)
    except ApiError as exc:
        print(f"tuneplane retrain: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _follow(client: Any, run_id: str, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    shown = ""
    while True:
        # Followed for as long as the run takes: an api restart or a proxy's 502 on the way is
        # waited out (until the deadline), not mistaken for the run's end.
        left = deadline - time.monotonic() if deadline is not None else 24 * 3600.0
        try:
            run = call(
                lambda: client.get(f"/api/v1/runs/{run_id}"),
                retry_for=max(left, 1.0),
                on_retry=_say,
            ).json()
        except ApiError as exc:
            if exc.status is None and deadline is not None and time.monotonic() >= deadline:
                _say(f"timed out after {args.timeout:g} s; the api is unreachable: {exc}")
                return EXIT_TIMEOUT
            raise
        line = _progress(run)
        if line != shown:
            _say(line)
            shown = line
        # The gate is recorded in the same transaction that ends the run; wait for it anyway
        # rather than read an end without one.
        if run["status"] in TERMINAL and (run["status"] != "succeeded" or run.get("gate_status")):
            return _report(run)
        if deadline is not None and time.monotonic() >= deadline:
            _say(f"timed out after {args.timeout:g} s; run {run_id} is {run['status']}")
            if args.cancel_on_timeout:
                try:
                    call(lambda: client.post(f"/api/v1/runs/{run_id}/cancel"), retry_for=30)
                    _say(f"asked the api to cancel run {run_id}")
                except ApiError as exc:
                    _say(f"could not cancel run {run_id}: {exc}")
            return EXIT_TIMEOUT
        pause = args.poll if deadline is None else min(args.poll, deadline - time.monotonic())
        time.sleep(max(pause, 0.0))
