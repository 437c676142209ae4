#!/usr/bin/env bash
# Everything benchmarks/gpu_check.py needs on a lent GPU machine that has no internet (the device tool of
# DEVELOPERS.md), prepared here in about a minute, so that the check is one call of the tool:
#   bash benchmarks/device_prep.sh
# writes two folders of this checkout that git ignores (.git/info/exclude) and the tool carries:
#   .whl/   hydra-core, omegaconf, antlr4-python3-runtime and airbench as wheels (all pure Python; the machine's image
#           has torch, torchvision, torchmetrics, tensorboard, onnx/onnxruntime, matplotlib, markdown, pillow);
#           TorchCodec is not carried: it is built for one torch version, and without it the check measures the raw
#           disk cache only (the JPEG one is recorded as skipped, with the reason)
#   .data/  the CIFAR-10 JPEG copy from ../shared/data
# and prints the call: carry [".whl", ".data"], timeout_s 560, and the command below. gpu_check.py keeps to 450 s
# (no part starts later) and writes $OUT/gpu_check.json and gpu_check.md (paste the .md into RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl .data
for d in /.whl/ /.data/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -f .whl/*.whl
quiet() { grep -v -e "^\[notice\]" -e "^WARNING: Location" || true; }
python3 -m pip download --no-deps -q -d .whl --only-binary=:all: hydra-core==1.3.2 omegaconf==2.3.0 2>&1 | quiet
python3 -m pip wheel --no-deps -q -w .whl antlr4-python3-runtime==4.9.3 airbench==0.1.8 2>&1 | quiet
for w in hydra_core omegaconf antlr4_python3_runtime airbench; do
    ls .whl/${w}-*.whl > /dev/null || { echo "no wheel of $w in .whl: see the messages above" >&2; exit 1; }
done
cp -u ../shared/data/cifar10-jpeg.tar.gz .data/
du -sh .whl .data
cat <<'EOF'
device tool, run: carry [".whl", ".data"], timeout_s 560, command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && nvidia-smi -L && python3 benchmarks/gpu_check.py --out $OUT --tarball .data/cifar10-jpeg.tar.gz 2>&1
EOF
