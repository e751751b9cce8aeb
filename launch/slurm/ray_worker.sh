#!/usr/bin/env bash
# One Ray worker node of oel_ray.sbatch, started by srun on each node but the first:
#   ray_worker.sh TEMP_DIR_PREFIX RAY_CLI... start --block --address=HEAD ...
# The temp dir is named after the node, so raylets never share sockets even when two Slurm nodes
# are one host, and it goes away with the worker. On SIGTERM (srun passes on the job's teardown)
# Ray gets it too and stops its own processes, drained, before this script returns.
dir=${1}_${SLURMD_NODENAME:-$(hostname)}
shift
"$@" --temp-dir="$dir" &
ray_pid=$!
trap 'kill -TERM "$ray_pid" 2>/dev/null' TERM INT
wait "$ray_pid"   # returns early when a signal arrives...
wait "$ray_pid"   # ...then waits for Ray to finish stopping
status=$?
rm -rf "$dir"
exit "$status"
