#!/bin/bash
# DivRL with torchrun (one node, 8 GPUs; add --nnodes/--rdzv-* for several). Lightning reads torchrun's environment.
#   bash examples/torchrun.sh
#   bash examples/torchrun.sh --ckpt_path last          # resume
set -euo pipefail
torchrun --standalone --nproc-per-node 8 -m divrl.cli fit --config configs/explore.yaml "$@"
