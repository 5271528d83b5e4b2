#!/usr/bin/env bash
# One GPU session of measurements in one command: install the wheelhouse, print versions, run bench.throughput
# configurations (each its own process, JSON + log under $OUT), and print their tables last.
#
#   ../shared/device/make-wheelhouse.sh          # here, once: builds .whl/ (deepspeed, megatron-core, ...)
#   bash bench/gpu.sh levers                     # on the GPU machine, .whl carried: large preset, what each lever buys
#   bash bench/gpu.sh large | base               # on the GPU machine: the README table, one preset a call
#   bash bench/gpu.sh hostlight [ROW...]         # issue 12: today's ZeRO-2 against the hook-free ZeRO-0 path
#
# Results: $OUT/results.tar.gz (every configuration's JSON and log, profiler tables) and the tables printed last.
#
# A machine with CUDA torch, transformers and tokenizers already installed is assumed (see README, GPU install);
# BUDGET_S (default 560) stops starting new configurations when the time is nearly spent.
set -uo pipefail
mode=${1:-large}
# hostlight's rows in priority order, with their default limits (s); checked before anything is installed.
hostlight_rows=(large_b256_bf16autocast base_b64_bf16autocast large_b256_bf16autocast_model
                base_b64_bf16autocast_model large_b256_bf16autocast_deepcompile large_b256_fp16
                large_b512_bf16autocast base_b64_fp16)
declare -A limits=([large_b256_bf16autocast]=190 [base_b64_bf16autocast]=120 [large_b256_bf16autocast_model]=190
  [base_b64_bf16autocast_model]=110 [large_b256_bf16autocast_deepcompile]=150 [large_b256_fp16]=100
  [large_b512_bf16autocast]=90 [base_b64_fp16]=80)
case $mode in
  levers|large|base|base2|pad|host|hostlight_eager) ;;
  hostlight)
    for row in "${@:2}"; do
      [[ -n "${limits[$row]:-}" ]] || { echo "hostlight: no row $row (rows: ${hostlight_rows[*]})"; exit 2; }
    done ;;
  *) echo "usage: bash bench/gpu.sh levers|large|base|base2|pad|host|hostlight [ROW...]|hostlight_eager"; exit 2 ;;
esac
final=${OUT:-bench_out}
out=$(mktemp -d)
mkdir -p "$final"
budget=${BUDGET_S:-560}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
# DeepSpeed's op builder cannot parse "9.0a" (FusedAdam JIT fails); the extension cache is shared by the runs.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST_OVERRIDE:-9.0} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import sys, torch, deepspeed, megatron.core as m; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'megatron-core', m.__version__)" \
  | tee -a "$out/device.txt"

names=()
run_module() {  # run_module MODULE NAME SECONDS ARGS...: one benchmark process, skipped when the budget is spent
  local module=$1 name=$2 limit=$3; shift 3
  local left=$((budget - SECONDS))
  if ((left < 45)); then echo "$name: skipped (budget)"; return; fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" python3 -m "$module" --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1
  echo "$name: rc=$? after ${SECONDS}s"
  names+=("$name")
}
bench() { run_module bench.throughput "$@"; }       # bench NAME SECONDS ARGS...
hbench() { run_module bench.host_overhead "$@"; }   # hbench NAME SECONDS ARGS...

