"""FSDP2 (fully_shard) of a prepared L4Q model: 2 processes match single-process training on the whole
batch; DCP checkpoint + resume; the gathered result converts to integer weights."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fxcompress as fxc
from fxcompress.distributed import shard_l4q
from fsdp_worker import STEPS, make_opt, setup_model_and_data, train, trained_state
from toymodels import DecoderBlock


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run_workers(tmp_path, backend, device):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "fsdp_worker.py"), str(tmp_path),
                        _free_port(), backend], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    out = torch.load(tmp_path / "fsdp.pt")
    qm, x, target = setup_model_and_data(device)
    train(qm, make_opt(qm), x, target, STEPS)
    ref = trained_state(qm.state_dict())
    assert out["trained"].keys() == ref.keys() and len(ref) == 7 * 4
    init = trained_state(setup_model_and_data(device)[0].state_dict())
    for k in ref:  # fp32 activations; half-batch vs whole-batch GEMMs differ only in rounding
        moved = (ref[k] - init[k]).abs().max()  # what training changed: > 0 for every tensor
        err = (out["trained"][k] - ref[k]).abs().max()
        assert moved > 0 and err <= 1e-2 * moved + 1e-8, (k, float(err), float(moved))
        assert torch.allclose(out["resumed"][k], out["trained"][k], rtol=1e-6, atol=1e-9), k
    assert out["bad"] is not None and "another model or L4QConfig" in out["bad"] and "lora_A" in out["bad"]
    conv = torch.load(tmp_path / "converted.pt")
    assert torch.allclose(conv["converted"], conv["fake_quant"], atol=2e-2)


def test_fsdp2_gloo_two_processes_match_single_process(tmp_path):
    _run_workers(tmp_path, "gloo", "cpu")


@pytest.mark.gpu
def test_fsdp2_nccl_two_gpus_match_single_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _run_workers(tmp_path, "nccl", "cuda:0")


def test_shard_l4q_without_process_group_is_a_clear_error():
    qm = fxc.prepare_l4q(DecoderBlock().eval(), (torch.randn(1, 4, 64),), fxc.L4QConfig(bits=4, group_size=32))
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torchrun"):
        shard_l4q(qm)


def test_shard_l4q_on_one_process_is_a_clear_error(tmp_path):
    qm = fxc.prepare_l4q(DecoderBlock().eval(), (torch.randn(1, 4, 64),), fxc.L4QConfig(bits=4, group_size=32))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="one process"):
            shard_l4q(qm)
    finally:
        dist.destroy_process_group()


def test_shard_l4q_needs_l4q_layers(tmp_path):
    gm = fxc.capture(DecoderBlock().eval(), (torch.randn(1, 4, 64),))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="one process|no L4QLinear"):
            shard_l4q(gm)
    finally:
        dist.destroy_process_group()


def test_fsdp_units_group_each_decoder_block():
    from fxcompress.distributed import fsdp_units
    from fxcompress.models.smollm2 import tiny_causal_lm
    from fxcompress.nn import L4QLinear

    ids = torch.randint(0, 100, (1, 8))
    qm = fxc.prepare_l4q(tiny_causal_lm(), (ids,), fxc.L4QConfig(bits=4, group_size=32))
    names = {id(m): n for n, m in qm.named_modules()}
    blocks = fsdp_units(qm, L4QLinear)
    assert [len(b) for b in blocks] == [7, 7]
    assert all(names[id(m)].startswith(f"layers.{i}.") for i, b in enumerate(blocks) for m in b)
    assert [len(b) for b in fsdp_units(qm, L4QLinear, "linear")] == [1] * 14
    with pytest.raises(ValueError, match="units must be"):
        fsdp_units(qm, L4QLinear, "layer")
