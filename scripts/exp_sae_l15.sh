#!/usr/bin/env bash
# Issue 4's comparison on the embedded model: SmolLM2-135M layer 15 attention output, 8x dictionary (4,608
# features), k = 50, one store of 500k training tokens shared by every run (equal data, order and seed), batch
# 1,024 (488 steps), Adam lr 4e-4 (sparsify's default rule 2e-4 / sqrt(n / 2^14) for n = 4,608; not tuned here),
# warm-up 50 steps. Held-out evaluation: 50k tokens for FVU/dead, 16k tokens for the spliced LM loss.
# ASI is also run at fixed d_init 32, 174 and 348 beside auto (= 87 here) to see how the result depends on it.
# Usage: scripts/exp_sae_l15.sh [OUT_ROOT]   (each run is resumable; a finished run is reused; STORE=... reuses a
# store collected elsewhere)
set -euo pipefail
ROOT=${1:-runs/exp}
STORE=${STORE:-$ROOT/l15_attn_out_store}
RL=${RANKLENS:-.venv/bin/ranklens}
export HF_HUB_OFFLINE=1
$RL collect --model smollm2-135m --sites L15.attn_out --corpus default --tokens 500000 --out "$STORE" --quiet
common=(--model smollm2-135m --site L15.attn_out --store "$STORE" --tokens 500000 --batch-size 1024
        --expansion 8 --k 50 --lr 4e-4 --warmup-steps 50 --seed 0 --eval-tokens 50000 --lm-eval-tokens 16384 --quiet)
$RL train sae "${common[@]}" --init standard --out "$ROOT/sae_topk"
$RL train sae "${common[@]}" --init standard --aux-k 512 --out "$ROOT/sae_auxk"
$RL train sae "${common[@]}" --init asi --d-init auto --out "$ROOT/sae_asi"
$RL train sae "${common[@]}" --init asi --d-init auto --optimizer sparseadam --out "$ROOT/sae_asi_sparseadam"
$RL train sae "${common[@]}" --init random-subspace --d-init auto --out "$ROOT/sae_random_subspace"
for d_init in 32 174 348; do
  $RL train sae "${common[@]}" --init asi --d-init $d_init --out "$ROOT/sae_asi_d$d_init"
done
for run in sae_topk sae_auxk sae_asi sae_asi_sparseadam sae_random_subspace sae_asi_d32 sae_asi_d174 sae_asi_d348; do
  python3 - "$ROOT/$run/metrics.json" "$run" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keys = ["dead_features", "dead_fraction", "dead_window_tokens", "eval_dead_features", "nmse", "l0", "delta_lm_loss",
        "loss_recovered", "d_init"]
print(sys.argv[2], {k: m.get(k) for k in keys})
PY
done
