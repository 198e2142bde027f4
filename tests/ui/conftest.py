"""Engine slots backed by the ``mock`` backend, loaded through the real registry."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.registry import get_backend
from tandemlm.errors import EngineError
from tandemlm.ui.engines import EnginePool, EngineSlot


def mock_loader(replies: dict[str, str | None], **engine_options: object) -> Callable[..., Engine]:
    """A pool loader: model name -> a mock engine scripted to reply ``replies[name]``; unknown names fail."""

    def load(model: str, backend: str, **_: object) -> Engine:
        if model not in replies:
            raise EngineError(f"model path {model} does not exist")
        return get_backend("mock").load(None, model_id=model, reply=replies[model], **engine_options)

    return load


@pytest.fixture
def make_slots() -> Callable[..., dict[str, EngineSlot]]:
    """``make_slots(policy_reply, reference_reply, **mock_options)``: policy/reference slots on mock engines."""

    def make(policy: str | None = "hello", reference: str | None = "world", **options: object) -> dict[str, EngineSlot]:
        pool = EnginePool(mock_loader({"pol": policy, "ref": reference}, **options))
        return {"policy": EngineSlot("policy", pool, "pol"), "reference": EngineSlot("reference", pool, "ref")}

    return make
