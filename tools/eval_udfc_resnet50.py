"""UDFC on ResNet-50 (torchvision layout): coverage and what compensation recovers, on the CPU.

    PYTHONPATH=$PWD python tools/eval_udfc_resnet50.py [--prunes 0.1 0.3] [--crops 16]

No ResNet-50 weights ship in any package here (``../shared/research/data.md``), so the model is torchvision's
``resnet50`` at its random init with BatchNorm statistics set by one train-mode pass over real photo crops
(``fxcompress.data.images.photo_crops``): the BN moments UDFC reads then describe the activations those photos
produce.  Agreement is measured against that float model on a second, disjoint set of crops (top-1 agreement,
logit cosine).  Rows: UDFC (closed-form compensation) and the same pruning with ``compensate=False``, 8-bit
weights; the pass time is the whole ``udfc_pass``.  Writes ``tools/results/udfc_resnet50.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxcompress as fxc  # noqa: E402
from fxcompress.data.images import photo_crops  # noqa: E402
from fxcompress.models.vision import resnet50  # noqa: E402
from fxcompress.passes.udfc import UDFCConfig, udfc_pass  # noqa: E402

OUT = Path(__file__).parent / "results" / "udfc_resnet50.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prunes", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--crops", type=int, default=16, help="evaluation crops (the BN pass uses as many others)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    model = resnet50(num_classes=1000)
    crops = photo_crops(2 * a.crops, size=a.size, seed=1)
    bn_x, x = crops[: a.crops], crops[a.crops:]
    model.train()
    with torch.no_grad():
        model(bn_x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    lines = ["# UDFC on ResNet-50 (random init, BatchNorm statistics from real photo crops)", "",
             f"`PYTHONPATH=$PWD python tools/eval_udfc_resnet50.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f"; CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}. {a.crops} crops of "
             f"{a.size}x{a.size} set the BN statistics (one train-mode pass), {a.crops} other crops measure agreement "
             "with the float model. 8-bit per-channel weights in every row.", "",
             "| prune | compensation | layers pruned | convs quantized | params (M) | top-1 agree | logit cos | "
             "pass s |", "|---|---|---|---|---|---|---|---|"]
    for ratio in a.prunes:
        for comp in (True, False):
            t = time.time()
            res = udfc_pass(fxc.capture(model, (x[:1],)), UDFCConfig(prune_ratio=ratio, weight_bits=8, compensate=comp))
            secs = time.time() - t
            with torch.no_grad():
                y = res.gm.eval()(x)
            agree = float((y.argmax(1) == ref.argmax(1)).float().mean())
            cos = float(F.cosine_similarity(y, ref).mean())
            pruned = sum(r.action.startswith("pruned") for r in res.report)
            quant = sum("quantized" in r.action for r in res.report)
            params = sum(r.shape_after[0] * r.shape_after[1] * (r.shape_after[2] * r.shape_after[3]
                                                                  if len(r.shape_after) == 4 else 1)
                         for r in res.report) / 1e6
            lines.append(f"| {ratio:.0%} | {'UDFC' if comp else 'none (L2 pruning)'} | {pruned} | {quant} | "
                         f"{params:.2f} | {agree:.1%} | {cos:.4f} | {secs:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", f"Total {time.time() - t0:.0f} s. 'params': weights of the layers in UDFC's report (convs + fc) after "
              "pruning."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
