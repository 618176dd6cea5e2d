"""The site tests' broker: a FakeBroker (tests/site/helpers.py) on an ipc socket of the test's own folder."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

from tests.site.helpers import FakeBroker


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[FakeBroker]:
    ctx = zmq.asyncio.Context()
    fake = FakeBroker(ctx, f"ipc://{tmp_path}/broker.sock")
    try:
        yield fake
    finally:
        await fake.close()
        ctx.destroy(linger=0)
