"""Trains a prepared L4Q model under DistributedDataParallel (gloo, CPU) and writes its parameters.

Run by test_l4q_ddp.py: ``python ddp_worker.py OUT_DIR``.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

import fxcompress as fxc  # noqa: E402
from toymodels import DecoderBlock  # noqa: E402


def setup_model_and_data():
    torch.manual_seed(0)
    teacher = DecoderBlock().eval()
    x = torch.randn(4, 6, 64)
    qm = fxc.prepare_l4q(teacher, (x[:1],), fxc.L4QConfig(bits=4, group_size=32, lora_rank=4, lora_alpha=8.0))
    with torch.no_grad():  # start from non-zero B so every gradient is exercised
        for n, p in qm.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.01)
    return teacher, qm, x


def train(qm, teacher, x, steps=3):
    opt = torch.optim.SGD(fxc.l4q_param_groups(qm, lora_lr=0.1, quant_lr=0.01))
    for _ in range(steps):
        loss = (qm(x) - teacher(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def worker(rank, world, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    teacher, qm, x = setup_model_and_data()
    ddp = torch.nn.parallel.DistributedDataParallel(qm)
    shard = x.chunk(world)[rank]
    train(ddp, teacher, shard)
    trained = {k: v for k, v in qm.state_dict().items() if "lora" in k or "scale" in k or "offset" in k}
    torch.save(trained, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0:
        dm = fxc.convert_l4q(ddp)
        torch.save(dm(x).detach(), os.path.join(out_dir, "converted_out.pt"))
    dist.barrier()  # rank 1 must not tear gloo down while rank 0 still converts (it aborted once: SIGABRT in CI)
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    os.environ["MASTER_PORT"] = sys.argv[2] if len(sys.argv) > 2 else "29533"
    mp.spawn(worker, args=(2, out), nprocs=2, join=True)
