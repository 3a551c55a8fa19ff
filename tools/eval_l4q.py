"""L4Q against the methods people use today: held-out Shakespeare perplexity of SmolLM2-135M.

Rows (``--rows``, comma-separated):

- ``float``: the model as loaded (SmolLM2's Q4_1 GGUF dequantized to fp32);
- ``float+lora``: ``peft`` LoRA on the float model (the upper bound: how much of every trained row
  is adaptation to Shakespeare);
- ``rtn``: round-to-nearest at the row's format; ``lsq``: LSQ-only QAT (learned step and offset);
  ``l4q``: L4Q (LoRA + LSQ+ merged into one quantizer);
- ``qlora``: QLoRA as people run it: the linears as ``bitsandbytes`` NF4 (block 64) + ``peft``
  LoRA, evaluated (a) as trained (NF4 base + float adapters: mixed precision) and (b) merged
  (dequantized NF4 + LoRA delta) and re-quantized by RTN to the row's integer format, which is
  what deploys on an integer runtime.  Needs ``bitsandbytes`` and CUDA; skipped with the reason
  otherwise;
- ``qalora``: QA-LoRA, implemented here from its paper (group-pooled LoRA input, merged into the
  zero points), on an RTN base.

Every trained row sees the same token budget and data order (the same shuffled windows, the
same loop ``fxcompress.finetune.train_lm``: AdamW, 10% warm-up, same LoRA rank / alpha / lr).
Held out by whole plays: the last four plays of the corpus (troilus_and_cressida, twelfth_night,
two_gentlemen_of_verona, winters_tale; ~10% of the text) are never trained on.

Results accumulate in ``--json`` (one entry per row x setting), and the markdown table ``--out``
is rebuilt from all entries, so the GPU run can be split into commands under 10 minutes:

    export PYTHONPATH=/tmp/gpu-site:$PWD FXCOMPRESS_SMOLLM2_GGUF=/tmp/gpu-stage/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 tools/eval_l4q.py --rows float,float+lora,rtn,lsq,l4q --settings 4:64
    python3 tools/eval_l4q.py --rows rtn,lsq,l4q --settings 3:64
    python3 tools/eval_l4q.py --rows rtn,lsq,l4q --settings 2:32
    python3 tools/eval_l4q.py --rows qlora --settings 4:64,3:64,2:32
    python3 tools/eval_l4q.py --rows qalora --settings 4:64,3:64,2:32

Smoke mode (a random-init tiny model with SmolLM2's tokenizer, a few documents, CPU, < 2 min;
writes under /tmp unless --out/--json are given):

    PYTHONPATH=$PWD python tools/eval_l4q.py --tiny --device cpu
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress as fxc
from fxcompress.data.text import corpus_documents, token_windows
from fxcompress.finetune import perplexity, train_lm
from fxcompress.passes.l4q import l4q_pass

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS = ("float", "float+lora", "rtn", "lsq", "l4q", "qlora", "qalora")
HELDOUT_PLAYS = 4  # the last four documents (all plays) in the corpus' file order
SETTINGS = "4:64,3:64,2:32"  # SmolLM2's hidden size 576 is not a multiple of 128
LABELS = {
    "float": "float (the model as loaded)",
    "float+lora": "float + LoRA (peft; upper bound)",
    "rtn": "RTN",
    "lsq": "LSQ-only QAT (learned s, b)",
    "l4q": "**L4Q** (LoRA + LSQ+, merged)",
    "qlora-a": "QLoRA (a) as trained: NF4 + LoRA, mixed precision",
    "qlora-b": "QLoRA (b) merged, RTN re-quantized",
    "qalora": "QA-LoRA (ours, from the paper; RTN base), merged into zero points",
}


# --------------------------------------------------------------------------- data

def split_by_plays(tokenizer, tiny: bool):
    """(train ids, held-out ids, held-out titles): whole documents, never a play cut in two."""
    docs = corpus_documents("shakespeare")
    train_docs, held_docs = docs[:-HELDOUT_PLAYS], docs[-HELDOUT_PLAYS:]
    if tiny:  # a few documents, cut short: the smoke run must stay under 2 minutes
        train_docs = [(t, x[:40_000]) for t, x in train_docs[:2]]
        held_docs = [(t, x[:8_000]) for t, x in held_docs]
    enc = lambda ds: torch.tensor([i for _, x in ds for i in tokenizer.encode(x + "\n\n\n")], dtype=torch.long)
    return enc(train_docs), enc(held_docs), [t for t, _ in held_docs]


# --------------------------------------------------------------------------- helpers

def measured(fn, dev):
    """(result, seconds, peak MiB on CUDA or None)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out, time.time() - t0, torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None


