"""Hand-scheduled TIR kernels for packed integer linears on CUDA (one kernel per file)."""
from .epilogue import EPILOGUES, Epilogue, swiglu_row_order
from .cuda_core_gemv import Tile, packed_gemv_primfunc, supports, tile_for
from .mma_gemv import DEFAULT_MMA_TILES, mma_supports, mma_tile, packed_mma_primfunc

__all__ = ["Tile", "packed_gemv_primfunc", "supports", "tile_for", "DEFAULT_MMA_TILES", "mma_supports", "mma_tile",
           "packed_mma_primfunc", "EPILOGUES", "Epilogue", "swiglu_row_order"]
