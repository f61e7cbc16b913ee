#!/usr/bin/env bash
# The reward node of examples/reward_service/remote_rewards.yaml: both stage rewards of configs/explore.yaml, each
# served by one LitServe server with a worker on each of this node's GPUs (CUDA_VISIBLE_DEVICES picks them).
set -euo pipefail
: "${DIVRL_REWARD_API_KEY:?set DIVRL_REWARD_API_KEY (the trainers send the same)}"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
divrl serve-reward --config configs/explore.yaml --stage 1 --host 0.0.0.0 --port 8001 --devices 2 &
divrl serve-reward --config configs/explore.yaml --stage 2 --host 0.0.0.0 --port 8002 --devices 2 &
wait
