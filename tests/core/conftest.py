"""The core's tests run against both forms of instrumented code (see visualizer._rewrite):
the recorder as a constant of the code (the form without torch, and with `select`) and
the recorder loaded from the function's globals (the form torch.compile traces, used
where torch records inside compiled graphs). Torch-free: the globals form is forced."""
import pytest

from visualizer import capture
from visualizer.capture import GetLocal


@pytest.fixture(params=["constants", "globals"])
def gl(request, monkeypatch):
    """A private get_local (see tests/conftest.py), for each form of instrumented code."""
    monkeypatch.setattr(capture, "_records_in_graphs", lambda: request.param == "globals")
    instance = GetLocal()
    yield instance
    instance.deactivate()