def int_bits(bits, group):
    """Bits per weight of a group-quantized integer layer with an fp16 scale and an fp16 offset per group."""
    return bits + 32 / group


def rtn(model_gm, bits, group):
    return fxc.quantize_rtn(model_gm, fxc.RTNConfig(bits=bits, symmetric=False, granularity="per_group",
                                                    group_size=group, targets=None, exclude=("lm_head",),
                                                    include_conv=False))


def lora_config(args):
    import peft
    return peft.LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=list(TARGETS), lora_dropout=0.0,
                           bias="none")


def trainable_groups(model, lr):
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "name": "lora"}]


def to_nf4(model: nn.Module, dev) -> nn.Module:
    """The target linears of ``model`` (a copy) as bitsandbytes NF4 ``Linear4bit`` (block 64, fp32 compute)."""
    import bitsandbytes as bnb
    model = copy.deepcopy(model).cpu()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", quant_storage=torch.uint8)
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         blocksize=64)
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.data.clone(), requires_grad=False)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], q)
    model.is_loaded_in_4bit = True  # what peft reads to wrap Linear4bit with its QLoRA layer (as from_pretrained sets)
    return model.to(dev)  # .to(cuda) quantizes the Params4bit weights


def merge_lora(peft_model, dequant=None) -> nn.Module:
    """The peft model's base with every LoRA-wrapped linear replaced by ``nn.Linear(dequant(base W) + delta)``
    (in place: the peft model is used up).  ``dequant`` maps the wrapped base layer to its float weight
    (default: its ``weight``; QLoRA: the bitsandbytes NF4 dequantization)."""
    from peft.tuners.lora import LoraLayer
    base = peft_model.get_base_model()
    wrapped = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    if not wrapped:
        raise ValueError("merge_lora: no LoRA layer in the model")
    for name, mod in wrapped:
        bl = mod.get_base_layer()
        w = (dequant(bl) if dequant is not None else bl.weight.detach()).float()
        for adapter in mod.active_adapters:
            w = w + mod.get_delta_weight(adapter).float()
        lin = nn.Linear(bl.in_features, bl.out_features, bias=bl.bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bl.bias is not None:
                lin.bias.copy_(bl.bias.detach().float())
        lin.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, lin)
    return base


def dequant_nf4(layer) -> torch.Tensor:
    from peft.utils.integrations import dequantize_bnb_weight
    return dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state)


class QALoRALinear(nn.Module):
    """QA-LoRA (Xu et al., arXiv 2309.14717), implemented here from the paper: the frozen group-quantized
    weight plus a LoRA whose input is x average-pooled over each quantization group.  B·A then has one
    value per (row, group), i.e. it shifts every weight of a group by the same amount, which merges
    exactly into that group's zero point: zp' = zp - scaling·(B·A)/group / scale.  The base here is
    RTN (the paper uses GPTQ)."""

    def __init__(self, ql, rank: int, alpha: float):
        super().__init__()
        qw = ql.quant_weight
        if qw.spec.granularity != "per_group":
            raise ValueError("QA-LoRA needs per-group quantization")
        self.spec, self.group = qw.spec, qw.spec.group_size
        out_f, in_f = qw.shape
        self.register_buffer("codes", qw.codes())
        self.register_buffer("qscale", qw.scale.clone())
        self.register_buffer("zero_point", qw.zero_point.clone())
        self.register_buffer("w", qw.dequantize(torch.float32))
        self.bias = ql.bias
        dev = self.w.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_f // self.group, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev))
        self.scaling = alpha / rank

    def forward(self, x):
        pooled = x.reshape(*x.shape[:-1], -1, self.group).mean(-1)
        return F.linear(x, self.w.to(x.dtype), self.bias) + self.scaling * F.linear(F.linear(pooled, self.lora_A),
                                                                                   self.lora_B)

    @torch.no_grad()
    def to_quant_linear(self):
        from fxcompress.nn import QuantLinear
        from fxcompress.quant import QuantWeight
        shift = self.scaling * (self.lora_B @ self.lora_A) / self.group  # (out, groups): one shift per group
        qw = QuantWeight.from_codes(self.codes, self.qscale, self.zero_point - shift / self.qscale, self.spec)
        return QuantLinear(qw, self.bias)


