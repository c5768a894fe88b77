"""The frozen vision tower's cached features give the same loss and LoRA gradients as
recomputing them (exactly: the same rows go into the same computation), and the second pass
over the same samples reads the cache instead of running the tower."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import data
from trainer import model as model_setup
from trainer.collator import TrainCollator
from trainer.contract.spec import RunSpec
from trainer.features import FeatureCache


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def test_cached_features_change_nothing_but_the_work(tiny_model: Path) -> None:
    spec = RunSpec(model_id=str(tiny_model), dataset="digits", lora_dropout=0.0)
    torch.manual_seed(0)
    loaded = model_setup.load(spec, torch.device("cpu"))
    model = loaded.model.train()
    splits = data.load_splits("digits", 6, 1, seed=0)
    batch = TrainCollator(loaded.processor, splits.labels, 512)(splits.train)
    ids = [s.sample_id for s in splits.train]
    plain_loss, plain_grads = _loss_and_grads(model, batch)

    cache = FeatureCache.for_model(model)
    assert cache is not None
    with cache.keys(ids):
        first = _loss_and_grads(model, batch)  # computes and stores
    with cache.keys(ids):
        second = _loss_and_grads(model, batch)  # reads the cache
    assert (cache.misses, cache.hits) == (6, 6) and cache.bytes > 0
    for loss, grads in (first, second):
        assert loss == plain_loss
        assert grads.keys() == plain_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, plain_grads[name]), name


def test_no_cache_for_a_trained_tower_and_none_past_its_bound(tiny_model: Path) -> None:
    cpu = torch.device("cpu")
    trained = RunSpec(model_id=str(tiny_model), dataset="digits", lora_vision=True)
    assert FeatureCache.for_model(model_setup.load(trained, cpu).model) is None
    loaded = model_setup.load(RunSpec(model_id=str(tiny_model), dataset="digits"), cpu)
    cache = FeatureCache.for_model(loaded.model, max_bytes=1)
    assert cache is not None
    splits = data.load_splits("digits", 2, 1, seed=0)
    batch = TrainCollator(loaded.processor, splits.labels, 512)(splits.train)
    with torch.no_grad(), cache.keys([s.sample_id for s in splits.train]):
        loaded.model(**batch)
        loaded.model(**batch)
    assert (cache.bytes, cache.hits, cache.misses) == (0, 0, 4)


def test_a_partly_cached_batch_runs_the_tower_on_the_rest_only(tiny_model: Path) -> None:
    """A data set larger than the cache's bound: batches mix cached and new images. The tower
    sees only the new ones, and the loss and gradients are the plain ones (fp32 on the CPU,
    the tower run on fewer rows: within 1e-6)."""
    spec = RunSpec(model_id=str(tiny_model), dataset="digits", lora_dropout=0.0)
    torch.manual_seed(0)
    loaded = model_setup.load(spec, torch.device("cpu"))
    model = loaded.model.train()
    splits = data.load_splits("digits", 6, 1, seed=0)
    collate = TrainCollator(loaded.processor, splits.labels, 512)
    batch = collate(splits.train)
    ids = [s.sample_id for s in splits.train]
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    cache = FeatureCache.for_model(model)
    assert cache is not None
    tower_rows: list[int] = []
    # The tower's patch embeddings run once per tower pass, on the rows it was given.
    embeddings = next(m for n, m in cache.tower.named_modules() if n.endswith("embeddings"))
    hook = embeddings.register_forward_hook(lambda m, a, out: tower_rows.append(out.shape[0]))
    with cache.keys(ids[::2]):
        _loss_and_grads(model, collate(splits.train[::2]))
    with cache.keys(ids):
        loss, grads = _loss_and_grads(model, batch)
    hook.remove()
    assert tower_rows == [3, 3] and (cache.hits, cache.misses) == (3, 6)
    assert abs(loss - plain_loss) <= 1e-6
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-6, rtol=1e-5), name
