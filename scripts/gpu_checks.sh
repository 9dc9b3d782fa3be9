#!/usr/bin/env bash
# Every GPU check the open GPU work needs, in one command (a lent GPU machine is held for minutes,
# and every start costs time): the GPU tests, the T4 path's k-scaling with per-kernel profiles,
# the bf16 path's k-scaling at the notebooks' size, and the emulated T4 demo and notebook 03 in
# full mode on an OLMoE-1B-7B-shaped model. Each part has its own time limit and writes into
# OUT_DIR, so a part cut short still leaves the others' results.
#
#   bash scripts/gpu_checks.sh OUT_DIR [PARTS...]     # PARTS: tests t4 bf16 emulation (default all)
#
# Then, here: copy the JSON files to benchmarks/results/ under the scheme's names (INDEX.md),
# `python benchmarks/t4_projection.py <k_scaling t4> <k_scaling bf16> --notebooks <t4_emulation> --json`
# and `python scripts/render_results.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_checks.sh OUT_DIR [tests t4 bf16 emulation]}
shift
parts=${*:-tests t4 bf16 emulation}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
python3 -c "import torch, transformers, triton; print(torch.cuda.get_device_name(), torch.__version__,
transformers.__version__, triton.__version__)" | tee "$out/versions.txt"

for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)  # every test that skips without CUDA, T4 path (capability switch) included
      timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_paths.py tests/test_route_sync_free.py \
        tests/test_t4_path.py tests/test_faults.py tests/test_controls.py tests/test_task_accuracy.py \
        tests/test_nulls.py -k "not interpreter and not readme" > "$out/gpu_tests.txt" 2>&1 ;;
    t4)  # T4 path: prefill graphs as candidate beside the shipped path, per-kernel profiles
      timeout 320 python3 benchmarks/k_scaling.py --paths t4 --rounds 3 --new-tokens 16 --profile \
        --profile-workloads "prefill 8x256" "prefill 32x1024" "decode b1" --json "$out/k_scaling_t4.json" \
        > "$out/k_scaling_t4_log.txt" 2>&1 ;;
    bf16)  # bf16 path at the notebooks' size and decode, with the MoE block profile, and the logit screen's cost
      timeout 250 python3 benchmarks/k_scaling.py --paths bf16 --prefill 8x256 --decode-batches 1 --rounds 3 \
        --new-tokens 16 --profile --json "$out/k_scaling_bf16.json" > "$out/k_scaling_bf16_log.txt" 2>&1 ;;
    emulation)  # the demo and notebook 03 (full mode, offline: prose in WikiText-2's place) on the emulated T4
      timeout 560 python3 benchmarks/t4_emulation.py --work /tmp/t4 --steps build demo notebooks --notebooks 03 \
        --eval-datasets prose --timeout 480 --json "$out/t4_emulation.json" > "$out/t4_emulation_log.txt" 2>&1 ;;
    *) echo "unknown part: $part (tests, t4, bf16, emulation)" >&2; exit 2 ;;
  esac
  echo "$part: exit $? after $(( $(date +%s) - start )) s" | tee -a "$out/parts.txt"
done
