#!/usr/bin/env bash
# One call on a lent GPU machine: the kernel tests under real Triton, the kernel microbenchmark, and
# bench.gpu (the whole query path on CUDA). Results go to $OUT (default bench/results/gpu).
#
# That machine has torch, Triton and transformers but no registry: wheels it lacks travel in .whl/
# (faiss-cpu, lmdb, this repo's transformers) and the tokenizer in .gpu/tokenizer. Prepare them here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl faiss-cpu==1.15.1 lmdb==3.0.0 transformers==5.24.0
#   python -c "from bench.gpu import load_tokenizer; load_tokenizer(None).save_pretrained('.gpu/tokenizer')"
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
  # The carried transformers needs the image's regex/hub/tokenizers to be recent enough; else use the image's.
  python3 -c "import transformers.models.llama" 2>/dev/null \
    || { echo "carried transformers does not import here: using the image's"; rm -rf /tmp/site/transformers*; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
                                                   'transformers', transformers.__version__)"
echo "== kernel tests (real Triton)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_*.py >"$OUT/kernel-tests.log" 2>&1
echo "rc $?"; tail -n 25 "$OUT/kernel-tests.log"
echo "== kernel microbenchmark"
timeout 100 python3 -m bench.kernels --out "$OUT/kernels.json" >"$OUT/kernels.log" 2>&1
echo "rc $?"; tail -n 30 "$OUT/kernels.log"
echo "== query path on CUDA"
timeout 270 python3 -m bench.gpu --tokenizer .gpu/tokenizer --out-dir "$OUT/rag" "$@" >"$OUT/gpu.log" 2>&1
echo "rc $?"; grep -E "^\| |checks|engine|wrote|Error|error" "$OUT/gpu.log" | tail -n 40
tar -C "$OUT" -czf "$OUT/rag.tgz" rag 2>/dev/null && rm -rf "$OUT/rag"
