"""Train a small ViT on synthetic data, single process or distributed (DDP / FSDP2).

    # one process
    python examples/train.py --steps 50
    # two processes on the CPU (gloo); DDP or FSDP2 (torch.distributed.fsdp.fully_shard)
    torchrun --nproc_per_node 2 examples/train.py --parallel ddp
    torchrun --nproc_per_node 2 examples/train.py --parallel fsdp
    # the same without torchrun: spawn the local processes from the script
    python examples/train.py --nproc 2 --parallel fsdp
    # a named model on GPUs, bf16 autocast
    torchrun --nproc_per_node 8 examples/train.py --model vit_base_patch16_224 --amp bf16 --parallel fsdp

The data is a fixed random classification task (one random prototype image per class plus noise),
generated identically on every rank from ``--seed``; each rank takes its contiguous slice of the
global batch, so an N-process run takes the same optimisation steps as one process on the full
batch (the gradients of the per-rank mean losses are averaged across ranks). ``--save`` writes the
final full (unsharded) parameters as safetensors from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import vitkern  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vitkern.models import ViT, create_model, list_models

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"'tiny' (32 px, width 64, depth 2) or one of {list_models()}")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=16, help="images per step over all ranks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default="ddp", help="used when WORLD_SIZE > 1")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.5, help="noise added to the class prototypes")
    p.add_argument("--save", default=None, help="write the final parameters (safetensors) here")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="spawn this many local processes (instead of torchrun)")
    return p.parse_args(argv)


def build_model(args, device) -> ViT:
    kw = dict(num_classes=args.num_classes, drop_path_rate=args.drop_path)
    if args.model == "tiny":
        return ViT(**TINY, **kw).to(device)
    return create_model(args.model, **kw).to(device)


class SyntheticData:
    """A fixed random task: ``num_classes`` prototype images; a sample is its prototype + noise."""

    def __init__(self, num_classes: int, shape, seed: int, noise: float):
        g = torch.Generator().manual_seed(seed + 12345)
        self.prototypes = torch.randn(num_classes, *shape, generator=g)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.noise = noise

    def batch(self, n: int):
        labels = torch.randint(0, self.prototypes.shape[0], (n,), generator=self.gen)
        images = self.prototypes[labels] + self.noise * torch.randn(n, *self.prototypes.shape[1:], generator=self.gen)
        return images, labels


def full_state_dict(model: torch.nn.Module) -> dict:
    """Unsharded parameters and buffers (FSDP2 DTensors gathered), on the CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu().contiguous()
    return out


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, runs, ports) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    for argv, port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        main(argv)


def launch(nproc: int, runs) -> None:
    """Run ``main(argv)`` for each argv in ``runs``, one after another, in ``nproc`` spawned local
    processes (one process group per run): torchrun's job for a single machine."""
    import torch.multiprocessing as mp

    ports = [_free_port() for _ in runs]
    mp.spawn(_spawned, args=(nproc, [list(r) for r in runs], ports), nprocs=nproc, join=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv = list(sys.argv[1:] if argv is None else argv)
        launch(args.nproc, [argv + ["--nproc", "1"]])
        return {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    distributed = world > 1
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the world size {world}")
    local_batch = args.global_batch // world

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    img = model.patch_embed.img_size
    data = SyntheticData(args.num_classes, (model.in_chans, img[0], img[1]), args.seed, args.noise)

    train_model = model
    if distributed and args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    elif distributed and args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    if args.compile:
        train_model = torch.compile(train_model)

    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        images, labels = data.batch(args.global_batch)
        images = images[rank * local_batch : (rank + 1) * local_batch].to(device, non_blocking=True)
        labels = labels[rank * local_batch : (rank + 1) * local_batch].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(train_model(images), labels)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        global_loss = loss.detach().float().clone()
        if distributed:
            dist.all_reduce(global_loss)
            global_loss /= world
        losses.append(global_loss.item())
        if rank == 0 and args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - start

    state = full_state_dict(model)  # collective under FSDP: every rank takes part
    summary = dict(
        world_size=world,
        parallel=args.parallel if distributed else "none",
        steps=args.steps,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        images_per_s=args.steps * args.global_batch / elapsed if elapsed > 0 else None,
    )
    if rank == 0:
        if args.save:
            from safetensors.torch import save_file

            save_file(state, args.save, metadata={"format": "pt", "vitkern_config": json.dumps(model.config)})
        print(json.dumps(summary), flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
