"""The knobs of a TVM build, as one frozen object passed to ``compile_tvm`` / ``build_tvm``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

TUNERS = ("dlight", "meta_schedule", "none")
GEMV_KERNELS = ("fxc", "dlight")
DECODE_MODES = ("magic", "convert")
# keys of dlight's CUDA GEMV inner-reduction parameters that ``gemv_cuda`` may override
GEMV_CUDA_KEYS = ("TS", "TR", "TILE_R", "VEC_C", "VEC_LOAD", "UNROLL", "LOAD_V_SHARED", "LOAD_V_VEC")
TILE_CASES = ("batch1", "batch1_large_k", "batch4", "batch")
MMA_TILE_CASES = ("small", "batch")
MMA_BATCH_TILE_CASES = ("rows16", "rows32")  # kernels.mma_batch.BATCH_TILE_CASES: up to 16 rows / 17..32 rows
MS_COST_MODELS = ("auto", "xgb", "random")


@dataclass(frozen=True)
class TVMBuildConfig:
    """How quantized linears are emitted and scheduled for CUDA (the llvm target only reads ``decode_mode``).

    ``gemv_kernel``: "fxc" = the hand-scheduled packed kernels of :mod:`.kernels` (tensor cores for int4 / int8,
    a CUDA-core GEMV otherwise) for fp16 layers with 1..32 (tensor cores) / 1..16 (CUDA cores) activation rows
    where they support the layer;
    "dlight" = the fused te decode+matmul scheduled by dlight's rules (always used for the other layers).
    ``decode_mode``: how a packed code becomes a float inside the fused te kernel -- "magic": integer ops only,
    ``(word >> shift) & mask | exponent`` reinterpreted as a float (2**23 + u for fp32, 1024 + u for fp16)
    minus that constant (exact, no int->float instruction, which runs at 1/8 of the FMA rate on sm_80/sm_90);
    "convert": ``.astype(float)`` of the extracted code.
    ``small_batch_max_m``: quantized linears scheduled by dlight (the layers no hand-written kernel takes) with
    2..M activation rows get a GEMV-style schedule (one pass over the packed weight for all rows) instead of
    dlight's tiled Matmul; 0 turns it off.  It does not limit the hand-written kernels (the tensor-core kernel
    takes 1..32 rows); it stays 16 because the GEMV-style schedule at 17..32 rows is unmeasured.
    ``gemv_cuda``: overrides of dlight's batch-1 CUDA GEMV parameters (keys :data:`GEMV_CUDA_KEYS`; None keeps
    dlight's choice).
    ``tiles``: CUDA-core kernel tile overrides by case (:data:`TILE_CASES`), e.g. ``{"batch": Tile(8, 4, 1)}``.
    ``mma_min_m``: batch sizes from here up use the tensor-core kernel; ``mma_tiles``: its (warps, prefetch) by
    case (:data:`MMA_TILE_CASES`).
    ``mma_batch``: layers with ``mma_batch_min_m``..32 rows (int4 / int8, fp16) use the tensor-core batch kernel
    :mod:`.kernels.mma_batch` ("fxc_mma_batch": each warp reuses an activation fragment for several 16-feature row
    tiles); False keeps :mod:`.kernels.mma_gemv` ("fxc_mma") for every batch it takes.  ``mma_batch_tiles``: its
    ``(row_tiles, warps, prefetch, stage)`` by case (:data:`MMA_BATCH_TILE_CASES`: "rows16" = up to 16 rows,
    "rows32" = 17..32), ints with row_tiles 1..8, warps 1..16, prefetch 1..16, stage 0 / 1 (activations read from
    global memory / staged in shared memory); None: ``kernels.mma_batch.DEFAULT_BATCH_TILES``.
    ``ms_builder_timeout_s``: MetaSchedule's per-candidate build timeout (``tune="meta_schedule"``; its 30 s default
    times out most CUDA candidates); ``ms_cost_model``: "auto" (xgboost when installed, else random), "xgb" or
    "random"; ``ms_compete``: on CUDA, each hand-written quantized-linear kernel competes with the MetaSchedule-tuned
    fused decode+matmul of the same layer (both measured on the GPU in one process; the faster one is emitted and
    the choice is stored beside the records); False keeps the hand-written kernels untimed. ``ms_compete_trials``:
    MetaSchedule trials for each competing layer's tuned kernel (None: the build's ``trials``, which is the budget
    for the whole model).
    ``fuse_epilogues``: fewer kernels per decode step (:func:`.transforms.fuse_passes`): the residual add and
    ``silu(gate) * up`` computed inside the hand-written quantized-linear kernels, a split's parts fused into their
    consumers, each RMSNorm one kernel (unless ``fuse_norm_prologue``). On by default (their GPU parity tests, ``tests/test_tvm_decode_epilogue.py
    -m gpu``, passed on an H100 on 2026-11-27); False builds the unfused kernels.
    ``fuse_norm_prologue`` (with ``fuse_epilogues``): an RMSNorm feeding only 1..4-row tensor-core kernels is computed
    inside them (:func:`.transforms.rms_norm_prologue_pass`). Off by default: on an H100 (2026-11-27,
    ``tools/results/generate_profile.md`` run 4) it made the 2048-wide decode step slower -- every block re-reads
    and reduces the row before its first mma (q/k/v 4.9 -> 7.0 µs, gate/up 7.1 -> 11.3 µs a layer) for ~1.6 µs
    saved per norm kernel.
    ``te_linears``: quantized-linear signatures ``(rows, K, N, bits, group_size)`` emitted as the te fused
    decode+matmul even where a hand-written kernel applies (``tune="meta_schedule"`` fills it with the layers whose
    tuned kernel measured faster; rarely set by hand).
    """

    gemv_kernel: str = "fxc"
    decode_mode: str = "magic"
    small_batch_max_m: int = 16
    gemv_cuda: Mapping | None = None
    tiles: Mapping | None = None
    mma_min_m: int = 1
    mma_tiles: Mapping | None = None
    mma_batch: bool = True
    mma_batch_min_m: int = 5
    mma_batch_tiles: Mapping | None = None
    ms_builder_timeout_s: float = 120.0
    ms_cost_model: str = "auto"
    ms_compete: bool = True
    ms_compete_trials: int | None = None
    te_linears: frozenset = frozenset()
    fuse_epilogues: bool = True
    fuse_norm_prologue: bool = False

    def __post_init__(self):
        if not isinstance(self.fuse_epilogues, bool):
            raise ValueError(f"TVMBuildConfig.fuse_epilogues must be a bool, got {self.fuse_epilogues!r}")
        if not isinstance(self.fuse_norm_prologue, bool):
            raise ValueError(f"TVMBuildConfig.fuse_norm_prologue must be a bool, got {self.fuse_norm_prologue!r}")
        if self.gemv_kernel not in GEMV_KERNELS:
            raise ValueError(f"TVMBuildConfig.gemv_kernel must be one of {GEMV_KERNELS}, got {self.gemv_kernel!r}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"TVMBuildConfig.decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        if isinstance(self.ms_builder_timeout_s, bool) or not isinstance(self.ms_builder_timeout_s, (int, float)) \
                or not self.ms_builder_timeout_s > 0:
            raise ValueError(f"TVMBuildConfig.ms_builder_timeout_s must be a number > 0, got {self.ms_builder_timeout_s!r}")
        if self.ms_cost_model not in MS_COST_MODELS:
            raise ValueError(f"TVMBuildConfig.ms_cost_model must be one of {MS_COST_MODELS}, got {self.ms_cost_model!r}")
        if not isinstance(self.mma_batch, bool):
            raise ValueError(f"TVMBuildConfig.mma_batch must be a bool, got {self.mma_batch!r}")
        if isinstance(self.mma_batch_min_m, bool) or not isinstance(self.mma_batch_min_m, int) \
                or not 1 <= self.mma_batch_min_m <= 32:
            raise ValueError(f"TVMBuildConfig.mma_batch_min_m must be an int in 1..32, got {self.mma_batch_min_m!r}")
        if not isinstance(self.ms_compete, bool):
            raise ValueError(f"TVMBuildConfig.ms_compete must be a bool, got {self.ms_compete!r}")
        if self.ms_compete_trials is not None and (isinstance(self.ms_compete_trials, bool) or not isinstance(
                self.ms_compete_trials, int) or self.ms_compete_trials < 0):
            raise ValueError(f"TVMBuildConfig.ms_compete_trials must be None or an int >= 0, got "
                             f"{self.ms_compete_trials!r}")
        try:
            te = frozenset(tuple(int(v) for v in sig) for sig in self.te_linears)
        except (TypeError, ValueError):
            te = None
        if te is None or any(len(sig) != 5 for sig in te):
            raise ValueError("TVMBuildConfig.te_linears must be a set of (rows, K, N, bits, group_size) int tuples, got "
                             f"{self.te_linears!r}")
        object.__setattr__(self, "te_linears", te)
        for name in ("small_batch_max_m", "mma_min_m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TVMBuildConfig.{name} must be an int >= 0, got {v!r}")
        for name, keys in (("gemv_cuda", GEMV_CUDA_KEYS), ("tiles", TILE_CASES), ("mma_tiles", MMA_TILE_CASES),
                           ("mma_batch_tiles", MMA_BATCH_TILE_CASES)):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ValueError(f"TVMBuildConfig.{name} must be a dict or None, got {type(v).__name__}")
            bad = sorted(set(v) - set(keys))
            if bad:
                raise ValueError(f"TVMBuildConfig.{name} has unknown key(s) {bad}; allowed: {list(keys)}")
            object.__setattr__(self, name, MappingProxyType(dict(v)))  # a read-only copy: the config stays frozen
        if self.mma_tiles is not None:
            for case, t in self.mma_tiles.items():
                if not (isinstance(t, tuple) and len(t) == 2 and all(isinstance(i, int) and i > 0 for i in t)):
                    raise ValueError(f"TVMBuildConfig.mma_tiles[{case!r}] must be (warps, prefetch) ints > 0, got {t!r}")
        if self.mma_batch_tiles is not None:
            for case, t in self.mma_batch_tiles.items():
                ok = isinstance(t, tuple) and len(t) == 4 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                  for i in t)
                if not ok or not (1 <= t[0] <= 8 and 1 <= t[1] <= 16 and 1 <= t[2] <= 16 and t[3] in (0, 1)):
                    raise ValueError(f"TVMBuildConfig.mma_batch_tiles[{case!r}] must be (row_tiles 1..8, warps 1..16, "
                                     f"prefetch 1..16, stage 0 / 1) ints, got {t!r}")
