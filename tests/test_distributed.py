"""Capture in torch.distributed jobs: two gloo processes on the CPU.

Oracles: each rank's own maps (a gathered copy must equal them exactly, dtype
included), the same model run in one process (DDP and FSDP2 must not change
the maps, outputs or gradients), and the original code objects (a rank that
does not capture runs exactly them).
"""

import datetime
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = torch.distributed
mp = torch.multiprocessing
F = torch.nn.functional

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from examples.toy_vit import VisionTransformer  # noqa: E402
from visualizer import (  # noqa: E402
    AttentionMaps,
    _torch_internals,
    VisualizerError,
    all_gather,
    capture_attention,
    gather,
    get_local,
)

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(worker, *args):
    """Run worker(rank, *args) in two gloo processes; a failed assert fails the test."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(_initialised, args=(worker, args), nprocs=WORLD)


def _initialised(rank, worker, args):
    torch.set_num_threads(1)
    # A collective that waits longer than this raises instead of hanging the suite
    # (a gloo DDP run once hung on torch 2.1.2).
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        worker(rank, *args)
        dist.barrier()  # tear down together: gloo can abort a rank that leaves early
    finally:
        get_local.deactivate()
        dist.destroy_process_group()


def toy_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=(16, 16), patch_size=4, dim=32, depth=2, num_heads=4)


def images_of(rank):
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(10 + rank))


def maps_in_one_process(model, images, **options):
    with torch.no_grad(), capture_attention(model, **options) as maps:
        model(images)
    return maps


def assert_same_maps(got, want):
    assert list(got) == list(want)
    for key in want:
        assert len(got[key]) == len(want[key]), key
        for a, b in zip(got[key], want[key]):
            assert type(a) is type(b) and a.dtype == b.dtype, (key, type(a), a.dtype, b.dtype)
            assert np.array_equal(np.asarray(a), np.asarray(b)), key


# -- DDP: capture on one rank, outputs and gradients unchanged, gather ----------------------


def ddp_worker(rank):
    from torch.nn.parallel import DistributedDataParallel

    plain = DistributedDataParallel(toy_vit())
    captured = DistributedDataParallel(toy_vit())
    images = images_of(rank)
    labels = torch.tensor([0, 1, 2])

    # get_local with ranks=[0]: rank 1 runs the original code objects.
    from examples.toy_vit import Attention

    original = Attention.forward.__code__
    get_local.activate(ranks=[0])
    assert get_local.is_activate == (rank == 0)
    assert (Attention.forward.__code__ is original) == (rank == 1)
    get_local.deactivate()

    # One training step each, capture on rank 0 only: bitwise the same.
    F.cross_entropy(plain(images), labels).backward()
    with capture_attention(captured, ranks=[0]) as maps:
        F.cross_entropy(captured(images), labels).backward()
        hooked = any(m._forward_pre_hooks for m in captured.modules())
    assert hooked == (rank == 0)
    for a, b in zip(plain.parameters(), captured.parameters()):
        assert torch.equal(a.grad, b.grad)
    if rank == 0:
        assert list(maps) == ["blocks.0.attn", "blocks.1.attn"]  # no "module." prefix
        assert maps["blocks.0.attn"][0].shape == (3, 4, 17, 17)
    else:
        assert not maps

    # Capture everywhere (CLS row, float16 kept as tensors), gather and all_gather.
    model = captured.module.eval()
    with torch.no_grad(), capture_attention(captured, rows=0, keep_on_device=True,
                                            dtype="float16") as maps:
        captured(images)
    gathered = gather(maps, dst=0)
    everywhere = all_gather(maps)
    for rank_seen in range(WORLD):
        expected = maps_in_one_process(model, images_of(rank_seen), rows=0, keep_on_device=True,
                                       dtype="float16")
        assert_same_maps(everywhere[rank_seen], expected)
        assert isinstance(everywhere[rank_seen], AttentionMaps)
        if rank == 0:
            assert_same_maps(gathered[rank_seen], expected)
    if rank != 0:
        assert gathered is None

    # get_local.cache (numpy entries, MISSING kept) gathers the same way.
    with get_local.capture() as cache, torch.no_grad():
        model(images)
    everywhere = all_gather(cache)
    assert sorted(everywhere) == [0, 1]
    assert_same_maps(everywhere[rank], cache)
    assert not np.array_equal(everywhere[0]["Attention.forward"][0],
                              everywhere[1]["Attention.forward"][0])


def test_ddp_capture_on_one_rank_outputs_unchanged_and_gather():
    spawn(ddp_worker)


# -- FSDP2: the sharded model's maps are the unsharded model's ---------------------------------


def fsdp_worker(rank):
    from torch.distributed.fsdp import fully_shard

    model = toy_vit().eval()
    images = images_of(rank)
    expected = maps_in_one_process(model, images)
    with torch.no_grad():
        expected_output = model(images)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    with torch.no_grad(), capture_attention(model) as maps:
        output = model(images)
    assert torch.equal(output, expected_output)
    assert list(maps) == list(expected)
    for key in expected:
        np.testing.assert_allclose(maps[key][0], expected[key][0], atol=1e-6)


@pytest.mark.skipif(
    _torch_internals.torch_release() < (2, 8),
    reason="FSDP2 (torch.distributed.fsdp.fully_shard) on the CPU needs torch>=2.8 "
    "(checked: 2.1.2 has no fully_shard there, 2.6.0 fails on CPU streams, 2.8.0 passes)",
)
def test_fsdp2_maps_equal_the_unsharded_models():
    spawn(fsdp_worker)


# -- without a process group, and the environment switch ---------------------------------


def test_gather_without_a_process_group_is_a_clear_error():
    with pytest.raises(VisualizerError, match=r"gather: torch.distributed is not initialised; "
                       r"expected a process group"):
        gather({})
    with pytest.raises(VisualizerError, match="all_gather: torch.distributed is not initialised"):
        all_gather({})


def test_ranks_are_checked():
    with pytest.raises(VisualizerError, match=r"get_local: ranks must be None, an int or a "
                       r"sequence of ints >= 0; got \[-1\]"):
        get_local.activate(ranks=[-1])
    with pytest.raises(VisualizerError, match="capture_attention: ranks must name at least one"):
        capture_attention(toy_vit(), ranks=[])
    # A plain single process is rank 0.
    get_local.activate(ranks=1)
    try:
        assert not get_local.is_activate
    finally:
        get_local.deactivate()


TORCHRUN_PROBE = """
import os
import torch.distributed as dist
from visualizer import get_local
dist.init_process_group("gloo")
print(f"rank {dist.get_rank()} RANK {os.environ['RANK']} active {get_local.is_activate} "
      f"dtype {get_local.policy.dtype}")
dist.barrier()
dist.destroy_process_group()
"""


def torchrun(*arguments, env=None, timeout=120):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_environment_switch_reaches_torchrun_workers(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(TORCHRUN_PROBE))
    output = torchrun(str(probe), env={"VISUALIZER_CAPTURE": "1", "VISUALIZER_RANKS": "1",
                                       "VISUALIZER_DTYPE": "float16"})
    assert "rank 0 RANK 0 active False dtype float16" in output
    assert "rank 1 RANK 1 active True dtype float16" in output


def test_example_under_torchrun(tmp_path):
    import json

    torchrun("examples/distributed_capture.py", "--out", str(tmp_path), "--steps", "30")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == [0, 1]
    keys = ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert summary["keys"] == {"0": keys, "1": keys}
    assert summary["shapes"]["1"] == [[64, 4, 1, 65]] * 3
    assert summary["cls_rows"]["0"] != summary["cls_rows"]["1"]  # each rank's own images
    assert summary["training_step_keys_on_rank_0"] == keys
    assert (tmp_path / "rank1_cls_attention.png").read_bytes().startswith(b"\x89PNG")
