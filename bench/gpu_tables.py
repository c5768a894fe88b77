"""The tables bench/gpu_trainer.py prints: every run and step profile, then a short summary
with issue 16's targets (checked against the 4B rows)."""

from __future__ import annotations

from typing import Any

# Issue 16's targets on the H200, Gemma 3 4B architecture.
TARGETS = {"auto": 12.0, "auto-bf16": 20.0, "eval": 35.0, "peak_gib": 96e9 / 2**30}


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> str:
    lines = [
        "| arch | setting | plan (micro x accum, checkpointing, weights) | epochs | eval "
        "| train samples/s | baseline eval samples/s | final eval samples/s "
        "| peak allocated GiB | peak reserved GiB | api estimate GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["step_plan"] or {}
        plan = f"{p.get('micro_batch')} x {p.get('accumulation')}, {p.get('checkpointing')}, "
        lines.append(
            f"| {r['config']} | {r['setting']} | {plan}{r['weights']} | {r['epochs']} | "
            f"{r['eval_mode']} x{r['eval_batch_size']}"
            f" | {_num(r['train_samples_per_second'], '.2f')} | "
            f"{_num(r['baseline_eval_samples_per_second'], '.2f')} | "
            f"{_num(r['final_eval_samples_per_second'], '.2f')} | "
            f"{_num(r['peak_allocated_gib'], '.1f')} | {_num(r['peak_reserved_gib'], '.1f')} | "
            f"{_num(r['estimated_gib'], '.1f')} |"
        )
    lines += [
        "",
        "Step breakdown (ms per sample; CUDA events; data is CPU time, overlapped in the trainer;"
        " a plain step: no feature cache)",
        "",
        "| arch | setting | plan | samples/s | tokens/s | MFU | data | vision fwd | language fwd "
        "| backward | optimizer | peak GiB | planner est. GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pr in profiles:
        p, ms = pr["plan"], pr["ms_per_sample"]
        lines.append(
            f"| {pr['config']} | {pr['setting']} | {p['micro_batch']} x {p['accumulation']}, "
            f"{p['checkpointing']}, {p['quantization']} | {pr['samples_per_second']} | "
            f"{pr['tokens_per_second']} | {pr['mfu']:.1%} | {ms['data_cpu']} | "
            f"{ms['vision_forward']} | {ms['language_forward']} | {ms['backward']} | "
            f"{ms['optimizer']} | {pr['peak_allocated_gib']} | {p['estimated_gib']} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    """The short table, printed last: samples/s, peak memory, ratios to the original settings
    of the same architecture, and issue 16's targets on the 4B rows."""
    lines = [
        "| arch | setting | train samples/s | x original | final eval samples/s | x original "
        "| peak GiB | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(b for b in rows if b["config"] == r["config"] and b["setting"] == "original")
        train, ev = r["train_samples_per_second"], r["final_eval_samples_per_second"]
        target = ""
        if r["config"] == "4b" and r["setting"] in ("auto", "auto-bf16"):
            fits = (r["peak_allocated_gib"] or 0) < TARGETS["peak_gib"]
            t_ok = train >= TARGETS[r["setting"]] and fits
            e_ok = min(ev, r["baseline_eval_samples_per_second"]) >= TARGETS["eval"]
            target = (
                f"train >= {TARGETS[r['setting']]:.0f} under 96 GB: {'met' if t_ok else 'missed'}"
                f"; both evals >= {TARGETS['eval']:.0f}: {'met' if e_ok else 'missed'}"
            )
        lines.append(
            f"| {r['config']} | {r['setting']} | {train:.2f} | "
            f"{train / base['train_samples_per_second']:.2f} | {ev:.2f} | "
            f"{ev / base['final_eval_samples_per_second']:.2f} | "
            f"{_num(r['peak_allocated_gib'], '.1f')} | {target} |"
        )
    return "\n".join(lines)
