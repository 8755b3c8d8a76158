"""Fixtures for the connector tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def kv_copy_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """`caplog` for kv_copy's logger, attached to it directly: the logger sits under "vllm.", and
    vLLM's logging config (where vLLM was imported in this session) stops propagation there."""
    logger = logging.getLogger("vllm.polarkvd.kv_copy")
    saved = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # not twice through the root logger's capture
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.level, logger.propagate = saved
