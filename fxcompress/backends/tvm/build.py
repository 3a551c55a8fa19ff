"""Build: lower an integer-weight graph to Apache TVM (Relax), fuse, schedule and compile it for CUDA or CPU.

    runner = compile_tvm(gm, example_inputs, target="cuda", tune="dlight")   # or "meta_schedule", target="llvm"
    y = runner(x)                                                            # torch in, torch out
    runner.export_library("model.so")                                        # + model.so.json (inputs, outputs)
    runner2 = fxcompress.runtime.load_runner("model.so", backend="tvm", device="cuda")

How it works
------------
1. **Import.**  A deep copy of the model is made in which every ``QuantLinear`` becomes a stub that calls
   the opaque custom op ``fxc_tvm::quant_linear(x, site, out_features)`` (a ``torch.library`` op with a
   fake implementation, so ``torch.export`` keeps it as one node), and every ``QuantConv2d`` becomes a
   float ``conv2d`` whose weight is the dequantized integer weight (**convolutions are dequantized to a
   constant float weight at import**: only linears keep packed integer weights).  The float parts go
   through ``torch.export`` and ``tvm.relax.frontend.torch.from_exported_program``; the custom op is
   converted by a ``custom_convert_map`` entry (TVM 0.27 signature ``fn(node, importer) -> relax.Var``).
2. **Packed weights.**  Each quantized linear is emitted as ONE TIR PrimFunc (``fused_decode_matmul``)
   built with ``te``: a ``dequantize`` block that decodes ``(q - zero_point) * scale`` from the packed
   ``uint32`` words, and a ``matmul`` reduction block that reads it (accumulating in float32, then a
   cast block when activations are fp16).  Codes are repacked along the input dim into ``uint32`` words,
   ``32 // bits`` codes a word, low bits first (MLC-LLM's group-quantization layout):
   int8 -> 4/word, int4 -> 8/word, int3 -> 10/word (30 of 32 bits used: 3.2 bits/weight, no code
   straddles a word), int2 -> 16/word.  Scales and zero points stay ``(rows, groups)`` in the activation
   dtype; zero points may be fractional (L4Q) and are applied exactly as ``(q - zp) * scale`` (signed
   codes are decoded as ``(u + qmin) - zp``, the same float operations as the torch reference).
   Symmetric layers with an all-zero zero point carry no zero-point tensor.  ``FuseOps``/``FuseTIR``
   then fuse elementwise epilogues (bias add, activations) into that PrimFunc; on CUDA the dlight rules
   inline the ``dequantize`` block into the GEMV / matmul reduction, so each quantized linear is one
   kernel that reads the packed words (``TVMRunner.kernel_names()`` / ``primfunc_names()`` show it).
   ``FoldConstant`` is deliberately left out of the pipeline: it would evaluate the decode of the
   constant packed weight at build time and store a float weight again.
3. **Schedules.**  ``target="cuda"``: quantized linears with fp16 activations are emitted directly as
   hand-scheduled PrimFuncs (:mod:`.kernels`; ``TVMBuildConfig.gemv_kernel``): int4 / int8 with 1..32 rows on
   tensor cores (``mma.m16n8k16`` from a fragment-ordered repacking of the codes, each weight read once for all
   rows), other int2 / 4 / 8 layers with 1..16 rows on a CUDA-core GEMV;
   everything else gets the ``tvm.s_tir.dlight`` GPU rules (Matmul, GEMV, LowBatchGEMV, Reduction,
   GeneralReduction, Fallback).  ``permute_dims`` of float constants (the importer's ``F.linear`` weights)
   is folded at build time.  ``target="llvm"``: TVM's default CPU lowering.
   ``tune="meta_schedule"``: tasks are tuned with MetaSchedule for ``trials`` trials into a JSON database
   in ``work_dir``; a later build with the same ``work_dir`` reuses records for the same workload and
   target (only untuned tasks are tuned) and warns about records for another target or shape, which it
   ignores.  Anything MetaSchedule did not schedule falls back to dlight (CUDA).

Errors: :class:`TVMBackendError` (a ``ValueError``) names the op / layer / device that cannot be handled.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...runtime.progress import Steps
from ...runtime.tvm_runner import TVMRunner
from .base import TVMBackendError, cuda_available, make_target, require_tvm
from .config import TUNERS, TVMBuildConfig
from .importer import lower_to_relax
from .inplace_cache import inplace_scatter
from ...runtime.native_logs import drop_native_stderr
from .meta_schedule import tune_meta_schedule
from .rules import dlight_pass
from .rules.conv_gemm import conv_gemm_pass
from .transforms import fuse_passes

__all__ = ["build_tvm", "compile_tvm", "TVMBuild"]

FORMAT_VERSION = 1


def _backend_pipeline(target):
    from tvm.relax.backend import cpu_generic, cuda

    return cuda.pipeline if target.kind.name == "cuda" else cpu_generic.pipeline


def _fused(mod, target, config: TVMBuildConfig, donate=()):
    tvm = require_tvm()
    if donate:
        mod = inplace_scatter(mod, donate, cuda=target.kind.name == "cuda")
    with target:
        return tvm.transform.Sequential(fuse_passes(epilogues=config.fuse_epilogues, norm_prologue=config.fuse_norm_prologue))(mod)


def _schedule(mod, target, tune: str, trials: int, work_dir, config: TVMBuildConfig, donate=()):
    require_tvm()
    stats = {}
    mod = _fused(mod, target, config, donate)
    if tune == "meta_schedule":
        mod, stats = tune_meta_schedule(mod, target, trials, work_dir, builder_timeout_s=config.ms_builder_timeout_s,
                                        cost_model=config.ms_cost_model)
    if target.kind.name == "cuda" and tune in ("dlight", "meta_schedule"):
        with target:
            mod = conv_gemm_pass()(mod)  # integer convs first (implicit GEMM); dlight skips what is scheduled
            mod = dlight_pass(target, config)(mod)
    elif target.kind.name == "cuda":  # tune="none": still needs thread bindings to run on a GPU
        from tvm.s_tir import dlight as dl

        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    return mod, stats


def _compete(info, target, trials, work_dir, config):
    """Hand-written linear kernels against tuned alternatives (:mod:`.compete`)."""
    from pathlib import Path

    from .compete import compete_hand_kernels
    from .meta_schedule import meta_schedule_usable, records_dir, tune_primfunc

    ok, why = meta_schedule_usable()
    if not ok:
        raise TVMBackendError(f"tune='meta_schedule' is not usable: {why}")
    rdir = records_dir(Path(work_dir), target)
    rdir.mkdir(parents=True, exist_ok=True)

    if config.ms_compete_trials is not None:
        trials = config.ms_compete_trials

    def tune_fn(func, log_dir, db):
        tune_primfunc(func, target, trials, log_dir, db, builder_timeout_s=config.ms_builder_timeout_s,
                      cost_model=config.ms_cost_model)

    return compete_hand_kernels(info.get("layers", []), target, rdir, trials, config, tune_fn)


def _finalize(mod, target):
    tvm = require_tvm()
    be = _backend_pipeline(target)
    with target:
        return tvm.transform.Sequential(be.dataflow_lower_passes(target) + be.finalize_passes(target))(mod)


@dataclass
class TVMBuild:
    """The result of :func:`build_tvm`: the executable, the scheduled Relax/TIR module and metadata."""

    executable: object
    scheduled: object  # IRModule after fusion + scheduling (before VM lowering)
    target: object
    info: dict = field(default_factory=dict)

    def primfunc_names(self) -> list[str]:
        tvm = require_tvm()
        return sorted(gv.name_hint for gv, f in self.scheduled.functions.items()
                      if isinstance(f, tvm.tirx.PrimFunc))

    def primfunc_script(self, name_contains: str = "") -> str:
        """TVMScript of the scheduled PrimFuncs whose name contains ``name_contains``."""
        tvm = require_tvm()
        return "\n".join(f.script() for gv, f in self.scheduled.functions.items()
                         if isinstance(f, tvm.tirx.PrimFunc) and name_contains in gv.name_hint)

    def device_source(self) -> str:
        """Generated device source (CUDA C for target cuda; empty for llvm)."""
        srcs = []

        def walk(m):
            for i in m.imports:
                try:
                    if i.kind in ("cuda",):
                        srcs.append(i.inspect_source())
                except Exception:  # noqa: BLE001
                    pass
                walk(i)

        walk(self.executable.mod)
        return "\n".join(srcs)

    def kernel_names(self) -> list[str]:
        """CUDA kernels in the built module (one per fused PrimFunc launch site)."""
        return sorted(set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", self.device_source())))


def build_tvm(model, example_inputs, target="cuda", tune: str = "dlight", *, trials: int = 64,
              work_dir=None, dtype: torch.dtype | None = None, accum_dtype: str = "float32",
              config: TVMBuildConfig | None = None, progress: bool = False, donate=()) -> TVMBuild:
    """Import, fuse, schedule and compile (no device needed: ``target="cuda"`` builds on a machine
    without a GPU when nvcc / NVRTC is there).  ``config``: the kernel / schedule knobs
    (:class:`TVMBuildConfig`, default ``TVMBuildConfig()``); ``progress``: a progress bar on stderr.
    ``donate``: names of inputs the compiled function may overwrite: a scatter into one of them (a KV-cache
    write) updates its buffer in place and the function returns that buffer (:mod:`.inplace_cache`), as does the
    fused decode attention (``fxc_lm::decode_attention``, :mod:`.kernels.decode_attention`) on its caches; the
    caller must not reuse the input's old contents."""
    tvm = require_tvm()
    config = TVMBuildConfig() if config is None else config
    if not isinstance(config, TVMBuildConfig):
        raise TVMBackendError(f"config must be a TVMBuildConfig, got {type(config).__name__}")
    if tune not in TUNERS:
        raise TVMBackendError(f"tune must be one of {TUNERS}, got {tune!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise TVMBackendError(f"trials must be an int >= 0, got {trials!r}")
    if tune == "meta_schedule" and work_dir is None:
        raise TVMBackendError("tune='meta_schedule' needs work_dir (the records database, reused next time)")
    tgt = make_target(target)
    if tune == "meta_schedule" and tgt.kind.name == "llvm" and "num-cores" not in tgt.attrs:
        from tvm.target import Target

        tgt = Target({**tgt.export(), "num-cores": os.cpu_count() or 1})  # MetaSchedule needs it
    bar = Steps(["import", "schedule", "lower", "compile"], "TVM build", enabled=progress)
    with bar, drop_native_stderr():
        if isinstance(model, tvm.IRModule):
            mod, info = model, {"inputs": [], "outputs": ["output_0"], "layers": []}
        else:
            mod, info = lower_to_relax(model, example_inputs, dtype=dtype, accum_dtype=accum_dtype,
                                       cuda=tgt.kind.name == "cuda", config=config, donate=donate)
        competed = {}
        if tune == "meta_schedule" and tgt.kind.name == "cuda" and config.gemv_kernel == "fxc" and config.ms_compete:
            won, competed = _compete(info, tgt, trials, work_dir, config)
            if won - config.te_linears:  # a tuned kernel measured faster than a hand-written one: emit te there
                config = replace(config, te_linears=config.te_linears | won)
                mod, info = lower_to_relax(model, example_inputs, dtype=dtype, accum_dtype=accum_dtype, cuda=True,
                                           config=config, donate=donate)
        bar.next()
        sched, stats = _schedule(mod, tgt, tune, trials, work_dir, config, tuple(donate))
        stats = dict(stats, **competed)
        bar.next()
        final = _finalize(sched, tgt)
        bar.next()
        try:
            ex = tvm.compile(final, target=tgt, relax_pipeline=None)
        except Exception as e:  # noqa: BLE001
            raise TVMBackendError(f"tvm.compile for target {tgt.kind.name} failed: {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        bar.next()
    info = dict(info, target=tgt.kind.name, target_str=str(tgt), tune=tune, tuning=stats)
    names = [gv.name_hint for gv, f in sched.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    info["fused_decode_primfuncs"] = sorted(n for n in names if "decode" in n or "fxc_packed" in n)
    return TVMBuild(ex, sched, tgt, info)


def compile_tvm(gm: nn.Module, example_inputs, target="cuda", tune: str = "dlight", *, device: str | None = None,
                trials: int = 64, work_dir=None, dtype: torch.dtype | None = None,
                accum_dtype: str = "float32", config: TVMBuildConfig | None = None, progress: bool = False):
    """Lower ``gm`` (a model with QuantLinear / QuantConv2d layers) to TVM and return a runner.

    ``target``: ``"cuda"`` or ``"llvm"``; ``tune``: ``"dlight"`` (rule-based GPU schedules; the default
    CPU lowering on llvm), ``"meta_schedule"`` (``trials`` trials, records in ``work_dir`` reused next
    time) or ``"none"``.  ``dtype`` (e.g. ``torch.float16``) runs the float parts and activations in that
    dtype.  ``config``: kernel / schedule knobs (:class:`TVMBuildConfig`).  Raises :class:`TVMBackendError` for a CUDA target when TVM sees no GPU (use
    :func:`build_tvm` to only compile).
    """
    require_tvm()
    tgt_name = target.get("kind") if isinstance(target, dict) else getattr(getattr(target, "kind", None), "name",
                                                                          target)
    if device is None:
        device = "cuda" if str(tgt_name).startswith("cuda") else "cpu"
    if str(device).startswith("cuda") and not cuda_available():
        raise TVMBackendError(f"target={tgt_name!r} / device={device!r} needs a CUDA GPU visible to TVM, and none "
                              "was found (tvm.cuda(0).exist is False). Use target='llvm' on this machine, or "
                              "build_tvm(..., target='cuda') to only compile.")
    b = build_tvm(gm, example_inputs, target, tune, trials=trials, work_dir=work_dir, dtype=dtype,
                  accum_dtype=accum_dtype, config=config, progress=progress)
    return TVMRunner(b.executable, device, b.info, build=b)
