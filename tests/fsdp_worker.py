"""Trains a prepared L4Q model under FSDP2 (gloo, CPU, 2 processes), checkpoints, resumes, converts.

Run by test_l4q_fsdp.py: ``python fsdp_worker.py OUT_DIR PORT [BACKEND]``.  With BACKEND=nccl each rank
uses cuda:<rank> (the multi-GPU test).  Each L4QLinear's frozen W0 is bf16 beside fp32 trainable
parameters (the mix that failed FSDP2's uniform-dtype check before); activations stay fp32 so the
sharded and single-process runs can be compared tightly.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

import fxcompress as fxc  # noqa: E402
from fxcompress.distributed import gather_l4q_state, load_l4q_checkpoint, save_l4q_checkpoint, shard_l4q  # noqa: E402
from toymodels import DecoderBlock  # noqa: E402

STEPS, RESUME_AT = 3, 2


def setup_model_and_data(device="cpu", rank=4):
    torch.manual_seed(0)
    teacher = DecoderBlock().eval()
    x = torch.randn(4, 6, 64)
    target = teacher(x).detach()
    teacher, x, target = teacher.to(device), x.to(device), target.to(device)
    qm = fxc.prepare_l4q(teacher, (x[:1],), fxc.L4QConfig(bits=4, group_size=32, lora_rank=rank, lora_alpha=8.0))
    with torch.no_grad():
        for m in qm.modules():
            if isinstance(m, fxc.nn.L4QLinear):
                m.weight.data = m.weight.data.to(torch.bfloat16)  # frozen W0 in bf16, trainables fp32
        # start from non-zero B so every gradient is exercised
        torch.manual_seed(1)
        for n, p in qm.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape) * 0.01)
    return qm, x, target


def make_opt(qm):
    # SGD (not Adam) so that a wrong gradient scale (sum instead of mean over ranks) shows; momentum gives the
    # checkpoint optimizer state to restore
    return torch.optim.SGD(fxc.l4q_param_groups(qm, lora_lr=0.2, quant_lr=0.02), momentum=0.9)


def train(qm, opt, x, target, steps):
    losses = []
    for _ in range(steps):
        loss = (qm(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trained_state(sd):
    return {k: v.detach().float().cpu() for k, v in sd.items() if "lora" in k or "scale" in k or "offset" in k}


def worker(rank, world, out_dir, backend):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    dev = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=world)
    qm, x, target = setup_model_and_data(dev)
    shard_l4q(qm)
    opt = make_opt(qm)
    xs, ts = x.chunk(world)[rank], target.chunk(world)[rank]
    train(qm, opt, xs, ts, RESUME_AT)
    ckpt = os.path.join(out_dir, "ckpt")
    save_l4q_checkpoint(qm, opt, ckpt)
    train(qm, opt, xs, ts, STEPS - RESUME_AT)
    full = gather_l4q_state(qm)
    # resume: a fresh sharded model + optimizer from the checkpoint, the remaining steps again
    qm2, _, _ = setup_model_and_data(dev)
    shard_l4q(qm2)
    opt2 = make_opt(qm2)
    load_l4q_checkpoint(qm2, opt2, ckpt)
    train(qm2, opt2, xs, ts, STEPS - RESUME_AT)
    full2 = gather_l4q_state(qm2)
    bad = None
    qm3, _, _ = setup_model_and_data(dev, rank=2)  # another config: LoRA rank 2
    shard_l4q(qm3)
    try:
        load_l4q_checkpoint(qm3, make_opt(qm3), ckpt)
    except ValueError as e:
        bad = str(e)
    if rank == 0:
        torch.save({"trained": trained_state(full), "resumed": trained_state(full2), "bad": bad},
                   os.path.join(out_dir, "fsdp.pt"))
        # convert the gathered result: load into an unsharded prepared model, then convert_l4q
        plain, xc, _ = setup_model_and_data("cpu")
        plain.load_state_dict({k: v.to(plain.state_dict()[k].dtype) for k, v in full.items()})
        dm = fxc.convert_l4q(plain)
        with torch.no_grad():
            torch.save({"converted": dm(xc).float(), "fake_quant": plain(xc).float()},
                       os.path.join(out_dir, "converted.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) > 3 else "gloo"
    os.environ["MASTER_PORT"] = port
    mp.spawn(worker, args=(2, out, backend), nprocs=2, join=True)
