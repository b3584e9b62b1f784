from __future__ import annotations

import pytest

from tests.libvgpu import harness


@pytest.fixture(scope="session")
def native() -> None:
    """The mock driver, libvgpu and its probe programs, built (a no-op when current)."""
    harness.build_native()
