from __future__ import annotations

from pathlib import Path

import pytest

from tests.libvgpu import harness


@pytest.fixture(scope="session")
def native() -> None:
    harness.build_native()


@pytest.fixture
def container(native: None, tmp_path: Path) -> harness.Container:
    """A fresh container on a fresh mock GPU (one 16384 MiB device)."""
    return harness.Container(root=tmp_path)