def swap_layers(gm, cls, make):
    """``gm`` (modified) with every ``cls`` submodule replaced by ``make(module)``."""
    for name, m in [(n, m) for n, m in gm.named_modules() if isinstance(m, cls)]:
        gm.add_submodule(name, make(m))
    return gm


def peer_unavailable(row, dev):
    """The reason a peer row cannot run here, or None."""
    if row in ("float+lora", "qlora") and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    if row == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install bitsandbytes; needs CUDA)"
        if dev.type != "cuda":
            return "bitsandbytes NF4 needs a CUDA device"
    return None


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--settings", default=None, help=f"bits:group,... (default {SETTINGS}; --tiny: 4:32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per trained row (default 400, tiny 6)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--quant-lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="smoke run: tiny random model, few documents")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--render-only", action="store_true", help="rebuild --out from --json; train nothing")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; choose from {ROWS}")
    if args.tiny:
        args.settings = args.settings or "4:32"
        args.steps = args.steps if args.steps is not None else 6
        args.batch, args.seq, args.eval_tokens, args.rank = 2, 64, 2048, 4
        args.out = args.out or "/tmp/l4q_peers_tiny.md"
        args.json = args.json or "/tmp/l4q_peers_tiny.json"
    args.settings = args.settings or SETTINGS
    args.steps = 400 if args.steps is None else args.steps
    args.out = args.out or "tools/results/l4q_peers.md"
    args.json = args.json or "tools/results/l4q_peers.json"
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]

    from fxcompress.models.smollm2 import load_smollm2, load_tokenizer, tiny_causal_lm
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 numerics for the comparison
    t_start = time.time()
    tok = load_tokenizer()
    train_ids, held_ids, held_titles = split_by_plays(tok, args.tiny)
    eval_batches = token_windows(held_ids, args.seq + 1, args.batch, max_tokens=args.eval_tokens + args.seq + 1)
    train_batches = token_windows(train_ids, args.seq + 1, args.batch, shuffle=True, seed=args.seed)
    if args.render_only:
        name = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"
        text = render(json.loads(Path(args.json).read_text()), args, name, held_titles, None)
        Path(args.out).write_text(text)
        print(text)
        return
    if args.tiny:
        base = tiny_causal_lm(seed=args.seed, vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                              num_heads=4, num_kv_heads=2).to(dev)
        model_name = "tiny random-init CausalLM (2 layers, d=64) with SmolLM2's tokenizer (smoke run)"
    else:
        base = load_smollm2().to(dev)
        model_name = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"
    gm = fxc.capture(base, (train_batches[0][:1, :-1].to(dev),))
    train_kw = dict(device=dev, progress=False, log_every=100)

    store = Path(args.json)
    entries = json.loads(store.read_text()) if store.exists() else {}

    def save():
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(entries, indent=1, sort_keys=True))

    def put(row, setting, ppl, bits, merges, train=None, note=""):
        e = dict(row=row, setting=setting, ppl=ppl, bits=bits, merges=merges, note=note, seed=args.seed,
                 steps=args.steps, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
                 date=time.strftime("%Y-%m-%d %H:%M"))
        if train:
            (losses, secs, peak) = train
            e.update(train_s=secs, peak_mib=peak, loss_first=losses[0], loss_last=losses[-1])
        entries[f"{row}|{setting}|{args.seed}"] = e
        save()  # at once: a later row that fails does not lose this one
        print(json.dumps(e), flush=True)

    def skip(row, setting, reason):
        entries[f"{row}|{setting}|{args.seed}"] = dict(row=row, setting=setting, skipped=reason, seed=args.seed)
        save()
        print(f"skip {row} {setting}: {reason}", flush=True)

    def torch_seed():
        torch.manual_seed(args.seed)

    if "float" in rows:
        put("float", "-", perplexity(gm, eval_batches, dev), "16 (bf16) / 32 as evaluated", "no (float)")
    if "float+lora" in rows:
        why = peer_unavailable("float+lora", dev)
        if why:
            skip("float+lora", "-", why)
        else:
            import peft
            torch_seed()
            pm = peft.get_peft_model(copy.deepcopy(base), lora_config(args))
            groups = trainable_groups(pm, args.lora_lr)
            (losses, secs, peak) = measured(
                lambda: train_lm(pm, train_batches, args.steps, param_groups=groups, **train_kw), dev)
            put("float+lora", "-", perplexity(pm, eval_batches, dev), "16 (bf16, LoRA merged)", "no (float)",
                (losses, secs, peak))
            del pm
    for bits, group in settings:
        setting = f"{bits}-bit g{group}"
        if "rtn" in rows:
            put("rtn", setting, perplexity(rtn(gm, bits, group), eval_batches, dev), f"{int_bits(bits, group):.2f}",
                "yes")
        for row, lora in (("lsq", False), ("l4q", True)):
            if row not in rows:
                continue
            torch_seed()
            cfg = fxc.L4QConfig(bits=bits, group_size=group, lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                                lora=lora)
            qm = l4q_pass(gm, cfg).gm
            (losses, secs, peak) = measured(lambda: train_lm(qm, train_batches, args.steps, lora_lr=args.lora_lr,
                                                             quant_lr=args.quant_lr, **train_kw), dev)
            dm = fxc.convert_l4q(qm)
            put(row, setting, perplexity(dm, eval_batches, dev), f"{int_bits(bits, group):.2f}", "yes",
                (losses, secs, peak), note="converted integer model")
            qm = dm = None  # free before the next row
        if "qalora" in rows:
            from fxcompress.nn import QuantLinear
            torch_seed()
            qa = swap_layers(rtn(gm, bits, group), QuantLinear, lambda m: QALoRALinear(m, args.rank, 2.0 * args.rank))
            train = measured(lambda: train_lm(qa, train_batches, args.steps, param_groups=trainable_groups(
                qa, args.lora_lr), **train_kw), dev)
            ppl_unmerged = perplexity(qa, eval_batches, dev)
            merged = swap_layers(qa, QALoRALinear, QALoRALinear.to_quant_linear)
            ppl = perplexity(merged, eval_batches, dev)
            put("qalora", setting, ppl, f"{int_bits(bits, group):.2f}", "yes (fractional zero points)", train,
                note=f"unmerged ppl {ppl_unmerged:.4f}")
            del qa, merged
    if "qlora" in rows:
        why = peer_unavailable("qlora", dev)
        if why:
            for bits, group in settings:
                skip("qlora-b", f"{bits}-bit g{group}", why)
            skip("qlora-a", "NF4 g64", why)
        else:
            import peft
            torch_seed()
            pm = peft.get_peft_model(to_nf4(base, dev), lora_config(args))
            n_lora = sum(p.numel() for p in pm.parameters() if p.requires_grad)
            n_base = sum(m.in_features * m.out_features for n, m in base.named_modules()
                         if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)
            train = measured(lambda: train_lm(pm, train_batches, args.steps, param_groups=trainable_groups(
                pm, args.lora_lr), **train_kw), dev)
            put("qlora-a", "NF4 g64", perplexity(pm, eval_batches, dev),
                f"{4 + 32 / 64 + 16 * n_lora / n_base:.2f} (NF4 + fp32 absmax/64 + bf16 LoRA)", "no (mixed)", train)
            merged = merge_lora(pm, dequant_nf4)
            mgm = fxc.capture(merged, (train_batches[0][:1, :-1].to(dev),))
            for bits, group in settings:
                put("qlora-b", f"{bits}-bit g{group}", perplexity(rtn(mgm, bits, group), eval_batches, dev),
                    f"{int_bits(bits, group):.2f}", "yes", train, note="train time / memory of the NF4 run")
            del pm, merged, mgm

    save()
    text = render(entries, args, model_name, held_titles, time.time() - t_start)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


