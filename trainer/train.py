"""The training loop: AdamW, linear warm-up and decay, gradient accumulation, bf16 autocast and
gradient checkpointing on CUDA, checkpoints every `save_steps` optimizer steps.

A plain PyTorch loop rather than TRL's SFTTrainer, on purpose. What this trainer must get exactly
right is stopping and resuming: a checkpoint at a deadline or on SIGTERM, written in a known
order with the manifest last, to Cloud Storage, holding the position in the data order so that
the next segment continues with the very next micro-batch and the same step count. SFTTrainer's
checkpoints are local directories resumed by name, its callbacks cannot save at an arbitrary
point outside `save_steps`, and its collator and packing logic would have to be switched off
piece by piece to keep our answer-only loss mask. The loop itself is short; the speed is the
model's forward and backward passes, the same under either.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoints import CheckpointStore, Restored, TrainState, spec_digest
from trainer.collator import TrainCollator
from trainer.contract.events import Progress
from trainer.contract.spec import RunSpec
from trainer.data import Sample
from trainer.deadline import SegmentEnd, Stopper
from trainer.device import autocast, to_device
from trainer.features import FeatureCache
from trainer.loss import supports_answer_logits, training_loss
from trainer.model import Loaded

WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
ADAPTER_FILE = "adapter_model.safetensors"
SAMPLE_IDS = "sample_ids"  # beside a collated batch: which samples it holds (feature cache)


def plan(
    num_samples: int, spec: RunSpec, micro: int | None = None, accum: int | None = None
) -> tuple[int, int]:
    """(micro-batches per epoch, total optimizer steps) for a training set of `num_samples`,
    in micro-batches of `micro` (the step plan's; the spec's batch size by default)."""
    micro, accum = micro or spec.batch_size, accum or spec.gradient_accumulation_steps
    per_epoch = math.ceil(num_samples / micro)
    total_micro = max(1, math.ceil(per_epoch * spec.num_epochs))
    return per_epoch, math.ceil(total_micro / accum)


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_samples))
    # A string seed hashes the same way in every process (unlike hash() of a tuple).
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


class Trainer:
    def __init__(
        self,
        loaded: Loaded,
        spec: RunSpec,
        labels: Sequence[str],
        samples: Sequence[Sample],
        store: CheckpointStore,
        stopper: Stopper,
        on_progress: Callable[[Progress], None],
        on_checkpoint: Callable[[int, str], None],
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.spec = spec
        self.samples = list(samples)
        self.collator = TrainCollator(loaded.processor, labels, spec.max_length)
        self.store = store
        self.stopper = stopper
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint
        # The step plan's split of the effective batch (trainer.plan), else the spec's.
        step_plan = getattr(loaded, "plan", None)
        self.micro = step_plan.micro_batch if step_plan else spec.batch_size
        self.accum = step_plan.accumulation if step_plan else spec.gradient_accumulation_steps
        self.answer_only = supports_answer_logits(self.model)
        # A frozen tower's image features, kept from the first epoch for the next ones.
        self.features = FeatureCache.for_model(self.model) if spec.num_epochs > 1 else None
        self.per_epoch, self.total_steps = plan(len(self.samples), spec, self.micro, self.accum)
        self.total_micro = max(1, math.ceil(self.per_epoch * spec.num_epochs))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
        warmup = math.ceil(WARMUP_FRACTION * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _linear_warmup_decay(warmup, self.total_steps)
        )
        self.state = TrainState(
            total_steps=self.total_steps, spec_digest=spec_digest(spec), micro_batch=self.micro
        )
        self.history: list[dict[str, float]] = []  # (step, loss, lr) for results.json
        self.last_checkpoint: tuple[int, str] | None = None

    # ---- checkpoints ------------------------------------------------------------------------

    def restore(self, restored: Restored) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        d = restored.directory
        weights = load_file(str(d / ADAPTER_FILE), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {restored.uri} does not fit this model's adapter")
        # Our own files, just verified against the manifest's sha256: safe to unpickle.
        self.optimizer.load_state_dict(torch.load(d / OPTIMIZER_FILE, weights_only=False))
        self.scheduler.load_state_dict(torch.load(d / SCHEDULER_FILE, weights_only=False))
        _set_rng_state(torch.load(d / RNG_FILE, weights_only=False))
        self.state = restored.state
        if self.state.micro_batch and self.state.micro_batch != self.micro:
            # Positions count micro-batches of the checkpoint's size: keep its split.
            self.micro = self.state.micro_batch
            self.accum = self.spec.effective_batch_size // self.micro
            self.per_epoch, self.total_steps = plan(
                len(self.samples), self.spec, self.micro, self.accum
            )
            self.total_micro = max(1, math.ceil(self.per_epoch * self.spec.num_epochs))
        self.state.micro_batch = self.micro
        if self.state.total_steps != self.total_steps:
            raise RuntimeError(
                f"checkpoint {restored.uri} was made for {self.state.total_steps} steps, this "
                f"run plans {self.total_steps}: the spec or the data changed between segments"
            )
        self.last_checkpoint = (self.state.step, restored.uri)

    def save_checkpoint(self) -> str:
        last = self.last_checkpoint
        # Saved at this step already; saved again only to record that training is done.
        if last and last[0] == self.state.step and not self.state.training_done:
            return last[1]
        uri = self.store.save(self.state, self._write_files)
        self.stopper.save_seconds = self.store.last_save_seconds
        self.last_checkpoint = (self.state.step, uri)
        self.on_checkpoint(self.state.step, uri)
        return uri

    def _write_files(self, directory: Path) -> None:
        # peft saves the LoRA weights and the `modules_to_save` (the projector) together.
        self.model.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)
        torch.save(_rng_state(), directory / RNG_FILE)

    # ---- the loop ---------------------------------------------------------------------------

    def _micro_batches(self, start: int) -> Iterator[list[Sample]]:
        order: list[int] = []
        order_epoch = -1
        for m in range(start, self.total_micro):
            epoch, pos = divmod(m, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(self.samples), self.spec.seed, epoch), epoch
            idx = order[pos * self.micro : (pos + 1) * self.micro]
            yield [self.samples[i] for i in idx]

    def _batches(self, start: int) -> Generator[dict[str, Any], None, None]:
        """Collated micro-batches; on CUDA the next one is prepared in a thread while the GPU
        works on the current one (image decoding and resizing are CPU work)."""
        source = self._micro_batches(start)
        if self.device.type != "cuda":
            for chunk in source:
                yield self._collate(chunk)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[Any] | None = None
            for chunk in source:
                nxt = pool.submit(self._collate, chunk)
                if pending is not None:
                    yield pending.result()
                pending = nxt
            if pending is not None:
                yield pending.result()

    def _collate(self, chunk: list[Sample]) -> dict[str, Any]:
        return {**self.collator(chunk), SAMPLE_IDS: [s.sample_id for s in chunk]}

    def train(self) -> TrainState:
        """Train until the planned steps are done; raises SegmentEnd when the segment must stop
        first (the caller saves: `save_checkpoint` is the same for every place that stops).

        The deadline is checked between optimizer steps, where the next step's length is known.
        SIGTERM is checked after every micro-batch as well: Cloud Run kills a task about 10 s
        after SIGTERM, and one step of a large model with a long accumulation can take longer.
        A step cut short is abandoned (`_abandon_step`), so the checkpoint is the last step's.
        """
        state = self.state
        if state.training_done or state.step >= self.total_steps:
            state.training_done = True
            return state
        self.model.train()
        window = _Window(boundary=self._boundary())
        batches: Generator[dict[str, Any], None, None] = self._batches(state.micro_batches)
        self.stopper.check()
        try:
            for batch in batches:
                if not self._micro_step(batch, window):
                    continue  # the step still accumulates
                if self._end_step(window):
                    break
        finally:
            batches.close()
        state.training_done = True
        self.save_checkpoint()
        return state

    def _features(self, ids: list[str]) -> Any:
        return self.features.keys(ids) if self.features else nullcontext()

    def _micro_step(self, batch: dict[str, Any], window: _Window) -> bool:
        """Forward and backward one micro-batch; True when it completes an optimizer step."""
        state, device = self.state, self.device
        # The last step of a run may hold fewer micro-batches than the others.
        step_end = min((state.step + 1) * self.accum, self.total_micro)
        in_step = step_end - state.step * self.accum
        float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ids = batch.pop(SAMPLE_IDS)
        inputs = to_device(batch, device, float_dtype)
        with autocast(device), self._features(ids):
            loss = training_loss(self.model, inputs, self.answer_only)
        (loss / in_step).backward()
        window.loss += float(loss.detach())
        window.micro += 1
        n = int(inputs["input_ids"].shape[0])
        window.samples += n
        state.train_samples += n
        state.micro_batches += 1
        if state.micro_batches >= step_end:
            return True
        if self.stopper.signal_name:
            self._abandon_step(window.boundary)
            raise SegmentEnd(
                f"received {self.stopper.signal_name} during step {state.step + 1} "
                f"({window.micro} of its {in_step} micro-batches done, discarded)"
            )
        return False

    def _end_step(self, window: _Window) -> bool:
        """Apply the accumulated gradients, report, checkpoint; True when training is done.
        Raises SegmentEnd when the deadline leaves no room for another step, or the segment
        has taken its step limit (tests)."""
        state = self.state
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], MAX_GRAD_NORM
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window.boundary = self._boundary()
        self.stopper.step_taken()
        now = time.perf_counter()
        step_seconds = now - window.step_t0
        state.train_seconds += step_seconds
        window.step_t0 = now
        lr = float(self.scheduler.get_last_lr()[0])
        step_loss = window.loss / max(window.micro, 1)
        window.loss, window.micro = 0.0, 0
        self.history.append({"step": state.step, "loss": step_loss, "learning_rate": lr})
        done = state.step >= self.total_steps
        log_every = max(1, min(10, self.total_steps // 20))
        if state.step % log_every == 0 or done:
            self._report(window, step_loss, lr, now)
        if done:
            return True
        if state.step % self.spec.save_steps == 0:
            self.save_checkpoint()
            window.step_t0 = time.perf_counter()  # saving is not training time
        reason = self.stopper.should_stop_after_step(step_seconds)
        if reason:
            raise SegmentEnd(reason)
        return False

    def _report(self, window: _Window, loss: float, lr: float, now: float) -> None:
        elapsed = now - window.t0
        self.on_progress(
            Progress(
                step=self.state.step,
                total_steps=self.total_steps,
                epoch=self.state.micro_batches / self.per_epoch,
                # A diverged loss has no number to report; the api refuses NaN (contract/events.py).
                loss=loss if math.isfinite(loss) else None,
                learning_rate=lr if math.isfinite(lr) else None,
                samples_per_second=window.samples / elapsed if elapsed > 0 else None,
                gpu_memory_gb=gpu_memory_gb(),
            )
        )
        window.samples, window.t0 = 0, time.perf_counter()

    def _boundary(self) -> tuple[int, int, dict[str, Any]]:
        """What a step cut short must roll back to: the data position, the sample count and the
        random generators as they were when the last step ended (and its checkpoint would be)."""
        return self.state.micro_batches, self.state.train_samples, _rng_state()

    def _abandon_step(self, boundary: tuple[int, int, dict[str, Any]]) -> None:
        """Forget a partly accumulated step. The weights and the optimizer only change at a
        step's end, so they are still the last step's; with the data position, the sample count
        and the generators put back as well, a checkpoint now equals one taken at that step's
        end, and the next segment trains the abandoned step in full, exactly once."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.micro_batches, self.state.train_samples, rng = boundary
        _set_rng_state(rng)


@dataclass
class _Window:
    """What the loop carries between micro-batches: the step being accumulated (its loss, its
    micro-batch count, when it began, what to roll back to) and the throughput window."""

    boundary: tuple[int, int, dict[str, Any]]
    loss: float = 0.0
    micro: int = 0
    samples: int = 0
    t0: float = field(default_factory=time.perf_counter)
    step_t0: float = field(default_factory=time.perf_counter)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def gpu_memory_gb() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 1e9


def _linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
