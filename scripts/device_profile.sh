#!/usr/bin/env bash
# Run a `peftplan profile` sweep on a lent GPU machine (no package registry there) and bring the
# records back. Run from the repository root, on the GPU machine:
#
#   bash scripts/device_profile.sh [SWEEP] [extra `peftplan profile` flags...]     # SWEEP: default | smoke | a file
#
# Prepare once, here (where pip reaches PyPI), the wheels the GPU image lacks or has in other versions
# (its python3 has torch, accelerate, rich, typer, pyyaml; not bitsandbytes, and other transformers/peft):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2
#
# and name `.whl` in the run's carry. Records go to profiles/<gpu-slug>/ there; because at most 8 files
# come back from $OUT, they travel as one archive: $OUT/profiles.tgz (unpack it here with
# `tar xzf profiles.tgz`), with the sweep's log beside it.
set -uo pipefail
SWEEP="${1:-default}"
shift || true
MINUTES="${MINUTES:-22}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
OUTDIR="${OUT:-/tmp/peftplan-out}"
mkdir -p "$OUTDIR"
PEFTPLAN=(python3 -c "import sys; from peftplan.cli import app; sys.argv[0] = 'peftplan'; app()")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUTDIR/nvidia-smi.txt"
python3 -m peftplan.harness.profile --probe | tee "$OUTDIR/probe.json"
"${PEFTPLAN[@]}" profile "$SWEEP" --out profiles --resume --max-minutes "$MINUTES" "$@" 2>&1 | tee "$OUTDIR/sweep.log"
status=${PIPESTATUS[0]}
"${PEFTPLAN[@]}" check profiles/ 2>&1 | tail -n 60 | tee "$OUTDIR/check.txt" || true
tar czf "$OUTDIR/profiles.tgz" profiles
exit "$status"
