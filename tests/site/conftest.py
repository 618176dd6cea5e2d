"""The site tests' broker: a FakeBroker (tests/site/helpers.py) on an ipc socket of the test's own folder."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.site.helpers import FakeBroker, fake_broker


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[FakeBroker]:
    async with fake_broker(tmp_path) as fake:
        yield fake
