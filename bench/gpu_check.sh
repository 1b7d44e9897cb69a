#!/bin/bash
# The GPU check of the train stage, as one run (about 7 minutes on one H200, at most about 8.5: estimated, nothing
# here has run on a GPU yet):
#   1. the GPU tests of the packed path: torch's varlen kernels against sdpa per conversation (bf16, GQA, padded
#      cu_seq_lens), and the `auto` plan training a tiny model through varlen + compiled layers (compiles in the
#      first step only, the loss falls);
#   2. bench/train_throughput.py: the plain baselines and the workbench path (eager and compiled, 8k and 16k
#      tokens per step), then QLoRA (nf4, double quantization) through the workbench path (loss falls, adapter
#      saved, tokens/s and peak reported). Results: $OUT/train_throughput.json (default bench/results/).
#
#   bash bench/gpu_check.sh                       # everything
#   bash bench/gpu_check.sh wb_compile_16k,...    # only these benchmark configs, no tests (a rerun)
#   bash bench/gpu_check.sh --tiny                # the same steps on a CPU: a 2-layer model, seconds per config
#
# Packages the GPU machine lacks travel as wheels in .whl/ (git-ignored), installed into a temporary directory
# first, like this (Python 3.12, x86-64; the versions of pyproject.toml):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl trl==1.16.0 peft==0.21.2 datasets==5.2.0 bitsandbytes==0.50.2 \
#     liger-kernel==0.8.5 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types typing-inspection
set -o pipefail
cd "$(dirname "$0")/.."
TINY=""
CONFIGS=""
case "$1" in
  --tiny) TINY="--tiny" ;;
  "") ;;
  *) CONFIGS="$1" ;;
esac
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ -z "$TINY" ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU machine's wheels (--tiny runs here)
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH="$SITE"
fi
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, transformers, peft, trl, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'accelerate',
accelerate.__version__); from torch.nn.attention import varlen; print('varlen_attn: yes')" || exit 1
$PY -c "import importlib.util as u
print({m: bool(u.find_spec(m)) for m in ['bitsandbytes', 'liger_kernel', 'flash_attn', 'triton']})"

status=0
if [ -z "$CONFIGS" ]; then
  echo "== 1. GPU tests (tests/unit/train/test_train_packing.py -m gpu)"
  timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/unit/train/test_train_packing.py 2>&1 \
    | tee "$OUT_DIR/gpu_tests.log" | tail -15 || status=1
fi

echo "== 2. throughput (bench/train_throughput.py)"
# --deadline stops starting configs (and cuts the running one short) so that the whole check ends in time
$PY bench/train_throughput.py $TINY ${CONFIGS:+--configs "$CONFIGS"} --deadline "${DEADLINE:-330}" \
  --timeout "${CONFIG_TIMEOUT:-150}" --out "$OUT_DIR/train_throughput.json" 2>"$OUT_DIR/bench_stderr.log" \
  | tee "$OUT_DIR/bench.log" || status=1

echo "== QLoRA through the workbench path"
$PY - "$OUT_DIR/train_throughput.json" <<'EOF' || status=1
import json, sys
doc = json.load(open(sys.argv[1]))
r = next((r for r in doc["results"] if r["config"] == "wb_qlora_8k"), None)
if r is None:
    print("wb_qlora_8k: not in this run")
elif "tokens_per_s" not in r:
    print("wb_qlora_8k:", r.get("skipped") or r.get("error"))
    sys.exit(0 if "skipped" in r else 1)
else:
    falls = r["loss_last"] < r["loss_first"]
    print(f"wb_qlora_8k: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} ({'falls' if falls else 'DOES NOT FALL'}); "
          f"adapter saved: {r['adapter_saved']} ({r['adapter_bytes']} bytes); {r['tokens_per_s']:.0f} real tokens/s; "
          f"peak {r['peak_mem_gib']} GiB")
    sys.exit(0 if falls and r["adapter_saved"] else 1)
EOF
echo "gpu_check: done in ${SECONDS} s, status $status (results in $OUT_DIR)"
exit $status
