"""Artifacts (format 2): graph as JSON over an allowlist + safetensors; bit-exact round trips; loading runs no code."""
import copy
import json
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file
from toymodels import DecoderBlock

import fxcompress as fxc
from fxcompress.runtime.artifact import ArtifactError, example_inputs, load_artifact, save_artifact
from fxcompress.runtime.artifact_v1 import convert_v1


def _gm(result):
    """quantize_rtn / udfc return a PassResult here and the model after the API merge."""
    return getattr(result, "gm", result)


def _assert_same(gm, gm2, args):
    sd, sd2 = gm.state_dict(), gm2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    with torch.no_grad():
        assert torch.equal(gm(*args), gm2(*args))
    assert [type(m).__name__ for m in gm.modules()] == [type(m).__name__ for m in gm2.modules()] or \
        isinstance(gm2, torch.fx.GraphModule)


@pytest.fixture(scope="module")
def decoder_rtn():
    x = torch.randn(1, 4, 64)
    gm = fxc.capture(DecoderBlock().eval(), (x,))
    return _gm(fxc.quantize_rtn(gm, fxc.RTNConfig(bits=3, symmetric=False, granularity="per_group",
                                                  group_size=32))), x


def test_decoder_rtn_round_trip(tmp_path, decoder_rtn):
    gm, x = decoder_rtn
    d = save_artifact(gm, tmp_path / "a", example_inputs=(x,))
    assert sorted(p.name for p in d.iterdir()) == ["graph.json", "manifest.json", "weights.safetensors"]
    gm2 = load_artifact(d)
    _assert_same(gm, gm2, (x,))
    assert [r.as_dict() for r in fxc.report(gm2)] == [r.as_dict() for r in fxc.report(gm)]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["example_inputs"] == [{"shape": [1, 4, 64], "dtype": "float32"}]
    assert example_inputs(d)[0].shape == (1, 4, 64)
    assert isinstance(gm2.q_proj, fxc.nn.QuantLinear) and gm2.q_proj.spec == gm.q_proj.spec


@pytest.mark.parametrize("bits", [8, 4])
def test_digits_cnn_rtn_round_trip(tmp_path, bits):
    from fxcompress.models import pretrained_digits_resnet
    x = torch.randn(2, 1, 8, 8)
    gm = fxc.capture(pretrained_digits_resnet(), (x,))
    q = _gm(fxc.quantize_rtn(gm, fxc.RTNConfig(bits=bits, granularity="per_channel")))
    assert any(isinstance(m, fxc.nn.QuantConv2d) for m in q.modules())
    q2 = load_artifact(save_artifact(q, tmp_path / "a", example_inputs=(x,)))
    _assert_same(q, q2, (x,))


def test_digits_cnn_udfc_round_trip(tmp_path):
    from fxcompress.models import pretrained_digits_resnet
    x = torch.randn(2, 1, 8, 8)
    cm = _gm(fxc.udfc(pretrained_digits_resnet(), (x,), fxc.UDFCConfig(prune_ratio=0.3, weight_bits=6)))
    cm2 = load_artifact(save_artifact(cm, tmp_path / "a"))
    _assert_same(cm, cm2, (x,))
    assert cm2.meta["fxcompress_reports"] and cm2.meta["udfc_seconds"] == cm.meta["udfc_seconds"]


def test_l4q_prepared_and_converted_decoder_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    qm = fxc.prepare_l4q(DecoderBlock().eval(), (x,), fxc.L4QConfig(bits=4, group_size=32, lora_rank=4,
                                                                      lora_alpha=8.0))
    opt = torch.optim.AdamW(fxc.l4q_param_groups(qm, lora_lr=1e-2, quant_lr=1e-3))
    for _ in range(3):
        loss = qm(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm2 = load_artifact(save_artifact(qm, tmp_path / "prepared"))  # training state: requires_grad kept
    _assert_same(qm, qm2, (x,))
    assert [p.requires_grad for p in qm.parameters()] == [p.requires_grad for p in qm2.parameters()]
    dm = fxc.convert_l4q(qm)
    dm2 = load_artifact(save_artifact(dm, tmp_path / "converted"))
    _assert_same(dm, dm2, (x,))


def test_export_captured_graph_round_trip(tmp_path):
    x = torch.randn(1, 4, 64)
    gm = fxc.capture(DecoderBlock().eval(), (x,), method="export")
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    g2 = load_artifact(save_artifact(gm, tmp_path / "float"))
    with torch.no_grad():
        assert torch.equal(gm(x), g2(x))
    assert json.loads((tmp_path / "float" / "manifest.json").read_text())["example_inputs"] == [
        {"shape": [1, 4, 64], "dtype": "float32"}]  # taken from the exported graph's placeholders
    q = _gm(fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, granularity="per_group", group_size=32)))
    q2 = load_artifact(save_artifact(q, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert sum(isinstance(m, fxc.nn.QuantLinear) for m in q2.modules()) == 7


def test_hugging_face_llama_export_captured_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 8))
    gm = fxc.capture(transformers.LlamaForCausalLM(cfg).eval(), (ids,), method="export")
    q = _gm(fxc.quantize_rtn(gm, fxc.RTNConfig(bits=4, granularity="per_group", group_size=32)))
    q2 = load_artifact(save_artifact(q, tmp_path / "a"))
    out, out2 = q(ids), q2(ids)
    assert type(out2) is type(out) and torch.equal(out.logits, out2.logits)


def test_tied_parameters_stay_tied(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))
    x = torch.randn(2, 8)
    gm = fxc.capture(Tied(), (x,))
    gm2 = load_artifact(save_artifact(gm, tmp_path / "a"))
    assert gm2.a.weight is gm2.b.weight and torch.equal(gm(x), gm2(x))


