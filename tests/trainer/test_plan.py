"""The step planner's decisions for stated memory figures (a pure function: no GPU needed).

The figures are a Gemma-3-4B-like model (34 layers, hidden 2560, 330 tokens per example):
NF4 weights ~3.4 GiB, bf16 ~8.0 GiB; 1 GiB fixed."""

from __future__ import annotations

import pytest

from trainer.plan import GIB, MemoryInputs, activation_bytes, choose, total_bytes


def mem(free_gib: float | None) -> MemoryInputs:
    return MemoryInputs(
        free=None if free_gib is None else free_gib * GIB,
        weights={"nf4": 3.4 * GIB, "none": 8.0 * GIB},
        layers=34,
        hidden=2560,
        tokens=330,
        fixed=1.0 * GIB,
    )


def test_checkpointing_costs_less_memory_the_more_of_it() -> None:
    m = mem(100)
    for quant in ("nf4", "none"):
        full, sel, none = (activation_bytes(m, quant, k) for k in ("full", "selective", "none"))
        assert full < sel < none


def test_an_h200_trains_without_checkpointing_in_large_micro_batches() -> None:
    plan = choose(16, mem(139))
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (16, 1, "none")
    assert plan.quantization == "nf4"  # the default is never overridden
    assert plan.estimated_gib is not None and plan.estimated_gib <= 139 * 0.85 - 3


def test_an_l4_keeps_the_effective_batch_with_checkpointing() -> None:
    plan = choose(16, mem(22))
    assert plan.micro_batch * plan.accumulation == 16
    assert plan.checkpointing != "none"
    assert total_bytes(mem(22), "nf4", plan.checkpointing, plan.micro_batch) <= (
        22 * GIB * 0.85 - 3 * GIB
    )


def test_the_micro_batch_divides_the_effective_batch() -> None:
    plan = choose(12, mem(40))
    assert 12 % plan.micro_batch == 0 and plan.micro_batch * plan.accumulation == 12


def test_explicit_values_win() -> None:
    plan = choose(16, mem(139), micro=2, checkpointing="full")
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (2, 8, "full")
    assert any("from the spec" in r for r in plan.reasons)


def test_checkpointing_forbidden_by_the_spec_is_never_chosen() -> None:
    plan = choose(16, mem(22), allow_checkpointing=False)
    assert plan.checkpointing == "none" and plan.micro_batch < 16


def test_a_micro_batch_that_does_not_divide_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        choose(16, mem(139), micro=3)


def test_quantization_auto_takes_bf16_where_it_fits_and_nf4_where_not() -> None:
    assert choose(16, mem(139), quantization="auto").quantization == "none"
    small = choose(16, mem(12), quantization="auto")
    assert small.quantization == "nf4" and "bf16" in small.reasons[-1]


def test_nothing_fits_gives_the_smallest_plan_and_says_so() -> None:
    plan = choose(16, mem(4))
    assert (plan.micro_batch, plan.checkpointing) == (1, "full")
    assert any("nothing fits" in r for r in plan.reasons)


def test_without_a_gpu_the_spec_batch_stands() -> None:
    plan = choose(16, mem(None), default_micro=8)
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (8, 2, "none")