def render(entries, args, model_name, held_titles, secs):
    order = {"float": 0, "float+lora": 1, "rtn": 2, "lsq": 3, "qlora-a": 4, "qlora-b": 5, "qalora": 6, "l4q": 7}

    def key(e):
        s = e["setting"]
        bits = int(s.split("-")[0]) if s[0].isdigit() else (4 if s.startswith("NF4") else 99)
        return (s != "-", -bits, order.get(e["row"], 9))

    lines = [
        "# L4Q against peers: SmolLM2-135M, held-out Shakespeare perplexity",
        "",
        f"Model: {model_name}. Quantized: every q/k/v/o/gate/up/down projection, asymmetric, per group along the "
        f"input dimension; embeddings and the tied lm_head stay float. Held out by whole plays: "
        f"{', '.join(held_titles)} (the last {HELDOUT_PLAYS} documents; never trained on); perplexity over up to "
        f"{args.eval_tokens} of their tokens, windows of {args.seq + 1}.",
        f"Training, every trained row alike: `fxcompress.finetune.train_lm`, {args.steps} steps of {args.batch} x "
        f"{args.seq} tokens from the other plays in one shuffled order (seed {args.seed}), AdamW, 10% warm-up, "
        f"LoRA rank {args.rank}, alpha {2 * args.rank}, LoRA lr {args.lora_lr}, step-size/offset lr {args.quant_lr}.",
        "Deployable bits per quantized weight: integer bits + 32/group (fp16 scale and offset per group); QLoRA (a) "
        "adds the float adapters. 'Merges into integer weights': the trained result is one integer weight per "
        "layer with no adapter branch.",
        "",
        "| method | setting | held-out ppl | deployable bits/weight | merges into integer weights | train s | "
        "peak MiB | train loss first -> last | run |",
        "|---|---|---:|---|---|---:|---:|---|---|",
    ]
    for e in sorted(entries.values(), key=key):
        label = LABELS.get(e["row"], e["row"])
        if "skipped" in e:
            lines.append(f"| {label} | {e['setting']} | skipped: {e['skipped']} | | | | | | |")
            continue
        tr = (f"{e['train_s']:.0f}", f"{e['peak_mib']:.0f}" if e.get("peak_mib") else "-",
              f"{e['loss_first']:.3f} -> {e['loss_last']:.3f}") if "train_s" in e else ("-", "-", "-")
        lines.append(f"| {label} | {e['setting']} | {e['ppl']:.3f} | {e['bits']} | {e['merges']} | {tr[0]} | {tr[1]} | "
                     f"{tr[2]} | {e['device']}, {e['date']}, seed {e['seed']}, {e['steps']} steps"
                     f"{'; ' + e['note'] if e.get('note') else ''} |")
    lines += ["", *target_lines(entries), ""]
    if secs is not None:
        lines += [f"(last command took {secs:.0f} s)", ""]
    return "\n".join(lines)


def target_lines(entries) -> list[str]:
    """The issue's two targets, checked against the entries present (seed by seed)."""
    by = {(e["row"], e["setting"], e["seed"]): e["ppl"] for e in entries.values() if "ppl" in e}
    out = ["Targets (from the entries above):", ""]
    for (row, setting, seed), ppl in sorted(by.items()):
        if row != "l4q":
            continue
        up = by.get(("float+lora", "-", seed))
        if setting.startswith("4-bit") and up:
            out.append(f"- L4Q {setting} <= float + LoRA x 1.10 (seed {seed}): {ppl:.3f} vs {1.10 * up:.3f} "
                       f"(ratio {ppl / up:.3f}): {'holds' if ppl <= 1.10 * up else 'missed'}")
        ql = by.get(("qlora-b", setting, seed))
        if ql:
            out.append(f"- L4Q better than QLoRA merged + re-quantized, {setting} (seed {seed}): {ppl:.3f} vs "
                       f"{ql:.3f}: {'holds' if ppl < ql else 'missed'}")
    return out if len(out) > 2 else []


if __name__ == "__main__":
    main()
