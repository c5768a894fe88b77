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
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from trainer import data, model, preflight, train
from trainer.checkpoints import CheckpointStore, spec_digest
from trainer.contract import events as ev
from trainer.contract.execution import ExecutionEnv
from trainer.contract.spec import RunSpec, describe_errors
from trainer.deadline import SegmentEnd, Stopper
from trainer.evaluate import Evaluator
from trainer.merge import write_merged
from trainer.plan import plan_run
from trainer.report import EventLog, make_reporter
from trainer.results import Results, environment
from trainer.storage import open_location, upload_tree

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
    events = EventLog(reporter, env.run_id or "local", env.segment, env.task_attempt)
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
    """One segment of a run, in the order it happens: preflight, data, model, baseline
    evaluation, training, final evaluation, outputs. `_run` reads top to bottom; each step is a
    method below it, and the two ways a segment ends early (its deadline, a failure) are
    `_segment_done` and `_failed`."""

    def __init__(
        self, spec: RunSpec, env: ExecutionEnv, args: argparse.Namespace, events: EventLog
    ) -> None:
        self.spec = spec
        self.env = env
        self.events = events
        self.output_dir: Path = args.output_dir
        self.results_file: Path = args.results_file or self.output_dir / "results.json"
        self.gcs_output_path: str | None = args.gcs_output_path
        self.device_choice: str = args.device
        self.results = Results(spec, events.run_id, env.segment)
        self.trainer: train.Trainer | None = None
        self.store: CheckpointStore | None = None
        self.started = time.monotonic()

    def run(self) -> int:
        stopper = Stopper(self.env.deadline, max_steps=self.env.segment_max_steps)
        with stopper.handling_sigterm():
            return self._run(stopper)

    def _run(self, stopper: Stopper) -> int:
        try:
            device = self.start()
            checked = self.preflight()
            with self.phase("loading"):
                splits = self.load_data()
                loaded = self.load_model(device, stopper, splits)
            stop_ids = model.end_of_turn_ids(loaded.model, loaded.processor, checked.end)
            evaluator = Evaluator(
                loaded, self.spec, splits, stop_ids, stopper.check, self.on_metrics
            )
            self.baseline_eval(evaluator, stopper)
            self.train()
            self.final_eval(evaluator)
            destinations = self.save(loaded)
            return self.report(destinations)
        except SegmentEnd as stop:
            return self._segment_done(stop)
        except Exception as exc:
            return self._failed(exc)

    # ---- the steps --------------------------------------------------------------------------

    def preflight(self) -> preflight.Checked:
        """Everything that needs no weights, in seconds, before anything is paid for."""
        checked = preflight.check(self.spec)
        log(f"preflight: {checked.summary()}")
        return checked

    def start(self) -> Any:
        spec, env = self.spec, self.env
        device = model.pick_device(self.device_choice)
        self.results.environment = environment(device)
        train.seed_everything(spec.seed)
        self.store = CheckpointStore(
            env.checkpoint_uri or self.output_dir / "checkpoints",
            work_dir=self.output_dir / ".work",
        )
        self.restored = self.store.latest(spec_digest(spec))
        resumed_from = self.restored.state.step if self.restored else None
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
        if self.restored:
            log(f"resuming from {self.restored.uri} (step {resumed_from})")
        if warning := model.cpu_hub_warning(spec.model_id, device):
            log(f"warning: {warning}")
        return device

    def load_data(self) -> Any:
        spec = self.spec
        splits = data.load_splits(spec.data, spec.train_size, spec.eval_size, spec.seed)
        log(
            f"data: {splits.source}, {len(splits.labels)} classes, "
            f"{len(splits.train)} training and {len(splits.eval)} evaluation samples"
        )
        # A size larger than the data set is not an error (the whole split is used), but it
        # must not pass unnoticed: the log says so and results.json records both.
        shortfalls = splits.shortfalls()
        for line in shortfalls:
            log(f"warning: {line}")
        self.results.data = {
            "source": splits.source,
            "labels": splits.labels,
            **splits.sizes(),
            "warnings": shortfalls,
        }
        return splits

    def load_model(self, device: Any, stopper: Stopper, splits: Any) -> model.Loaded:
        spec = self.spec
        assert self.store is not None
        step_plan = plan_run(spec, device, splits.labels, splits.train[0])
        log(f"step plan: {step_plan.summary()}")
        self.results.step_plan = step_plan.as_dict()
        loaded = model.load(spec, device, step_plan)
        self.trainer = train.Trainer(
            loaded,
            spec,
            splits.labels,
            splits.train,
            self.store,
            stopper,
            on_progress=self.on_progress,
            on_checkpoint=self.on_checkpoint,
        )
        if self.restored:
            self.trainer.restore(self.restored)
        log(
            f"model: {spec.model_id} on {device}, {loaded.weights}, {loaded.kernels} kernels"
            f", {loaded.trainable_params:,} of {loaded.total_params:,} parameters trained"
        )
        keys = ("weights", "kernels", "trainable_params", "total_params")
        self.results.model = {"model_id": spec.model_id, "quantized_4bit": loaded.quantized}
        self.results.model.update({k: getattr(loaded, k) for k in keys})
        return loaded

    def baseline_eval(self, evaluator: Evaluator, stopper: Stopper) -> None:
        assert self.store is not None
        digest = spec_digest(self.spec)
        with self.phase("baseline_eval"):
            recorded = self.store.load_baseline(digest)
            if recorded is not None:
                self.results.baseline = ev.Metrics.model_validate(recorded)
                log("baseline: already evaluated by an earlier segment")
                return
            self.results.baseline = evaluator("baseline")
            self.store.save_baseline(digest, self.results.baseline.model_dump(mode="json"))
            stopper.progressed = True

    def train(self) -> None:
        assert self.trainer is not None
        plan = self.trainer.loaded.plan
        with self.phase("training", plan.summary() if plan else ""):
            self.trainer.train()
            self.record_training()

    def final_eval(self, evaluator: Evaluator) -> None:
        with self.phase("final_eval"):
            self.results.final = evaluator("final")

    def save(self, loaded: model.Loaded) -> list[str]:
        with self.phase("uploading"):
            return self.save_and_upload_adapter(loaded)

    def report(self, destinations: list[str]) -> int:
        assert self.trainer is not None
        results = self.results
        results.outcome = "completed"
        results_uri = self.write_results(destinations)
        for kind in ("adapter", "processor", "merged", "results"):
            if kind not in results.artifacts:
                continue
            self.events.emit("artifact", ev.Artifact(kind=kind, uri=results.artifacts[kind]))
        self.events.emit(
            "completed", ev.Completed(step=self.trainer.state.step, results_uri=results_uri)
        )
        log(f"completed in {time.monotonic() - self.started:.0f} s; results: {results_uri}")
        return 0

    # ---- early endings ----------------------------------------------------------------------

    def _segment_done(self, stop: SegmentEnd) -> int:
        log(f"stopping this segment: {stop.reason}")
        # Without a trainer (stopped while loading) there is nothing to save yet: the next
        # segment starts from the beginning.
        store_uri = self.store.uri if self.store else ""
        checkpoint_uri = self.trainer.save_checkpoint() if self.trainer else store_uri
        self.record_training()
        self.results.outcome = "segment_done"
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

    def _failed(self, exc: Exception) -> int:
        results = self.results
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
    def phase(self, name: ev.Phase, detail: str = "") -> Iterator[None]:
        self.events.emit("phase", ev.PhaseChange(phase=name, detail=detail[: ev.MAX_TEXT]))
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.results.add_time(name, time.monotonic() - t0)

    def on_metrics(self, stage: str, metrics: ev.Metrics) -> None:
        self.events.emit("evaluation", ev.Evaluation(stage=stage, **metrics.model_dump()))

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
        trees = {"adapter": adapter_dir}
        if self.spec.merge:
            log("merging the adapter into the base model (bf16)")
            trees["merged"] = write_merged(
                self.spec.model_id, adapter_dir, loaded.processor, self.output_dir / "merged"
            )
            self.results.artifacts["merged"] = f"{primary}/merged"
        for dest in destinations:
            location = open_location(dest)
            for name, tree in trees.items():
                log(f"uploading the {name} model to {location.uri}/{name}")
                upload_tree(tree, location.child(name))
        return destinations

    def write_results(self, destinations: list[str]) -> str:
        """Write results.json, then upload it, last: once it is there, the outputs are whole."""
        self.results.timings["total"] = round(time.monotonic() - self.started, 3)
        if torch.cuda.is_available():
            self.results.peak_gpu_memory_gb = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        self.results.write(self.results_file)
        for dest in destinations:
            open_location(dest).upload(self.results_file, "results.json")
        return self.results.artifacts.get("results", str(self.results_file))


def _same_dir(uri: str, local: Path) -> bool:
    return "://" not in uri and Path(uri).resolve() == local.resolve()