def test_gm_not_modified_and_unknown_module_refused_at_save(tmp_path, decoder_rtn):
    gm, _ = decoder_rtn
    before = copy.deepcopy(gm.state_dict())
    save_artifact(gm, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())

    class Custom(torch.nn.Module):
        def forward(self, x):
            return x * 2
    bad = copy.deepcopy(gm)
    bad.add_module("extra", Custom())
    with pytest.raises(ArtifactError, match="Custom is not in the artifact allowlist"):
        save_artifact(bad, tmp_path / "b")


def test_corrupt_artifacts(tmp_path, decoder_rtn):
    d = save_artifact(decoder_rtn[0], tmp_path / "a")
    w = d / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors is corrupt"):
        load_artifact(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(d)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifact(tmp_path / "nothing")


def test_future_format_version(tmp_path, decoder_rtn):
    d = save_artifact(decoder_rtn[0], tmp_path / "a")
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load_artifact(d)


# ---------------------------------------------------------------------------------------------------------
# Malicious artifacts: a correct manifest (sha256 matching) around files that would run code if unpickled.

class _Payload:
    """Unpickling this runs ``open(path, 'w')``: the file appears iff something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_manifest(d, version, files, **more):
    import hashlib
    m = {"format": "fxcompress-artifact", "format_version": version,
         "files": {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in files}, **more}
    (d / "manifest.json").write_text(json.dumps(m))


def test_v1_artifact_with_pickle_payload_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "v1"
    d.mkdir()
    marker = tmp_path / "pwned-v1"
    (d / "structure.pt").write_bytes(pickle.dumps(_Payload(marker)))
    save_file({"w": torch.zeros(2)}, str(d / "weights.safetensors"))
    _write_manifest(d, 1, ["structure.pt", "weights.safetensors"])
    with pytest.raises(ArtifactError, match="version-1 artifact.*fxcompress convert-artifact .* --trust"):
        load_artifact(d)
    assert not marker.exists()
    with pytest.raises(ArtifactError, match="trust=True"):
        convert_v1(d, tmp_path / "new")
    assert not marker.exists()


def test_v2_artifact_with_pickle_payload_in_its_files_runs_nothing(tmp_path, decoder_rtn):
    d = save_artifact(decoder_rtn[0], tmp_path / "a")
    marker = tmp_path / "pwned-v2"
    payload = pickle.dumps(_Payload(marker))
    for victim in ("weights.safetensors", "graph.json"):
        e = tmp_path / victim
        import shutil
        shutil.copytree(d, e)
        (e / victim).write_bytes(payload)
        _write_manifest(e, 2, ["graph.json", "weights.safetensors"])
        with pytest.raises(ArtifactError, match=f"{victim} is not a valid"):
            load_artifact(e)
        assert not marker.exists()


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module whose import creates a file: the test checks it was never imported."""
    marker = tmp_path / "pwned-import"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "fxc_evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nclass Evil(torch.nn.Module):\n    pass\n"
        "def run(*a):\n    return 0\n")
    monkeypatch.syspath_prepend(str(pkg))
    return marker


def _tamper(d, edit):
    g = json.loads((d / "graph.json").read_text())
    edit(g["root"])
    (d / "graph.json").write_text(json.dumps(g))
    _write_manifest(d, 2, ["graph.json", "weights.safetensors"])


@pytest.mark.parametrize("where", ["function", "module", "op", "method", "dataclass"])
def test_names_outside_the_allowlist_are_refused_and_nothing_is_imported(tmp_path, decoder_rtn, evil_module, where):
    d = save_artifact(decoder_rtn[0], tmp_path / "a")

    def edit(root):
        nodes = root["graph"]["nodes"]
        fn = next(n for n in nodes if n["op"] == "call_function")
        if where == "function":
            fn["target"] = "fxc_evil_mod.run"
        elif where == "op":
            fn["target"] = "torch.ops.fxc_evil_mod.run.default"
        elif where == "method":
            fn["op"], fn["target"] = "call_method", "__reduce_ex__"
        elif where == "module":
            root["children"]["q_proj"]["type"] = "fxc_evil_mod.Evil"
        else:
            root["children"]["q_proj"]["attrs"]["spec"]["dataclass"] = "fxc_evil_mod.Evil"
    _tamper(d, edit)
    expected = {"function": "function 'fxc_evil_mod.run', which is not in the allowlist",
                "op": "not in the allowlist", "method": "'__reduce_ex__'",
                "module": "module type 'fxc_evil_mod.Evil', which is not in the allowlist",
                "dataclass": "type 'fxc_evil_mod.Evil', which is not in the allowlist"}[where]
    with pytest.raises(ArtifactError, match=expected):
        load_artifact(d)
    assert "fxc_evil_mod" not in sys.modules and not evil_module.exists()


def test_convert_v1_trusted_round_trip(tmp_path, decoder_rtn):
    """A version-1 artifact as the old save() wrote it converts, on request, into a bit-exact version 2."""
    gm, x = decoder_rtn
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in gm.state_dict().items()}, str(old / "weights.safetensors"))
    torch.save(copy.deepcopy(gm).to("meta"), old / "structure.pt")
    _write_manifest(old, 1, ["weights.safetensors", "structure.pt"], aliases={},
                    reports=[[n, rows] for n, rows in gm.meta["fxcompress_reports"]])
    with pytest.raises(ArtifactError, match="convert-artifact"):
        load_artifact(old)
    new = convert_v1(old, tmp_path / "new", trust=True)
    _assert_same(gm, load_artifact(new), (x,))
