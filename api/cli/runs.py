"""`tuneplane runs list|show`: runs as the REST api reports them (`TUNEPLANE_URL`,
`TUNEPLANE_TOKEN`); `--json` prints the api's own JSON for scripts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from api.cli.http import ApiError, get_json, make_client
from api.wording import secs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("runs", help="list runs or show one (over the REST api)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("list", help="newest first")
    ls.add_argument("--status", action="append", help="only runs in this status (repeatable)")
    ls.add_argument("--template", help="only runs of this template")
    ls.add_argument("--tag", action="append", default=[], help="only runs with this tag")
    ls.add_argument("--limit", type=int, default=20, help="how many (1-200)")
    ls.add_argument("--json", action="store_true", help="the api's JSON")
    ls.set_defaults(func=list_runs)
    show = verbs.add_parser("show", help="one run, its metrics and its gate")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="the api's JSON")
    show.set_defaults(func=show_run)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:5.1f}%"


def list_runs(args: argparse.Namespace) -> int:
    tags = list(args.tag) + ([f"template:{args.template}"] if args.template else [])
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    if tags:
        params["tag"] = tags
    try:
        with make_client() as client:
            page = get_json(client, "/api/v1/runs", **params)
    except ApiError as exc:
        print(f"tuneplane runs: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    rows = page["items"]
    if not rows:
        print("no runs")
        return 0
    print(f"{'ID':<26} {'STATUS':<11} {'GATE':<14} {'ACC':>6} {'F1':>6}  NAME")
    for r in rows:
        print(
            f"{r['id']:<26} {r['status']:<11} {r.get('gate_status') or '':<14} "
            f"{_pct(r['final_accuracy']):>6} {_pct(r['final_macro_f1']):>6}  {r['name']}"
        )
    if page.get("next_cursor"):
        print(f"(more: --limit {min(args.limit * 2, 200)})")
    return 0


def show_run(args: argparse.Namespace) -> int:
    try:
        with make_client() as client:
            run = get_json(client, f"/api/v1/runs/{args.run_id}")
    except ApiError as exc:
        print(f"tuneplane runs: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(run, indent=2))
        return 0
    spec = run["spec"]
    lines = [
        f"run        {run['id']}  {run['name']}",
        f"status     {run['status']}"
        + (f" ({run['status_reason']})" if run["status_reason"] else ""),
        f"model      {spec['model_id']} on {spec['dataset']} ({spec['train_size']} train / "
        f"{spec['eval_size']} eval, {spec['num_epochs']:g} epochs, {spec['gpu_type']})",
        f"progress   step {run['last_step']}/{run['total_steps'] or '?'}",
        f"ran        {secs(run['duration_seconds'])}",  # the run page's duration too
        f"accuracy   {_pct(run['baseline_accuracy'])} -> {_pct(run['final_accuracy'])}",
        f"macro F1   {_pct(run['baseline_macro_f1'])} -> {_pct(run['final_macro_f1'])}",
    ]
    if run.get("template_name"):
        lines.append(f"template   {run['template_name']} v{run['template_version']}")
    for key, value in (run.get("ci") or {}).items():
        lines.append(f"ci         {key}: {value}")
    if run.get("gate_status"):
        lines.append(f"gate       {run['gate_status']}")
        for reason in run.get("gate_reasons") or []:
            check, outcome = reason.get("check"), reason.get("outcome")
            lines.append(f"           - {check}: {outcome}: {reason.get('reason')}")
    if run.get("tags"):
        lines.append(f"tags       {', '.join(run['tags'])}")
    print("\n".join(lines))
    return 0