two=mlm:0.15,3ml-self:0.5
case $mode in
  levers)
    bench large_bf16autocast_compiled 240 --presets large --precisions bf16_autocast --compile
    bench large_bf16_compiled 110 --presets large --precisions bf16 --compile --runs $two
    bench large_bf16_eager 60 --presets large --precisions bf16 --runs $two
    bench large_bf16_eager_megatronfwd 60 --presets large --precisions bf16 --runs $two --linear-forward megatron
    bench large_fp16_compiled 110 --presets large --precisions fp16 --compile --runs $two
    ;;
  large|base)
    bench ${mode}_bf16autocast_compiled 230 --presets $mode --precisions bf16_autocast --compile \
      --profile "$out/${mode}_profile.txt"
    bench ${mode}_fp16_compiled 230 --presets $mode --precisions fp16 --compile
    bench ${mode}_bf16autocast_eager 90 --presets $mode --precisions bf16_autocast --runs $two
    ;;
  base2)  # base, then whether a bigger micro batch hides the per-step host time (large, batch 512)
    bench base_bf16autocast_compiled 230 --presets base --precisions bf16_autocast --compile
    bench base_fp16_compiled 120 --presets base --precisions fp16 --compile --runs $two
    bench large_b512_bf16autocast_compiled 150 --presets large --batch 512 --precisions bf16_autocast --compile \
      --runs $two
    ;;
  pad)  # base 3MLself: encoder length padded to a multiple of 8 (312) or 64 (320), profiled
    bench base_pad8 150 --presets base --precisions bf16_autocast --compile --runs $two --profile "$out/base_pad8_profile.txt"
    bench base_pad64 150 --presets base --precisions bf16_autocast --compile --runs $two --pad-multiple 64 \
      --profile "$out/base_pad64_profile.txt"
    ;;
  host)  # where the host time of a base step goes (profiler tables sorted by self CPU time)
    bench base_host 120 --presets base --precisions bf16_autocast --compile --runs $two --steps 10 \
      --profile "$out/base_host_profile.txt"
    ;;
  hostlight)  # issue 12: ZeRO-2 against the hook-free ZeRO-0 path (bench.host_overhead: per optimizer step,
              # wall ms, GPU-busy ms, MFU, measured/predicted speedup, host ops), the paper's shapes; base
              # reaches 64 x 512 per optimizer step through 2 accumulated micro batches of 32.
              # Compiled layers on both paths, and whole-model compile (--compile model, DeepSpeed's
              # engine.compile()) on the ZeRO-0 path for MLM and 3MLself only: one graph of the whole forward
              # and backward takes longest to compile (CPU, 24 layers: 1-2.5 min per architecture), so each
              # model run is two engines. In order of what the issue asks first (the two paths on both
              # presets, then whole-model compile on both); the budget skips the tail.
              # `bash bench/gpu.sh hostlight ROW...` runs the named rows only, each with the whole budget left
              # (on 2026-12-04 the first three rows hit their default limits before printing; a warm machine
              # keeps /tmp, so the inductor and extension caches of one call serve the next).
    all3=mlm:0.15,3ml-self:0.5,3ml-cross:0.5
    # HOSTLIGHT_ARGS: appended last (argparse keeps the last value), e.g. the CPU rehearsal of this mode:
    #   PATH=.venv/bin:$PATH DS_ACCELERATOR=cpu BUDGET_S=1500 HOSTLIGHT_ARGS="--preset tiny --seq-len 32
    #   --micro-batch 2 --steps 1 --rounds 1 --warmup 2" bash bench/gpu.sh hostlight   (fp16 rows: GPU only)
    read -r -a extra <<< "${HOSTLIGHT_ARGS:-}"
    timing=(--ranks 1 --vocab-size 50265 --steps 4 --rounds 2 --warmup 2)
    layers=("${timing[@]}" --compile layers "${extra[@]}")
    model=("${timing[@]}" --compile model --runs $two "${extra[@]}")
    large=(--preset large --seq-len 128 --accumulation 1)
    base=(--preset base --seq-len 512 --micro-batch 32 --accumulation 2)
    rows=("${@:2}")
    ((${#rows[@]})) || rows=("${hostlight_rows[@]}")
    for row in "${rows[@]}"; do
      limit=${limits[$row]}
      (($# > 1)) && limit=$budget  # named rows: each may use what is left (run_module caps it)
      case $row in
        large_b256_bf16autocast) hbench $row $limit "${large[@]}" --micro-batch 256 --runs $all3 \
          --paths zero2_bf16_autocast,zero0_bf16_autocast "${layers[@]}" ;;
        base_b64_bf16autocast) hbench $row $limit "${base[@]}" --runs $all3 \
          --paths zero2_bf16_autocast,zero0_bf16_autocast "${layers[@]}" ;;
        large_b256_bf16autocast_model) hbench $row $limit "${large[@]}" --micro-batch 256 \
          --paths zero0_bf16_autocast "${model[@]}" ;;
        base_b64_bf16autocast_model) hbench $row $limit "${base[@]}" --paths zero0_bf16_autocast "${model[@]}" ;;
        # DeepCompile (ZeRO-2 with the collectives in the compiled graph, no per-parameter hooks; CUDA only)
        large_b256_bf16autocast_deepcompile) hbench $row $limit "${large[@]}" --micro-batch 256 --runs $two \
          --paths zero2_bf16_autocast_deepcompile "${timing[@]}" --compile none "${extra[@]}" ;;
        large_b256_fp16) hbench $row $limit "${large[@]}" --micro-batch 256 --runs $all3 \
          --paths zero2_fp16,zero0_fp16 "${layers[@]}" ;;
        large_b512_bf16autocast) hbench $row $limit "${large[@]}" --micro-batch 512 --runs $two \
          --paths zero2_bf16_autocast,zero0_bf16_autocast "${layers[@]}" ;;
        base_b64_fp16) hbench $row $limit "${base[@]}" --runs $two --paths zero2_fp16,zero0_fp16 "${layers[@]}" ;;
      esac
    done
    ;;
  hostlight_eager)  # the two paths without compilation (no compile time: fits a few minutes), large then base,
                    # with the GPU time of each stage of the model (bench.stages: where 3ML's saving goes)
    read -r -a extra <<< "${HOSTLIGHT_ARGS:-}"
    eager=(--ranks 1 --vocab-size 50265 --steps 4 --rounds 2 --warmup 2 --compile none --runs $two --stages
           "${extra[@]}")
    hbench large_b256_bf16autocast_eager 150 --preset large --seq-len 128 --accumulation 1 --micro-batch 256 \
      --paths zero2_bf16_autocast,zero0_bf16_autocast "${eager[@]}"
    hbench base_b64_bf16autocast_eager 120 --preset base --seq-len 512 --micro-batch 32 --accumulation 2 \
      --paths zero2_bf16_autocast,zero0_bf16_autocast "${eager[@]}"
    ;;
esac

tar -czf "$final/results.tar.gz" -C "$out" .
for name in "${names[@]}"; do
  echo "## $name"
  if [[ -s "$out/$name.json" ]]; then
    grep -E '^\||^matmul peak|by stage|Error|error:' "$out/$name.log" | tail -n 40
  else  # failed or timed out: how far it got (bench.host_overhead prints rank 0's progress lines)
    grep -vE 'UserWarning|warnings.warn' "$out/$name.log" | tail -n 12
  fi
done
