#!/usr/bin/env bash
# Packs onnxruntime-genai for the GPU machine (no network there) into the git-ignored chunk folder
# .gpu/ogenai (~18 MiB): the onnxruntime-genai-cuda cp312 wheel, onnx-ir (its model builder's graph library,
# pure Python) and the pure-Python/small dependencies of onnx-ir that a torch image may lack (ml_dtypes,
# packaging), plus stage.sh, which installs them into /tmp/gpu-site.
# Run from the project root (here):   bash tools/stage_ort_genai.sh
# Then, on the GPU machine, AFTER the onnxruntime-gpu chunks of ../shared/gpu (genai loads the libonnxruntime.so
# of the `onnxruntime` package that Python finds first, so onnxruntime-gpu >= 1.31 must be in /tmp/gpu-site):
#   carry .gpu/ogenai   run: bash .gpu/ogenai/stage.sh    -> prints "ready: onnxruntime-genai-cuda 0.18.0 ..."
# and in the next commands:
#   PYTHONPATH=/tmp/gpu-site:$PWD python3 tools/bench_generate.py --device cuda --models wide --groups 128
set -euo pipefail
PY="${PYTHON:-python3}"
GENAI_VER="${GENAI_VER:-0.18.0}"; ONNX_IR_VER=1.1.0; ML_DTYPES_VER=0.6.0
CACHE="${GPU_PACK_CACHE:-/tmp/gpu-pack-cache}/ogenai"; mkdir -p "$CACHE"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
want=("onnxruntime-genai-cuda==$GENAI_VER" "onnx-ir==$ONNX_IR_VER" "ml_dtypes==$ML_DTYPES_VER" "packaging")
ls "$CACHE"/onnxruntime_genai_cuda-"$GENAI_VER"-cp312-*.whl "$CACHE"/onnx_ir-"$ONNX_IR_VER"-*.whl \
   "$CACHE"/ml_dtypes-"$ML_DTYPES_VER"-cp312-*.whl "$CACHE"/packaging-*.whl >/dev/null 2>&1 || \
  "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$CACHE" "${want[@]}"

rm -rf .gpu/ogenai; mkdir -p .gpu/ogenai
cp "$CACHE"/onnxruntime_genai_cuda-"$GENAI_VER"-cp312-*.whl "$CACHE"/onnx_ir-"$ONNX_IR_VER"-*.whl \
   "$CACHE"/ml_dtypes-"$ML_DTYPES_VER"-cp312-*.whl "$(ls "$CACHE"/packaging-*.whl | tail -1)" .gpu/ogenai/
cat > .gpu/ogenai/stage.sh <<'STAGE'
#!/usr/bin/env bash
# Device side of tools/stage_ort_genai.sh: installs onnxruntime-genai-cuda and onnx-ir into /tmp/gpu-site;
# ml_dtypes and packaging only where the image has none (onnx in the image brings its own ml_dtypes).
set -euo pipefail
D="$(cd "$(dirname "$0")" && pwd)"; SITE=/tmp/gpu-site
mkdir -p "$SITE"
whl=("$D"/onnxruntime_genai_cuda-*.whl "$D"/onnx_ir-*.whl)
for mod in ml_dtypes packaging; do
  PYTHONPATH="$SITE" python3 -c "import $mod" 2>/dev/null || whl+=("$D"/"$mod"-*.whl)
done
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "${whl[@]}"
echo "installed: $(for w in "${whl[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
PYTHONPATH="$SITE" python3 - <<'PY'
import torch  # first: its CUDA 13 libraries (cublas, cufft, curand, cudart) serve genai's CUDA library too
import onnxruntime as ort
import onnx_ir
import onnxruntime_genai as og
print(f"ready: {og.__id__} {og.__version__} on onnxruntime {ort.__version__} ({ort.__file__}), "
      f"onnx-ir {onnx_ir.__version__}, providers {ort.get_available_providers()}")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print("WARNING: this onnxruntime has no CUDA EP: stage onnxruntime-gpu (../shared/gpu, ort chunks) first")
PY
PYTHONPATH="$SITE" python3 -c "import onnxruntime_genai.models.builder" && echo "model builder: importable"
STAGE
chmod +x .gpu/ogenai/stage.sh
du -sh .gpu/ogenai | sed 's/^/  /'; ls -la .gpu/ogenai
