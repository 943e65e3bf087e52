"""Fixtures shared by every test file. Torch-free: the core matrix runs tests/core
on Pythons without torch, and pytest loads this file for them too."""
import sys
import textwrap

import pytest

from visualizer.capture import GetLocal, get_local


@pytest.fixture(autouse=True)
def _no_compiled_code_outlives_its_test():
    """Drop what Dynamo compiled in a test, so that no later test's capture switch meets
    compiled code it did not make (get_local's reset notice would depend on test order)."""
    yield
    # A handover point: a library warning that the error filter turned into an error
    # during one of this test's calls, and that no handover raised yet, fails this test,
    # not the next one to switch capture.
    get_local.cache  # noqa: B018 - read for its side effect
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


@pytest.fixture
def capture_left_off():
    """Every capture switched off around the test, the process-wide cache emptied after it,
    and no torch function mode left on this thread's stack (what capture put there goes
    with it). Files that switch capture on use it: `pytest.mark.usefixtures`."""
    switch_everything_off()
    yield
    switch_everything_off()
    torch = sys.modules.get("torch")
    if torch is not None:
        assert torch.overrides._get_current_function_mode_stack() == []


def switch_everything_off():
    fused = sys.modules.get("visualizer.fused")  # loaded with torch only
    if fused is not None:
        fused.sdpa_capture.deactivate()
    get_local.deactivate()
    get_local.clear()


@pytest.fixture
def gl():
    """A private get_local: its registrations, switch and cache die with the test."""
    instance = GetLocal()
    yield instance
    instance.deactivate()


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """Write modules to a temporary folder that is importable."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        created.append(name)
        return name

    yield write
    for name in created:
        sys.modules.pop(name, None)
