import os
import socket
import subprocess
import sys

import torch

from ddp_worker import setup_model_and_data, train


def test_ddp_gloo_two_processes(tmp_path):
    with socket.socket() as sock:  # a port that is free now (a fixed range collided once under load)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "ddp_worker.py"), str(tmp_path),
                        port], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    p0, p1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert p0.keys() == p1.keys() and len(p0) == 7 * 4
    for k in p0:  # gradients were all-reduced: both ranks hold the same parameters
        assert torch.allclose(p0[k], p1[k], atol=1e-6), k
    # and they equal single-process training on the whole batch (DDP averages the shard gradients)
    teacher, qm, x = setup_model_and_data()
    train(qm, teacher, x)
    ref = qm.state_dict()
    for k in p0:
        assert torch.allclose(p0[k], ref[k], atol=1e-5), k
    assert torch.isfinite(torch.load(tmp_path / "converted_out.pt")).all()
