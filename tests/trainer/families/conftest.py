"""One tiny checkpoint per family, built once per session (worker) and reloaded from disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.families.builders import FAMILIES


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


@pytest.fixture(params=sorted(FAMILIES), scope="session")
def family(
    request: pytest.FixtureRequest,
    family_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path]:
    name = request.param
    if name not in family_dirs:
        family_dirs[name] = FAMILIES[name](tmp_path_factory.mktemp("families") / name)
    return name, family_dirs[name]
