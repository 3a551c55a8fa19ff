"""Apache TVM (Relax) backend: lower an integer-weight model, build it for CUDA or CPU, run it.

One concern per module (the package only re-exports):

* :mod:`.base` -- the guarded TVM import, :class:`TVMBackendError`, targets;
* :mod:`.config` -- :class:`TVMBuildConfig`, the frozen build knobs;
* :mod:`.importer` -- ``lower_to_relax``: torch.export + Relax import with packed-linear stand-ins;
* :mod:`.packing` -- codes -> uint32 words (``pack_words``, ``pack_mma_words``);
* :mod:`.emit` -- one quantized linear as a fused decode+matmul PrimFunc or a hand-written kernel;
* :mod:`.emit_conv` -- integer convolutions (int8 weight constants; int8 x int8 after activation quantization);
* :mod:`.kernels` -- the hand-scheduled CUDA kernels (CUDA-core GEMV, tensor-core mma) and the conv TE computes;
* :mod:`.transforms` -- fxcompress's Relax passes and the fusion sequence;
* :mod:`.rules` -- dlight schedule rules (small-batch GEMV, tuned GEMV);
* :mod:`.meta_schedule` -- MetaSchedule tuning with a reusable records database;
* :mod:`.build` -- ``build_tvm`` / ``compile_tvm`` / :class:`TVMBuild`.
"""
from .base import TVMBackendError, cuda_available, make_target
from .build import TVMBuild, build_tvm, compile_tvm
from .config import TUNERS, TVMBuildConfig
from .emit import emit_packed_linear, fxc_kind
from .importer import lower_to_relax
from .kernels import Tile
from .meta_schedule import meta_schedule_usable
from .packing import pack_mma_words, pack_words, unpack_words

__all__ = ["TVMBackendError", "TVMBuildConfig", "TVMBuild", "TUNERS", "build_tvm", "compile_tvm", "lower_to_relax",
           "emit_packed_linear", "fxc_kind", "make_target", "cuda_available", "meta_schedule_usable", "pack_words",
           "unpack_words", "pack_mma_words", "Tile"]
