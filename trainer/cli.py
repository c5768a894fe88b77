"""`python -m trainer`: one execution (segment) of a fine-tuning run.

    python -m trainer --model-id google/gemma-3-4b-it --dataset oxford-iiit-pet \\
        --train-size 1000 --eval-size 500 --output-dir out

The run spec comes from the flags (`RunSpec.add_arguments`; the original
`finetune_and_evaluate.py` flags included), the execution environment (run id, callback, storage
locations, deadline) from `TUNEPLANE_*` variables (`ExecutionEnv`). stdout gets a readable line
per event; the JSON events go to the callback URL when one is set and to `--events-file` when
given (`trainer.report.make_reporter`); the rest of the log goes to stderr.

Exit status: 0 for a completed run and for a segment that stopped at its deadline or on SIGTERM
(outcome "segment_done" in results.json and the events), 1 for a failure, 2 for an invalid spec.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer.contract import events as ev
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec, describe_errors
from trainer.report import EventLog, make_reporter

TRACEBACK_TAIL = 8_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Fine-tune a vision-language model with (Q)LoRA to name image classes, "
        "evaluate it before and after, and report the results.",
    )
    RunSpec.add_arguments(parser)
    parser.add_argument("--output-dir", default="output", type=Path, help="adapter, results")
    parser.add_argument("--gcs-output-path", help="also upload the outputs to this gs:// path")
    parser.add_argument(
        "--results-file",
        type=Path,
        help="where results.json goes (default: OUTPUT_DIR/results.json)",
    )
    parser.add_argument(
        "--events-file",
        type=Path,
        help="also append every event, one JSON object a line, to this file",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the GPU when CUDA sees one, else the CPU; cuda: fail when there is no GPU",
    )
    return parser


def log(message: str) -> None:
    print(f"{datetime.now(UTC):%H:%M:%S} {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = ExecutionEnv.from_environ()
    reporter = make_reporter(env, args.output_dir, args.events_file)
    events = EventLog(reporter, env.run_id or "local", env.segment)
    try:
        try:
            spec = RunSpec.from_namespace(args)
        except ValidationError as exc:
            problems = [f"{e['field']}: {e['message']}" for e in describe_errors(exc)]
            for line in problems:
                print(f"invalid run spec: {line}", file=sys.stderr)
            events.emit("failed", ev.Failed(error="invalid run spec: " + "; ".join(problems)))
            return 2
        return Execution(spec, env, args, events).run()
    finally:
        reporter.close()


class Execution:
    """One segment of a run, in the order it happens: data, model, baseline evaluation,
    training, final evaluation, outputs. `run` reads top to bottom."""

    def __init__(
        self, spec: RunSpec, env: ExecutionEnv, args: argparse.Namespace, events: EventLog
    ) -> None:
        from trainer.results import Results

        self.spec = spec
        self.env = env
        self.events = events
        self.output_dir: Path = args.output_dir
        self.results_file: Path = args.results_file or self.output_dir / "results.json"
        self.gcs_output_path: str | None = args.gcs_output_path
        self.device_choice: str = args.device
        self.results = Results(spec, events.run_id, env.segment)
        self.trainer: Any = None
        self.started = time.monotonic()

    def run(self) -> int:
        from trainer.deadline import Stopper

        stopper = Stopper(self.env.deadline)
        with stopper.handling_sigterm():
            return self._run(stopper)

    def _run(self, stopper: Any) -> int:
        from trainer import data, model, train
        from trainer.checkpoints import CheckpointStore, spec_digest
        from trainer.deadline import SegmentEnd
        from trainer.results import environment

        spec, env, results = self.spec, self.env, self.results
        store: CheckpointStore | None = None
        try:
            device = model.pick_device(self.device_choice)
            results.environment = environment(device)
            _seed_everything(spec.seed)
            store = CheckpointStore(
                env.checkpoint_uri or self.output_dir / "checkpoints",
                work_dir=self.output_dir / ".work",
            )
            digest = spec_digest(spec)
            restored = store.latest(digest)
            resumed_from = restored.state.step if restored else None
            self.events.emit(
                "started",
                ev.Started(
                    segment=env.segment,
                    attempt=env.task_attempt,
                    resumed_from_step=resumed_from,
                    device=str(device),
                    host=socket.gethostname(),
                ),
            )
            if restored:
                log(f"resuming from {restored.uri} (step {resumed_from})")
            if warning := model.cpu_hub_warning(spec.model_id, device):
                log(f"warning: {warning}")

            with self.phase("loading"):
                splits = data.load_splits(spec.data, spec.train_size, spec.eval_size, spec.seed)
                log(
                    f"data: {splits.source}, {len(splits.labels)} classes, "
                    f"{len(splits.train)} training and {len(splits.eval)} evaluation samples"
                )
                # A size larger than the data set is not an error (the whole split is used),
                # but it must not pass unnoticed: the log says so and results.json records both.
                shortfalls = splits.shortfalls()
                for line in shortfalls:
                    log(f"warning: {line}")
                results.data = {
                    "source": splits.source,
                    "labels": splits.labels,
                    **splits.sizes(),
                    "warnings": shortfalls,
                }
                loaded = model.load(spec, device)
                log(
                    f"model: {spec.model_id} on {device}, {'4-bit' if loaded.quantized else 'fp32'}"
                    f", {loaded.trainable_params:,} of {loaded.total_params:,} parameters trained"
                )
                results.model = {
                    "model_id": spec.model_id,
                    "quantized_4bit": loaded.quantized,
                    "trainable_params": loaded.trainable_params,
                    "total_params": loaded.total_params,
                }
                self.trainer = train.Trainer(
                    loaded,
                    spec,
                    splits.labels,
                    splits.train,
                    store,
                    stopper,
                    on_progress=self.on_progress,
                    on_checkpoint=self.on_checkpoint,
                )
                if restored:
                    self.trainer.restore(restored)
                stop_ids = model.end_of_turn_ids(loaded.model, loaded.processor)

            def evaluate(stage: str) -> ev.Metrics:
                from trainer.evaluate import evaluate

                metrics = evaluate(
                    loaded.model,
                    loaded.processor,
                    splits.labels,
                    splits.eval,
                    device=device,
                    batch_size=spec.eval_batch_size,
                    max_new_tokens=spec.max_new_tokens,
                    stop_ids=stop_ids,
                    on_batch=lambda done, total: stopper.check(),
                )
                self.events.emit(
                    "evaluation",
                    ev.Evaluation(stage=stage, **metrics.model_dump()),
                )
                return metrics

            with self.phase("baseline_eval"):
                recorded = store.load_baseline(digest)
                if recorded is not None:
                    results.baseline = ev.Metrics.model_validate(recorded)
                    log("baseline: already evaluated by an earlier segment")
                else:
                    results.baseline = evaluate("baseline")
                    store.save_baseline(digest, results.baseline.model_dump(mode="json"))
                    stopper.progressed = True

            with self.phase("training"):
                self.trainer.train()
                self.record_training()

            with self.phase("final_eval"):
                results.final = evaluate("final")

            with self.phase("uploading"):
                destinations = self.save_and_upload_adapter(loaded)
            results.outcome = "completed"
            results_uri = self.write_results(destinations)
            for kind in ("adapter", "processor", "results"):
                uri = results.artifacts[kind]
                self.events.emit("artifact", ev.Artifact(kind=kind, uri=uri))
            self.events.emit(
                "completed", ev.Completed(step=self.trainer.state.step, results_uri=results_uri)
            )
            log(f"completed in {time.monotonic() - self.started:.0f} s; results: {results_uri}")
            return 0

        except SegmentEnd as stop:
            log(f"stopping this segment: {stop.reason}")
            # Without a trainer (stopped while loading) there is nothing to save yet: the next
            # segment starts from the beginning.
            checkpoint_uri = (
                self.trainer.save_checkpoint() if self.trainer else (store.uri if store else "")
            )
            self.record_training()
            results.outcome = "segment_done"
            self.write_results([])
            self.events.emit(
                "segment_done",
                ev.SegmentDone(
                    step=self.trainer.state.step if self.trainer else 0,
                    checkpoint_uri=checkpoint_uri,
                ),
            )
            # Exit 0 on purpose: a non-zero exit makes Cloud Run retry the task and, once the
            # retries are spent, mark the execution failed; this segment did its job.
            return 0

        except Exception as exc:
            tail = traceback.format_exc()[-TRACEBACK_TAIL:]
            log(f"failed: {type(exc).__name__}: {exc}")
            print(tail, file=sys.stderr)
            results.outcome = "failed"
            results.error = f"{type(exc).__name__}: {exc}"
            try:
                self.record_training()
                self.write_results([])
            except Exception as write_exc:  # reporting the failure matters more
                log(f"could not write {self.results_file}: {write_exc}")
            self.events.emit(
                "failed", ev.Failed(error=results.error[: ev.MAX_TEXT], traceback_tail=tail)
            )
            # On Cloud Run, exit 0 on purpose: a reported failure is the trainer's verdict, and a
            # non-zero exit would have Cloud Run retry the task up to max_retries times (each up
            # to the task timeout of GPU) on a failure that repeats. tuneplane decides: the run
            # failed with this error, and a retry is the user's choice. Platform retries stay
            # for what the trainer cannot report: a container killed by maintenance, OOM, a lost
            # node. Run by hand (no CLOUD_RUN_EXECUTION), a failure exits 1.
            return 0 if self.env.execution else 1

    # ---- helpers ----------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: ev.Phase) -> Iterator[None]:
        self.events.emit("phase", ev.PhaseChange(phase=name))
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.results.add_time(name, time.monotonic() - t0)

    def on_progress(self, progress: ev.Progress) -> None:
        self.events.emit("progress", progress)

    def on_checkpoint(self, step: int, uri: str) -> None:
        self.events.emit("checkpoint", ev.Checkpoint(step=step, uri=uri))

    def record_training(self) -> None:
        if self.trainer is None:
            return
        state = self.trainer.state
        self.results.training = {
            "step": state.step,
            "total_steps": state.total_steps,
            "done": state.training_done,
            "samples": state.train_samples,
            "seconds": round(state.train_seconds, 3),
            "history": self.trainer.history,
        }

    def save_and_upload_adapter(self, loaded: Any) -> list[str]:
        """Save the adapter with the processor beside it (one directory then loads for
        inference) and upload it; returns where the outputs go besides the output directory."""
        from trainer.storage import open_location, upload_tree

        adapter_dir = self.output_dir / "adapter"
        loaded.model.save_pretrained(str(adapter_dir))
        loaded.processor.save_pretrained(str(adapter_dir))
        wanted = [d.rstrip("/") for d in (self.env.artifact_uri, self.gcs_output_path) if d]
        destinations = [d for d in dict.fromkeys(wanted) if not _same_dir(d, self.output_dir)]
        primary = destinations[0] if destinations else str(self.output_dir)
        self.results.artifacts = {
            "adapter": f"{primary}/adapter",
            "processor": f"{primary}/adapter",
            "results": f"{primary}/results.json",
        }
        for dest in destinations:
            location = open_location(dest)
            log(f"uploading the adapter to {location.uri}/adapter")
            upload_tree(adapter_dir, location.child("adapter"))
        return destinations

    def write_results(self, destinations: list[str]) -> str:
        """Write results.json, then upload it, last: once it is there, the outputs are whole."""
        import torch

        from trainer.storage import open_location

        self.results.timings["total"] = round(time.monotonic() - self.started, 3)
        if torch.cuda.is_available():
            self.results.peak_gpu_memory_gb = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        self.results.write(self.results_file)
        for dest in destinations:
            open_location(dest).upload(self.results_file, "results.json")
        return self.results.artifacts.get("results", str(self.results_file))


def _same_dir(uri: str, local: Path) -> bool:
    return "://" not in uri and Path(uri).resolve() == local.resolve()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
