"""Attention capture in distributed training: DDP on two CPU processes, gathered to rank 0.

    torchrun --standalone --nproc_per_node=2 examples/distributed_capture.py   # a real launch
    python examples/distributed_capture.py         # spawns the 2 processes itself

Each rank trains the example ViT (examples/toy_vit.py) wrapped in
DistributedDataParallel (gloo, CPU) on its own stream of drawn shapes, with the
`get_local` decorator left in place. Then:

1. one training step with `capture_attention(model, rows=0, ranks=[0])`: only
   rank 0 records (the other ranks put no hook on and pay nothing);
2. evaluation: every rank captures the CLS rows of its own held-out batch, and
   `visualizer.gather(maps, dst=0)` brings them to rank 0, keyed by rank, then
   by module path (no "module." prefix from the DDP wrapper);
3. rank 0 prints each rank's last-layer CLS attention share on the object,
   draws rank 1's first image, and writes summary.json beside the figure.
"""

import argparse
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see vit_walkthrough.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from examples.shapes_data import make_shapes  # noqa: E402
from examples.train import IMAGE_SIZE, build_vit, object_share, training_setup  # noqa: E402
from visualizer import capture_attention, gather, plot  # noqa: E402

DPI = 90


def train(model, steps, seed):
    """DDP training on this rank's own stream of batches (seeded by rank)."""
    rng, optimizer, schedule = training_setup(model, steps, lr=2e-3, seed=seed)
    for _ in range(steps):
        batch = make_shapes(32, rng, image_size=IMAGE_SIZE)
        loss = F.cross_entropy(model(batch.images), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return rng


def run(rank, world_size, args):
    torch.set_num_threads(1)  # two processes on a two-core machine
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = DistributedDataParallel(build_vit(seed=0))
    rng = train(model, args.steps, seed=args.seed + rank)

    # 1. Capture during a training step, on rank 0 only.
    model.train()
    batch = make_shapes(32, rng, image_size=IMAGE_SIZE)
    with capture_attention(model, rows=0, ranks=[0]) as step_maps:
        F.cross_entropy(model(batch.images), batch.labels).backward()
    model.eval()

    # 2. Evaluation on every rank, gathered to rank 0.
    held_out = make_shapes(64, np.random.default_rng(1000 + rank), image_size=IMAGE_SIZE)
    with torch.no_grad(), capture_attention(model, rows=0) as maps:
        logits = model(held_out.images)
    share = object_share(list(maps.values())[-1][0], logits, held_out, model.module.grid_size)
    everything = gather(maps, dst=0)
    shares = [None] * world_size
    dist.gather_object(share, shares if rank == 0 else None, dst=0)
    images = [None] * world_size
    dist.gather_object(held_out.images[:1], images if rank == 0 else None, dst=0)

    if rank == 0:
        summary = report(everything, shares, images, step_maps, args.out)
        (args.out / "summary.json").write_text(json.dumps(summary))
        print(f"summary and figure written to {args.out}/")
    # Tear down together: a rank leaving gloo while another still works can abort it.
    dist.barrier()
    dist.destroy_process_group()


def report(everything, shares, images, step_maps, out):
    """Rank 0: print and draw what every rank captured."""
    out.mkdir(parents=True, exist_ok=True)
    for rank, maps in everything.items():
        print(f"rank {rank}: {len(maps)} modules {list(maps)}; {shares[rank]}")
    last = everything[1]
    last_key = list(last)[-1]
    figure = plot.cls_attention(
        last[last_key][0], images[1], grid_size=(8, 8), layer=len(last) - 1
    )
    figure.savefig(out / "rank1_cls_attention.png", dpi=DPI)
    return {
        "ranks": sorted(everything),
        "keys": {rank: list(maps) for rank, maps in everything.items()},
        "shapes": {rank: [list(m[0].shape) for m in maps.values()] for rank, maps in
                   everything.items()},
        "cls_rows": {rank: [m[0].tolist() for m in maps.values()] for rank, maps in
                     everything.items()},
        "on_object": {rank: share.on_object for rank, share in enumerate(shares)},
        "uniform": {rank: share.uniform for rank, share in enumerate(shares)},
        "training_step_keys_on_rank_0": list(step_maps),
        "figures": [str(out / "rank1_cls_attention.png")],
    }


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/distributed_capture"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun: this process is one rank
        dist.init_process_group("gloo")
        run(dist.get_rank(), dist.get_world_size(), args)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        mp.spawn(run, args=(2, args), nprocs=2)


if __name__ == "__main__":
    main()
