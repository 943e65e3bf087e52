"""Activation checkpointing re-runs forwards during backward: those are not new calls.

A 3-block ViT whose blocks run under torch.utils.checkpoint (reentrant and
not): one training step must give exactly one map per block, in forward
order, equal to the same step without checkpointing, for get_local and for
capture_attention.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils.checkpoint import checkpoint  # noqa: E402

from examples.toy_vit import VisionTransformer  # noqa: E402
from visualizer import _torch_internals, capture_attention, get_local  # noqa: E402


class Checkpointed(torch.nn.Module):
    """Runs a block under activation checkpointing, as training code does to save memory."""

    def __init__(self, block, reentrant):
        super().__init__()
        self.block = block
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant is None:
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=self.reentrant)


def model_with(reentrant):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(16, 16), patch_size=4, dim=32, depth=3, num_heads=4)
    model.blocks = torch.nn.Sequential(*[Checkpointed(b, reentrant) for b in model.blocks])
    return model.train()


def training_step(model):
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model(images).sum().backward()


@pytest.fixture(autouse=True)
def capture_off():
    yield
    get_local.deactivate()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_get_local_records_each_block_once_in_forward_order(reentrant):
    with get_local.capture() as expected:
        training_step(model_with(None))
    with get_local.capture() as cache:
        training_step(model_with(reentrant))
    assert len(expected["Attention.forward"]) == 3
    assert len(cache["Attention.forward"]) == 3
    for got, want in zip(cache["Attention.forward"], expected["Attention.forward"]):
        np.testing.assert_array_equal(got, want)


def numbered_block_class():
    """A new class (each test decorates its own forward) of blocks that name their
    position in a plain int local, as a user's forward might."""

    class NumberedBlock(torch.nn.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            position = self.index * 1
            return self.linear(x).relu() + position

    return NumberedBlock


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("select", [None, lambda value: value + 0], ids=["plain", "select"])
@pytest.mark.parametrize("where", ["scoped", "unbounded", "bounded"])
def test_plain_numbers_are_not_recorded_again_by_the_recompute(reentrant, select, where):
    # Numbers take get_local's fast path (no recorder: see FastSink, which
    # differs with a scope open, unbounded and bounded); the recompute check
    # must be there too, or the order comes out [0, 1, 2, 2, 1, 0].
    NumberedBlock = numbered_block_class()
    get_local("position", select=select)(NumberedBlock.forward)
    key = NumberedBlock.forward.__qualname__
    blocks = [Checkpointed(NumberedBlock(i), reentrant) for i in range(3)]
    model = torch.nn.Sequential(*blocks)
    x = torch.randn(2, 4, requires_grad=True)
    if where == "scoped":
        with get_local.capture() as cache:
            model(x).sum().backward()
        assert cache[key] == [0, 1, 2]
        return
    try:
        get_local.activate(max_entries=10 if where == "bounded" else None)
        get_local.clear()
        for _ in range(2):
            model(x).sum().backward()
        assert get_local.cache[key] == [0, 1, 2, 0, 1, 2]
        assert get_local.dropped == {}
    finally:
        get_local.deactivate()
        get_local.activate()  # back to the default policy
        get_local.deactivate()
        get_local.clear()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_capture_attention_records_each_block_once(reentrant):
    reference = model_with(None)
    with capture_attention(reference) as expected:
        training_step(reference)
    model = model_with(reentrant)
    with capture_attention(model) as maps:
        training_step(model)
    assert list(maps) == [f"blocks.{i}.block.attn" for i in range(3)]
    assert [len(calls) for calls in maps.values()] == [1, 1, 1]
    for got, want in zip(maps.values(), expected.values()):
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.skipif(
    _torch_internals.torch_release() < (2, 6),
    reason="Dynamo before torch 2.6 fails (InternalTorchDynamoError) compiling a non-reentrant "
    "checkpoint around a get_local function (checked: 2.1.2 fails, 2.6.0 passes)",
)
def test_compiled_checkpointed_training_with_capture_switched_on_midway():
    """The issue's end-to-end case: compile + checkpointing, capture switched on mid-training."""
    model = model_with(reentrant=False)
    reference = model_with(None)
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # steps that change nothing
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # training with capture off
        compiled(images).sum().backward()
        optimizer.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the Dynamo reset notice
        get_local.activate()
    for step in range(2):  # capture switched on mid-training
        compiled(images).sum().backward()
        optimizer.step()
    maps = get_local.cache["Attention.forward"]
    get_local.deactivate()
    with get_local.capture() as expected:
        reference(images).sum().backward()
    assert len(maps) == 2 * 3  # one map per layer per forward, none from recomputation
    for got, want in zip(maps, expected["Attention.forward"] * 2):
        np.testing.assert_allclose(got, want, atol=1e-6)
