#!/usr/bin/env bash
# Runs the NCCL path of torch.distributed for real on a GPU machine and prints a
# Markdown log: fit and eval-nll under torchrun with --cuda (one process per
# GPU, on cuda:LOCAL_RANK), and the check that eval-nll's per-point estimates
# are the same with and without torchrun. From the repository root:
#
#   bash scripts/gpu_distributed.sh [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds wheels of packages the machine lacks (pyro-ppl,
# pyro-api, opt_einsum), as for scripts/gpu_check.sh.
set -uo pipefail
wheels=${1:-}
site=/tmp/pyro-iwae-site
runs=/tmp/pyro-iwae-ddp-runs
rm -rf "$site" "$runs" && mkdir -p "$site" "$runs"
source scripts/gpu_site.sh
torchrun=(python3 -m torch.distributed.run --standalone)
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

echo "## torch.distributed on the GPU, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pyro, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| pyro', pyro.__version__, '| cuda', torch.version.cuda, '| nccl', torch.cuda.nccl.version())"
echo "GPUs: $gpus, CPU cores: $(nproc)"
end

step "tests/test_distributed.py (gloo, 2 ranks on the CPU)"
python3 -m pytest -p no:cacheprovider -q tests/test_distributed.py 2>&1 | tail -5
end

step "torchrun --nproc-per-node=1 pyro-iwae fit --cuda (NCCL, mnist-mini, 5 epochs)"
time "${torchrun[@]}" --nproc-per-node=1 "$(command -v pyro-iwae)" fit --cuda \
    --epochs 5 --out "$runs/ddp-1" 2>&1 | grep -v "^epoch [2-4]:"
end

step "fit --cuda --resume under torchrun: the run has finished, nothing left to train"
"${torchrun[@]}" --nproc-per-node=1 "$(command -v pyro-iwae)" fit --cuda --resume \
    --out "$runs/ddp-1" 2>&1 | grep -v "^W\|^\*"
end

if [[ $gpus -gt 1 ]]; then
    step "torchrun --nproc-per-node=$gpus pyro-iwae fit --cuda (one rank per GPU, global batch 100)"
    time "${torchrun[@]}" --nproc-per-node="$gpus" "$(command -v pyro-iwae)" fit --cuda \
        --epochs 5 --batch-size $((100 / gpus * gpus)) --out "$runs/ddp-$gpus" 2>&1 \
        | grep -v "^epoch [2-4]:"
    end
fi

step "eval-nll --cuda --k 5000 --limit 1000: one process, no torchrun"
time pyro-iwae eval-nll "$runs/ddp-1" --cuda --k 5000 --quiet 2>&1
cp "$runs/ddp-1/estimates-test-k5000.txt" "$runs/estimates-plain.txt"
end

step "eval-nll --cuda --k 5000 --limit 1000 under torchrun (NCCL), $gpus process(es)"
time "${torchrun[@]}" --nproc-per-node="$gpus" "$(command -v pyro-iwae)" eval-nll \
    "$runs/ddp-1" --cuda --k 5000 --quiet 2>&1 | grep -v "^W\|^\*"
end

step "per-point estimates: one process against torchrun"
if cmp -s "$runs/estimates-plain.txt" "$runs/ddp-1/estimates-test-k5000.txt"; then
    echo "identical ($(wc -l <"$runs/estimates-plain.txt") points)"
else
    python3 - "$runs/estimates-plain.txt" "$runs/ddp-1/estimates-test-k5000.txt" <<'EOF'
import sys
a, b = ([float(x) for x in open(p)] for p in sys.argv[1:])
diffs = [abs(x - y) for x, y in zip(a, b)]
print(f"DIFFER: {sum(d > 0 for d in diffs)} of {len(a)} points, largest {max(diffs):.2e} nats")
EOF
fi
end
