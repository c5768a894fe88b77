"""Every family through the trainer's real code: processor, loss mask, LoRA placement, attention
over the answer, generation with the family's stop tokens, and a whole run on digits."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import data, model, preflight, prompts
from trainer.cli import main
from trainer.collator import IGNORE_INDEX, TrainCollator
from trainer.contract.spec import RunSpec
from trainer.evaluate import generate_answers


@cache
def _splits() -> data.Splits:
    return data.load_splits("digits", 4, 4, seed=0)


@cache
def _processor(path: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _image_ids(config: Any) -> set[int]:
    names = ("image_token_id", "image_token_index", "video_token_id", "boi_token_id")
    ids = {getattr(config, n, None) for n in names}
    return {i for i in ids if isinstance(i, int)}


def test_processor_loads_and_preflight_passes(family: tuple[str, Path]) -> None:
    name, path = family
    checked = preflight.check(RunSpec(model_id=str(path), dataset="digits"))
    assert checked.lora_modules == 2 * 7
    assert checked.projector, name
    assert checked.prefix_lm == name.startswith("paligemma")


def test_loss_mask_is_the_label_and_its_end(family: tuple[str, Path]) -> None:
    from transformers import AutoConfig

    name, path = family
    processor = _processor(path)
    splits = _splits()
    collate = TrainCollator(processor, splits.labels, max_length=1024)
    batch = collate(splits.train)
    tok = prompts.tokenizer_of(processor)
    loaded_cfg = AutoConfig.from_pretrained(path)
    end_ids = set(tok(collate.format.end, add_special_tokens=False).input_ids)
    for i, sample in enumerate(splits.train):
        keep = (batch["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert keep == list(range(keep[0], keep[-1] + 1)), name  # one run
        ids = batch["input_ids"][i, keep].tolist()
        assert batch["labels"][i, keep].tolist() == ids
        assert tok.decode(ids).strip() == sample.label + collate.format.end, name
        assert ids[-1] in end_ids
        assert not set(ids) & _image_ids(loaded_cfg)


def _lora_names(loaded: model.Loaded) -> list[str]:
    return [n for n, m in loaded.model.named_modules() if hasattr(m, "lora_A") and m.lora_A]


def test_lora_lands_in_the_language_model_and_the_projector_trains(
    family: tuple[str, Path],
) -> None:
    name, path = family
    cpu = torch.device("cpu")
    base = model.load(RunSpec(model_id=str(path), dataset="digits"), cpu)
    language = next(n for n, m in base.model.named_modules() if m is base.model.get_decoder())
    names = _lora_names(base)
    assert len(names) == 2 * 7 and all(n.startswith(language + ".") for n in names), name
    trainable = [n for n, p in base.model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n for n in trainable), name
    vision = model.load(RunSpec(model_id=str(path), dataset="digits", lora_vision=True), cpu)
    extra = set(_lora_names(vision)) - set(names)
    assert extra and not any(n.startswith(language + ".") for n in extra), name
    with pytest.raises(model.TargetError, match="qkv_projection"):
        spec = RunSpec(model_id=str(path), dataset="digits", lora_target_modules=["qkv_projection"])
        model.load(spec, cpu)


def test_no_answer_token_sees_itself_or_later_ones(family: tuple[str, Path]) -> None:
    """Changing an answer token changes no logit before it: the prompt never sees the answer
    (PaliGemma's prefix is bidirectional, its suffix must stay causal) and no answer position
    sees the token it predicts."""
    from transformers import AutoModelForImageTextToText

    name, path = family
    processor = _processor(path)
    splits = _splits()
    batch = TrainCollator(processor, splits.labels, max_length=1024)(splits.train[:1])
    net = AutoModelForImageTextToText.from_pretrained(path).eval()
    keep = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist()
    with torch.no_grad():
        before = net(**batch).logits
        for pos in (keep[0], keep[-1]):
            changed = {k: v.clone() for k, v in batch.items()}
            changed["input_ids"][0, pos] = changed["input_ids"][0, keep[0] - 1]
            after = net(**changed).logits
            assert torch.allclose(before[0, :pos], after[0, :pos], atol=1e-5), (name, pos)
            assert not torch.allclose(before[0, pos:], after[0, pos:]), (name, pos)


def test_generation_stops_at_the_family_end_and_returns_text(family: tuple[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText

    name, path = family
    processor = _processor(path)
    net = AutoModelForImageTextToText.from_pretrained(path)
    fmt = prompts.prompt_format(processor, _splits().labels)
    stop = model.end_of_turn_ids(net, processor, fmt.end)
    tok = prompts.tokenizer_of(processor)
    assert tok.convert_tokens_to_ids(fmt.end) in stop, name
    answers = generate_answers(
        net,
        processor,
        _splits().labels,
        _splits().eval[:2],
        device=torch.device("cpu"),
        batch_size=2,
        max_new_tokens=3,
        stop_ids=stop,
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_whole_run_on_digits(family: tuple[str, Path], tmp_path: Path) -> None:
    name, path = family
    out = tmp_path / "out"
    argv = ["--model-id", str(path), "--dataset", "digits", "--train-size", "8"]
    argv += ["--eval-size", "4", "--batch-size", "4", "--gradient-accumulation-steps", "1"]
    argv += ["--eval-batch-size", "4", "--max-new-tokens", "3", "--max-length", "1024"]
    argv += ["--output-dir", str(out), "--device", "cpu"]
    assert main(argv) == 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["outcome"] == "completed"
    assert results["final"]["num_samples"] == 4
    assert (out / "adapter" / "adapter_config.json").is_file()
