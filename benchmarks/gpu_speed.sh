#!/usr/bin/env bash
# the GPU speed check: see benchmarks/speed/gpu_speed.sh (the speed scripts live in benchmarks/speed/)
exec bash "$(dirname "$0")/speed/gpu_speed.sh" "$@"
