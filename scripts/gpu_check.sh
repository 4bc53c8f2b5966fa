#!/usr/bin/env bash
# Runs the CUDA path for real on a GPU machine and prints a Markdown log (the
# source of results/gpu.md). From the repository root:
#
#   bash scripts/gpu_check.sh [WHEELS_DIR] [MNIST_GZ_DIR]
#
# WHEELS_DIR (optional) holds wheels of packages the machine lacks (there:
# pyro-ppl, pyro-api, opt_einsum); MNIST_GZ_DIR (optional) the four MNIST IDX
# files gzipped, for the full-MNIST timings.
set -uo pipefail
wheels=${1:-}
mnist_gz=${2:-}
site=/tmp/pyro-iwae-site
data=/tmp/pyro-iwae-data
runs=/tmp/pyro-iwae-runs
rm -rf "$site" "$runs" && mkdir -p "$site" "$data/MNIST/raw" "$runs"
source scripts/gpu_site.sh
if [[ -n $mnist_gz ]]; then
    for f in "$mnist_gz"/*.gz; do gunzip -c "$f" >"$data/MNIST/raw/$(basename "${f%.gz}")"; done
fi

echo "## GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pyro, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| pyro', pyro.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
nproc
end

step "tests/test_cuda.py on the GPU"
python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py 2>&1 | tail -15
end

step "the whole test suite on this machine"
python3 -m pytest -p no:cacheprovider -q -x 2>&1 | tail -5
end

step "pyro-iwae fit --cuda (the README's default run: mnist-mini, k = 5, 40 epochs)"
time pyro-iwae fit --cuda --out "$runs/default" 2>&1 | grep -v "^epoch \([2-9]\|[1-3][0-9]\):"
end

step "pyro-iwae eval-nll --cuda --k 5000 (1000 test points)"
time pyro-iwae eval-nll "$runs/default" --k 5000 --cuda --quiet 2>&1
end

step "the compiled path on the GPU (CUDA graphs): fit --cuda --compile, 5 epochs"
time pyro-iwae fit --cuda --compile --epochs 5 --out "$runs/compiled" 2>&1 | tail -4
end

step "eval-nll --cuda --compile --k 5000 (1000 test points; same run as above)"
time pyro-iwae eval-nll "$runs/default" --k 5000 --cuda --compile --quiet 2>&1
end

step "the same run evaluated on this machine's CPU (16 cores), --limit 200"
time pyro-iwae eval-nll "$runs/default" --k 5000 --limit 200 --quiet 2>&1
end

step "bench/cuda_syncs.py: host-device synchronisations per training step"
(cd bench && python3 cuda_syncs.py 2>&1)
end

if [[ -n $mnist_gz ]]; then
    step "bench/train_step.py --device cuda (full MNIST test images; validation off)"
    (cd bench && python3 train_step.py --device cuda --dataset mnist --data-dir "$data" \
        --k 5 50 --batch 100 20 --repeats 30 --warmup 5 \
        --variants hand-iwae iwelbo-iwae renyi hand-dreg iwelbo-dreg 2>&1)
    end
    step "bench/train_step.py --device cuda --validation (as fit runs by default)"
    (cd bench && python3 train_step.py --device cuda --dataset mnist --data-dir "$data" \
        --k 5 --batch 100 --repeats 30 --warmup 5 --validation \
        --variants hand-iwae iwelbo-iwae 2>&1)
    end
    for k in 5 50; do
        step "full MNIST: pyro-iwae fit --cuda, one epoch at k = $k (60,000 images, batch 100)"
        time pyro-iwae fit --cuda --dataset mnist --data-dir "$data" \
            --particles "$k" --epochs 1 --out "$runs/mnist-k$k" --quiet 2>&1
        end
    done
    step "full MNIST: pyro-iwae eval-nll --cuda --k 5000 on all 10,000 test images"
    time pyro-iwae eval-nll "$runs/mnist-k5" \
        --data-dir "$data" --k 5000 --limit 0 --cuda --quiet 2>&1
    end
fi
