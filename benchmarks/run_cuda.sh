#!/usr/bin/env bash
# The CUDA checks and benchmarks in one go, for a machine with a GPU and a python3 that has
# torch (plus pytest, safetensors, scikit-learn for the trainer test).  Logs go to $OUT (or ./cuda-logs).
# Usage: bash benchmarks/run_cuda.sh   (each part has its own time limit; one failing does not stop the rest)
#        PARTS="cuda_tests bench_training" bash benchmarks/run_cuda.sh   (a selection)
set -u
out="${OUT:-cuda-logs}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
nvidia-smi -L
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n 60 "$out/$name.log"
}
# PARTS picks and orders what runs (default: all of them)
for name in ${PARTS:-cuda_tests profile_cuda bench_training bench_training_1024 bench_engine bench_margins bench_maxpool bench_conv}; do
    case $name in
        cuda_tests) part cuda_tests "${T_TESTS:-120}" "$py" -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/test_cuda.py ;;
        profile_cuda) part profile_cuda "${T_PROFILE:-60}" "$py" benchmarks/profile_cuda.py ;;
        bench_training) part bench_training "${T_TRAIN:-110}" "$py" benchmarks/bench_training.py --device cuda ;;
        bench_training_1024) part bench_training_1024 "${T_TRAIN:-110}" "$py" benchmarks/bench_training.py --device cuda \
            --batch 1024 --backprop-steps 1 --no-compile ;;
        bench_engine) part bench_engine "${T_ENGINE:-80}" "$py" benchmarks/bench_engine.py --device cuda ;;
        bench_margins) part bench_margins "${T_MARGINS:-80}" "$py" benchmarks/bench_margins.py --device cuda ;;
        bench_maxpool) part bench_maxpool "${T_MAXPOOL:-30}" "$py" benchmarks/bench_maxpool.py --device cuda ;;
        bench_conv) part bench_conv "${T_CONV:-300}" "$py" benchmarks/bench_conv.py --device cuda ;;
        *) echo "unknown part $name"; exit 2 ;;
    esac
done
