#!/usr/bin/env bash
# Device side of tools/prep_lm_gpu.sh (copied into .gpu/smol1 and .gpu/smol2).
# Installs the wheels carried in this chunk into /tmp/gpu-site, copies the GGUF part to
# /tmp/gpu-stage, and once both parts are there joins them and checks the sha256.
# Afterwards:  export PYTHONPATH=/tmp/gpu-site:$PWD FXCOMPRESS_SMOLLM2_GGUF=/tmp/gpu-stage/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
D="$(cd "$(dirname "$0")" && pwd)"; S=/tmp/gpu-stage; SITE=/tmp/gpu-site
mkdir -p "$S" "$SITE"
shopt -s nullglob
whl=("$D"/*.whl)
if [ ${#whl[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "${whl[@]}"
  echo "installed: $(for w in "${whl[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
fi
read -r base n sum < "$D/manifest"
if [ -f "$S/$base" ] && echo "$sum  $S/$base" | sha256sum -c --quiet - 2>/dev/null; then
  echo "ready: $S/$base (already staged)"; exit 0
fi
cp "$D"/*.part* "$S/"
have=$(ls "$S" | grep -c "^$base.part" || true)
echo "staged $have of $n part(s) of $base"
[ "$have" -lt "$n" ] && exit 0
cat "$S/$base".part* > "$S/$base.tmp"
if ! echo "$sum  $S/$base.tmp" | sha256sum -c --quiet -; then
  echo "checksum mismatch: stage again"; rm -f "$S/$base".part* "$S/$base.tmp"; exit 1
fi
mv "$S/$base.tmp" "$S/$base"; rm -f "$S/$base".part*
echo "ready: $S/$base"
echo "use:   export PYTHONPATH=$SITE:\$PWD FXCOMPRESS_SMOLLM2_GGUF=$S/$base"
