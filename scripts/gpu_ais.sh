#!/usr/bin/env bash
# On a GPU machine: train the grid's vae-k50 and iwae-k50 settings on full MNIST
# and the README's default run, then scripts/ais_vs_iwae.py on all three. From the
# repository root: bash scripts/gpu_ais.sh SITE_DIR DATA_DIR OUT_DIR
# (SITE_DIR: where pyro_iwae is importable from; see scripts/gpu_check.sh).
set -uo pipefail
site=$1 data=$2 out=$3
export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
runs=runs/gpu-ais
grid=(--dataset mnist --data-dir "$data" --schedule paper --stages 4 --batch-size 100
    --lr 0.001 --seed 0 --particles 50 --cuda --quiet)
for objective in vae iwae; do
    pyro-iwae fit "${grid[@]}" --objective "$objective" --out "$runs/$objective-k50" 2>&1 | tail -2
done
pyro-iwae fit --cuda --quiet --out "$runs/default" 2>&1 | tail -2
tar -czf "$out/gpu-ais-runs.tar.gz" "$runs"
python3 scripts/ais_vs_iwae.py "$runs/vae-k50" "$runs/iwae-k50" --data-dir "$data" \
    --points 1000 --k 5000 --ais-steps 500 --chains 16 --batch-size 1000 --cuda \
    --out "$out" | tee "$out/table.md"
python3 scripts/ais_vs_iwae.py "$runs/default" --points 1000 --k 5000 \
    --ais-steps 500 --chains 16 --batch-size 1000 --cuda --out "$out" | tee -a "$out/table.md"
