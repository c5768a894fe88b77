"""`python -m trainer` end to end on CPU: the tiny Gemma 3 learns the digits; segments stop at
their deadline or on SIGTERM with a verified checkpoint, and the next one resumes from it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from trainer.checkpoints import MANIFEST, CheckpointStore, dir_name, sha256_file
from trainer.cli import main
from trainer.contract.events import Event, parse_event

REPO = Path(__file__).resolve().parents[2]
CHANCE = 0.1  # ten digits

# The recipe of /work/shared/notes/tiny-gemma3.md: 352 optimizer steps of batch 16 (4 epochs of
# 1,400 digits), about 35 s of training on 2 idle cores; final accuracy 0.81-0.88 over 3 seeds.
LEARN_FLAGS = shlex.split(
    "--dataset digits --train-size 1400 --eval-size 100 --num-epochs 4 --learning-rate 3e-3"
    " --batch-size 16 --gradient-accumulation-steps 1 --eval-batch-size 50 --max-new-tokens 4"
    " --save-steps 150 --seed 1"
)
# A short run for the stop-and-resume tests: 20 optimizer steps, a progress event after each.
SHORT_FLAGS = shlex.split(
    "--dataset digits --train-size 160 --eval-size 20 --num-epochs 2 --learning-rate 5e-3"
    " --batch-size 8 --gradient-accumulation-steps 2 --eval-batch-size 20 --max-new-tokens 3"
    " --save-steps 100"
)
SHORT_TOTAL_STEPS = 20
PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d step \d+/\d+, ")


def _events(path: Path) -> list[Event]:
    """The events a run wrote to its `--events-file` (stdout has readable lines instead)."""
    if not path.exists():
        return []
    return [parse_event(line) for line in path.read_text().splitlines()]


def _of(events: list[Event], kind: str) -> list[Any]:
    return [e.data for e in events if e.type == kind]


def _trainer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEPLANE_")}
    env.update(extra)
    return env


def _assert_verified_checkpoint(uri: str, step: int) -> None:
    directory = Path(uri)
    assert directory.name == dir_name(step)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["step"] == step
    for name, meta in manifest["files"].items():
        assert sha256_file(directory / name) == meta["sha256"]
    assert "adapter_model.safetensors" in manifest["files"]
    assert "optimizer.pt" in manifest["files"]


# ---- a full run in a subprocess, as a dispatcher starts it ---------------------------------


@pytest.fixture(scope="module")
def learned(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("learn")
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--model-id",
            str(tiny_model),
            *LEARN_FLAGS,
            "--output-dir",
            str(out),
            "--events-file",
            str(out / "events.jsonl"),
        ],
        cwd=REPO,
        # One thread, as the demo's trainer: the reproducibility test runs it again the same way.
        env=_trainer_env(TUNEPLANE_RUN_ID="run-learn", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return {
        "proc": proc,
        "out": out,
        "seconds": time.monotonic() - started,
        "events": _events(out / "events.jsonl"),
        "results": json.loads((out / "results.json").read_text())
        if (out / "results.json").exists()
        else None,
    }


@pytest.mark.slow
def test_the_tiny_model_learns_the_digits(learned: dict[str, Any]) -> None:
    proc, results = learned["proc"], learned["results"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline, final = results["baseline"], results["final"]
    print(
        f"\ndigits: baseline {baseline['accuracy']:.2f}, final {final['accuracy']:.2f} "
        f"(macro F1 {final['macro_f1']:.2f}) in {learned['seconds']:.0f} s"
    )
    # A random model names a digit at chance or less (often a constant non-label answer).
    assert baseline["accuracy"] <= 2.5 * CHANCE
    assert final["accuracy"] >= 3 * CHANCE
    assert final["accuracy"] > baseline["accuracy"] + 0.2
    assert final["macro_f1"] >= 0.2
    history = results["training"]["history"]
    first = sum(h["loss"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert last < first  # falls; its absolute value means little (notes, trap 8)


@pytest.mark.slow
def test_results_json_holds_what_the_gates_need(learned: dict[str, Any]) -> None:
    results, out = learned["results"], learned["out"]
    assert results["outcome"] == "completed" and results["run_id"] == "run-learn"
    assert results["spec"]["train_size"] == 1400 and results["spec"]["learning_rate"] == 3e-3
    env = results["environment"]
    assert env["device"] == "cpu" and env["packages"]["torch"] and env["packages"]["transformers"]
    assert set(results["timings"]) >= {
        "loading", "baseline_eval", "training", "final_eval", "uploading", "total",
    }  # fmt: skip
    assert results["throughput"]["train_samples_per_second"] > 0
    assert results["throughput"]["eval_samples_per_second"] > 0
    assert results["data"]["train_samples"] == 1400 and results["data"]["eval_samples"] == 100
    # On the CPU nothing is fused (trainer/kernels.py); the record says which kernels ran.
    assert results["model"]["kernels"] == "plain" and results["model"]["weights"] == "fp32"
    for stage in ("baseline", "final"):
        predictions = results[stage]["predictions"]
        assert len(predictions) == 100
        assert {p["sample_id"] for p in predictions} == {
            p["sample_id"] for p in results["baseline"]["predictions"]
        }
        assert all({"true_label", "predicted_label", "raw_answer"} <= set(p) for p in predictions)
        assert len(results[stage]["confusion_matrix"][0]) == 11  # ten digits + "no label"
    assert results["training"]["step"] == results["training"]["total_steps"] == 352
    # The adapter with the processor beside it, loadable for inference.
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    assert (adapter / "processor_config.json").exists()
    assert (adapter / "tokenizer.json").exists()
    assert results["artifacts"]["adapter"] == str(out / "adapter")


@pytest.mark.slow
def test_events_tell_the_whole_story_in_order(learned: dict[str, Any]) -> None:
    events = learned["events"]
    assert [e.seq for e in events] == list(range(len(events)))
    assert {e.run_id for e in events} == {"run-learn"}
    assert events[0].type == "started" and events[-1].type == "completed"
    phases = [p.phase for p in _of(events, "phase")]
    assert phases == ["loading", "baseline_eval", "training", "final_eval", "uploading"]
    assert [e.stage for e in _of(events, "evaluation")] == ["baseline", "final"]
    progress = _of(events, "progress")
    assert len(progress) >= 10
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert progress[-1].step == progress[-1].total_steps == 352
    assert all(p.loss is not None and p.learning_rate is not None for p in progress)
    checkpoints = _of(events, "checkpoint")
    assert [c.step for c in checkpoints] == [150, 300, 352]
    _assert_verified_checkpoint(checkpoints[-1].uri, 352)
    assert {a.kind for a in _of(events, "artifact")} == {"adapter", "processor", "results"}
    assert _of(events, "completed")[0].step == 352
    # Only the newest two checkpoints are kept.
    names = sorted(p.name for p in (learned["out"] / "checkpoints").iterdir())
    assert names == ["baseline.json", dir_name(300), dir_name(352)]


@pytest.mark.slow
def test_by_hand_stdout_is_readable_and_the_log_is_clean(learned: dict[str, Any]) -> None:
    out, err = learned["proc"].stdout, learned["proc"].stderr
    assert not [line for line in out.splitlines() if not re.match(r"\d\d:\d\d:\d\d ", line)]
    lines = [line[9:] for line in out.splitlines()]
    assert lines[0].startswith("started on cpu")
    assert [x for x in lines if x.startswith("phase: ")] == [
        "phase: loading", "phase: baseline_eval", "phase: training", "phase: final_eval",
        "phase: uploading",
    ]  # fmt: skip
    assert any(re.fullmatch(r"step 352/352, epoch 4\.00, loss [\d.]+, .*", x) for x in lines)
    assert any(x.startswith("final: accuracy ") for x in lines)
    assert lines[-1].startswith("completed at step 352; results: ")
    # Noise from the libraries that says nothing about the run (trainer/quiet.py).
    assert "kernels-community" not in err and "Warning" not in err, err


@pytest.mark.slow
def test_the_same_seed_gives_bit_identical_predictions_and_metrics(
    learned: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    """README's figures are reproducible: a second run of the same spec on CPU (same versions,
    same thread count) predicts exactly what the first did, sample by sample."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--model-id", str(tiny_model), *LEARN_FLAGS,
         "--output-dir", str(tmp_path)],
        cwd=REPO, env=_trainer_env(TUNEPLANE_RUN_ID="run-learn", OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = learned["results"], json.loads((tmp_path / "results.json").read_text())
    for stage in ("baseline", "final"):
        a, b = first[stage], second[stage]
        assert [(p["sample_id"], p["raw_answer"]) for p in a["predictions"]] == [
            (p["sample_id"], p["raw_answer"]) for p in b["predictions"]
        ]
        for key in ("accuracy", "macro_f1", "unknown_rate", "per_class", "confusion_matrix"):
            assert a[key] == b[key], (stage, key)
    assert first["training"]["history"] == second["training"]["history"]


# ---- stopping and resuming ------------------------------------------------------------------


def _run_in_process(
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    on_line: Callable[[str], None] | None = None,
    stderr: list[str] | None = None,
    **env: str,
) -> tuple[int, list[Event]]:
    for key in [k for k in os.environ if k.startswith("TUNEPLANE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    events_file = Path(tempfile.mkdtemp(prefix="events-")) / "events.jsonl"
    real_stdout = sys.stdout
    if on_line is not None:
        # Put back by hand right after: a monkeypatch undo would run after capsys has closed
        # the stream it wraps.
        sys.stdout = _Watcher(real_stdout, on_line)
    try:
        code = main([*argv, "--events-file", str(events_file)])
    finally:
        sys.stdout = real_stdout
    captured = capsys.readouterr()
    if stderr is not None:
        stderr.append(captured.err)
    return code, _events(events_file)


class _Watcher:
    """stdout that also shows each line to a callback (the console reporter writes a line per
    event there, e.g. `12:00:01 step 1/20, epoch 0.10, loss ...`)."""

    def __init__(self, stream: Any, on_line: Callable[[str], None]) -> None:
        self.stream, self.on_line = stream, on_line

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.on_line(line)
        return int(self.stream.write(text))

    def flush(self) -> None:
        self.stream.flush()


def _sigterm_at_first_progress(line: str) -> None:
    if PROGRESS_LINE.search(line) and not getattr(_sigterm_at_first_progress, "sent", False):
        _sigterm_at_first_progress.sent = True  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_saves_and_the_next_segment_resumes_the_step_count(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--model-id", str(tiny_model), *SHORT_FLAGS, "--output-dir", str(tmp_path)]
    ckpts = tmp_path / "ckpts"
    _sigterm_at_first_progress.sent = False  # type: ignore[attr-defined]
    code, first = _run_in_process(
        argv,
        monkeypatch,
        capsys,
        on_line=_sigterm_at_first_progress,
        TUNEPLANE_RUN_ID="run-seg",
        TUNEPLANE_CHECKPOINT_URI=str(ckpts),
    )
    # Cloud Run sends SIGTERM before it kills a task: the segment saves and ends cleanly.
    assert code == 0
    done = _of(first, "segment_done")
    assert len(done) == 1 and first[-1].type == "segment_done"
    stopped_at = done[0].step
    # The signal arrives during step 1's progress event, so the segment stops at step 1 on any
    # machine (within step 2's first micro-batch, which is abandoned, or at step 1's end).
    assert stopped_at == 1
    _assert_verified_checkpoint(done[0].checkpoint_uri, stopped_at)
    assert Path(done[0].checkpoint_uri).parent == ckpts
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["outcome"] == "segment_done" and results["final"] is None
    assert [e.stage for e in _of(first, "evaluation")] == ["baseline"]

    # A newer checkpoint whose save never finished (no manifest) must be passed over.
    torn = ckpts / dir_name(stopped_at + 5)
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half")

    code, second = _run_in_process(
        argv,
        monkeypatch,
        capsys,
        TUNEPLANE_RUN_ID="run-seg",
        TUNEPLANE_CHECKPOINT_URI=str(ckpts),
        TUNEPLANE_SEGMENT="1",
    )
    assert code == 0, _of(second, "failed")
    assert second[0].type == "started" and second[0].data.resumed_from_step == stopped_at
    assert second[0].seq == 1_000_000  # segment 1 numbers its events after segment 0's
    # The baseline was recorded by the first segment: not evaluated again.
    assert [e.stage for e in _of(second, "evaluation")] == ["final"]
    steps = [p.step for p in _of(second, "progress")]
    assert steps[0] == stopped_at + 1 and steps[-1] == SHORT_TOTAL_STEPS
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["outcome"] == "completed"
    assert results["baseline"] is not None
    assert [h["step"] for h in results["training"]["history"]] == list(
        range(stopped_at + 1, SHORT_TOTAL_STEPS + 1)
    )
    assert not torn.exists() or not (torn / MANIFEST).exists()
    restored = CheckpointStore(ckpts, tmp_path / "w").latest(results_digest(results))
    assert restored is not None and restored.state.step == SHORT_TOTAL_STEPS
    assert restored.state.training_done


# Mid-step: a step of 8 micro-batches of 2 images, 4 steps over an image folder of 2 classes.
# The images are files, so the test sees each micro-batch being built (an audit hook on open()).
MIDSTEP_ACCUMULATION = 8
MIDSTEP_BATCH = 2
MIDSTEP_SIGNAL_AT = 3  # SIGTERM while step 2's 3rd micro-batch is being built
MIDSTEP_FLAGS = shlex.split(
    f"--train-size 64 --eval-size 4 --num-epochs 1 --learning-rate 5e-3 --batch-size "
    f"{MIDSTEP_BATCH} --gradient-accumulation-steps {MIDSTEP_ACCUMULATION} --eval-batch-size 4"
    " --max-new-tokens 2 --save-steps 100 --lora-dropout 0.1 --no-gradient-checkpointing"
)


class _SigtermOnImageOpen:
    """After `arm()`, sends SIGTERM when the trainer opens its `n`-th image file under `root`.
    Audit hooks cannot be removed, so a disarmed one does nothing."""

    def __init__(self, root: Path) -> None:
        self.root, self.armed, self.opened, self.at = str(root), False, 0, 0
        sys.addaudithook(self._hook)

    def arm(self, at: int) -> None:
        self.armed, self.opened, self.at = True, 0, at

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or event != "open" or not str(args[0]).startswith(self.root):
            return
        self.opened += 1
        if self.opened == self.at:
            self.armed = False
            os.kill(os.getpid(), signal.SIGTERM)


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for label, shade in (("zero", 30), ("one", 220)):
        (root / label).mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (32, 32), (shade, (7 * i) % 256, 90)).save(root / label / f"{i}.png")
    return root


@pytest.mark.slow
def test_sigterm_mid_step_abandons_the_step_and_the_next_segment_trains_it_once(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _image_folder(tmp_path / "images")
    argv = ["--model-id", str(tiny_model), "--dataset", f"imagefolder:{folder}", *MIDSTEP_FLAGS]
    trap = _SigtermOnImageOpen(folder)

    def arm_after_first_step(line: str) -> None:
        if " step 1/" in line:
            # Step 2's micro-batches open 2 images each; this one opens micro-batch 3's first.
            trap.arm((MIDSTEP_SIGNAL_AT - 1) * MIDSTEP_BATCH + 1)

    ckpts, err = tmp_path / "ckpts", []
    try:
        code, first = _run_in_process(
            [*argv, "--output-dir", str(tmp_path / "seg")],
            monkeypatch,
            capsys,
            on_line=arm_after_first_step,
            stderr=err,
            TUNEPLANE_RUN_ID="run-mid",
            TUNEPLANE_CHECKPOINT_URI=str(ckpts),
        )
    finally:
        trap.armed = False
    assert code == 0, _of(first, "failed")
    # Stopped inside step 2, right after the micro-batch in flight, not at the step's end.
    assert (
        f"received SIGTERM during step 2 ({MIDSTEP_SIGNAL_AT} of its {MIDSTEP_ACCUMULATION} "
        "micro-batches done, discarded)" in err[0]
    ), err[0][-2000:]
    assert [p.step for p in _of(first, "progress")] == [1]
    done = _of(first, "segment_done")
    assert len(done) == 1 and done[0].step == 1
    # The checkpoint is step 1's: its data position and sample count are one whole step's.
    _assert_verified_checkpoint(done[0].checkpoint_uri, 1)
    state = json.loads((Path(done[0].checkpoint_uri) / "state.json").read_text())
    assert state["micro_batches"] == MIDSTEP_ACCUMULATION
    assert state["train_samples"] == MIDSTEP_ACCUMULATION * MIDSTEP_BATCH

    code, second = _run_in_process(
        [*argv, "--output-dir", str(tmp_path / "seg")],
        monkeypatch,
        capsys,
        TUNEPLANE_RUN_ID="run-mid",
        TUNEPLANE_CHECKPOINT_URI=str(ckpts),
        TUNEPLANE_SEGMENT="1",
    )
    assert code == 0, _of(second, "failed")
    assert second[0].data.resumed_from_step == 1
    resumed = json.loads((tmp_path / "seg" / "results.json").read_text())
    history = resumed["training"]["history"]
    assert [h["step"] for h in history] == [2, 3, 4]
    # Every training image once, over both segments: the abandoned micro-batches do not count.
    assert resumed["training"]["samples"] == 64

    # The same run without a stop computes the same steps: the resumed segment started at
    # step 2's first micro-batch with the generators (LoRA dropout) as they were there.
    code, _ = _run_in_process(
        [*argv, "--output-dir", str(tmp_path / "whole")],
        monkeypatch,
        capsys,
        TUNEPLANE_RUN_ID="run-whole",
        TUNEPLANE_CHECKPOINT_URI=str(tmp_path / "whole-ckpts"),
    )
    assert code == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["training"]["history"]
    assert [h["step"] for h in whole] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in whole[1:]], rel=1e-5)


def results_digest(results: dict[str, Any]) -> str:
    from trainer.checkpoints import spec_digest
    from trainer.contract.spec import RunSpec

    return spec_digest(RunSpec.model_validate(results["spec"]))


@pytest.mark.slow
def test_a_step_limit_ends_each_segment_at_that_step_and_the_last_one_completes(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """TUNEPLANE_SEGMENT_MAX_STEPS (the tests' segment trigger): 20 steps at 10 a segment are
    exactly two segments on any machine. The second ends its training on the limit and still
    evaluates and completes: the limit is asked between steps only."""
    argv = ["--model-id", str(tiny_model), *SHORT_FLAGS, "--output-dir", str(tmp_path)]
    env = {
        "TUNEPLANE_RUN_ID": "run-steps",
        "TUNEPLANE_CHECKPOINT_URI": str(tmp_path / "ckpts"),
        "TUNEPLANE_SEGMENT_MAX_STEPS": "10",
        # A deadline that never comes: the limit, not the clock, ends the first segment.
        "TUNEPLANE_DEADLINE": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
    }
    err: list[str] = []
    code, first = _run_in_process(argv, monkeypatch, capsys, stderr=err, **env)
    assert code == 0, _of(first, "failed")
    assert "stopping this segment: took its 10 optimizer steps" in err[0], err[0][-2000:]
    assert [p.step for p in _of(first, "progress")] == list(range(1, 11))
    (done,) = _of(first, "segment_done")
    assert done.step == 10 and first[-1].type == "segment_done"
    _assert_verified_checkpoint(done.checkpoint_uri, 10)

    code, second = _run_in_process(argv, monkeypatch, capsys, TUNEPLANE_SEGMENT="1", **env)
    assert code == 0, _of(second, "failed")
    assert second[0].data.resumed_from_step == 10
    assert [p.step for p in _of(second, "progress")] == list(range(11, SHORT_TOTAL_STEPS + 1))
    assert not _of(second, "segment_done")
    assert [e.stage for e in _of(second, "evaluation")] == ["final"]
    assert second[-1].type == "completed" and second[-1].data.step == SHORT_TOTAL_STEPS


@pytest.mark.slow
def test_a_segment_past_its_deadline_still_advances_then_stops_with_a_checkpoint(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The deadline path, with a deadline already gone when the segment starts (loading ate
    the budget), so that where it stops does not depend on the machine's speed: each segment
    does one unit of work that survives it (segment 0 the baseline, segment 1 a step), saves,
    and ends with segment_done; the margin arithmetic is tests/trainer/test_deadline.py's."""
    argv = ["--model-id", str(tiny_model), *SHORT_FLAGS, "--output-dir", str(tmp_path)]
    env = {
        "TUNEPLANE_RUN_ID": "run-deadline",
        "TUNEPLANE_CHECKPOINT_URI": str(tmp_path / "ckpts"),
        "TUNEPLANE_DEADLINE": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
    }
    for segment, (evaluated, stopped_at) in enumerate([(["baseline"], 0), ([], 1)]):
        err: list[str] = []
        code, events = _run_in_process(
            argv, monkeypatch, capsys, stderr=err, TUNEPLANE_SEGMENT=str(segment), **env
        )
        assert code == 0, _of(events, "failed")
        assert "stopping this segment: deadline" in err[0] and "is near" in err[0], err[0][-2000:]
        assert [e.stage for e in _of(events, "evaluation")] == evaluated
        (done,) = _of(events, "segment_done")
        assert done.step == stopped_at and events[-1].type == "segment_done"
        _assert_verified_checkpoint(done.checkpoint_uri, stopped_at)
        results = json.loads((tmp_path / "results.json").read_text())
        assert results["outcome"] == "segment_done"


def test_an_invalid_spec_exits_2_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("TUNEPLANE_")]:
        monkeypatch.delenv(key)
    code = main(["--model-id", "m", "--dataset", "digits", "--lora-r", "0", "--output-dir",
                 str(tmp_path), "--events-file", str(tmp_path / "ev.jsonl")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "lora_r: must be between 1 and 1024 (got '0')" in captured.err
    assert "failed: invalid run spec: lora_r" in captured.out
    failed = _of(_events(tmp_path / "ev.jsonl"), "failed")
    assert len(failed) == 1 and "lora_r" in failed[0].error


def test_a_failure_is_reported_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err: list[str] = []
    code, events = _run_in_process(
        [
            "--model-id",
            str(tmp_path / "no-such-model"),
            "--dataset",
            "digits",
            "--train-size",
            "4",
            "--eval-size",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        monkeypatch,
        capsys,
        stderr=err,
        TUNEPLANE_RUN_ID="run-fail",
    )
    assert code == 1
    # Said before the model is looked for: on a CPU, an id that is no directory means the Hub.
    warning, failure = err[0].index("is not a local directory"), err[0].index("failed: ")
    assert warning < failure and "python -m trainer.tiny DIR" in err[0]
    assert events[0].type == "started" and events[-1].type == "failed"
    failed = events[-1].data
    assert "no-such-model" in failed.error and "Traceback" in failed.traceback_tail
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["outcome"] == "failed" and "no-such-model" in results["error"]


def test_sizes_larger_than_the_data_set_are_warned_about_and_recorded(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    from trainer.data import load_digits

    pools = load_digits()
    n_train, n_test = len(pools.train), len(pools.test)
    err: list[str] = []
    # A checkpoint without its weights: it passes the preflight, then the run fails loading the
    # model, after the data are chosen, which is enough here.
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model, weightless)
    (weightless / "model.safetensors").unlink()
    code, _ = _run_in_process(
        ["--model-id", str(weightless), "--dataset", "digits",
         "--train-size", "5000", "--eval-size", "40", "--output-dir", str(tmp_path / "out")],
        monkeypatch,
        capsys,
        stderr=err,
        TUNEPLANE_RUN_ID="run-sizes",
    )  # fmt: skip
    assert code == 1
    assert (
        f"warning: 5000 training samples were asked for, but the train split of scikit-learn "
        f"digits holds only {n_train}: using all {n_train}" in err[0]
    )
    assert "evaluation samples were asked for" not in err[0]
    data = json.loads((tmp_path / "out" / "results.json").read_text())["data"]
    assert data["train_size_requested"] == 5000 and data["train_samples"] == n_train
    assert data["eval_size_requested"] == data["eval_samples"] == 40
    assert n_test >= 40
    assert len(data["warnings"]) == 1 and data["warnings"][0].startswith("5000 training samples")


def test_device_cuda_without_a_gpu_fails_fast_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    err: list[str] = []
    code, events = _run_in_process(
        ["--model-id", str(tmp_path / "no-such-model"), "--dataset", "digits", "--device",
         "cuda", "--output-dir", str(tmp_path / "out")],
        monkeypatch,
        capsys,
        stderr=err,
        TUNEPLANE_RUN_ID="run-cuda",
    )  # fmt: skip
    assert code == 1
    # Before anything else (no `started`, no data, no model): a dispatcher that asks for a GPU
    # must not get a silent fp32 run on the CPU instead.
    assert [e.type for e in events] == ["failed"]
    error = events[0].data.error
    assert "--device cuda was asked for, but no CUDA device is visible" in error
    assert f"torch {torch.__version__}" in error and "--device auto or cpu" in error
    # Fast because nothing was loaded (shown by the log, not by a stopwatch): no data, no phase.
    assert "data:" not in err[0] and "phase:" not in err[0], err[0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["outcome"] == "failed" and "no CUDA device" in results["error"]


def test_a_reported_failure_on_cloud_run_exits_0_so_cloud_run_does_not_retry_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A non-zero exit makes Cloud Run retry the task (max_retries times, each up to the task
    # timeout of GPU); a failure the trainer reported is final, and tuneplane decides.
    code, events = _run_in_process(
        ["--model-id", str(tmp_path / "no-such-model"), "--dataset", "digits",
         "--train-size", "4", "--eval-size", "2", "--output-dir", str(tmp_path / "out")],
        monkeypatch,
        capsys,
        TUNEPLANE_RUN_ID="run-fail",
        CLOUD_RUN_EXECUTION="tuneplane-trainer-l4-abcde",
        CLOUD_RUN_TASK_ATTEMPT="0",
    )  # fmt: skip
    assert code == 0
    assert events[-1].type == "failed" and "no-such-model" in events[-1].data.error
