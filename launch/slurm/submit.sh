#!/usr/bin/env bash
# Submit one OEL run with the allocation its config asks for: cluster.nodes nodes and
# cluster.gpus_per_node GPUs each, then launch/slurm/oel_ray.sbatch runs it.
#
#   launch/slurm/submit.sh +experiment=sokoban_4b            # sbatch --nodes=3 --gpus-per-node=8 ...
#   SBATCH_PARTITION=gpu SBATCH_TIMELIMIT=48:00:00 launch/slurm/submit.sh +experiment=frozenlake_8b
#
# Partition, account, time limit...: Slurm's own SBATCH_* variables. OEL_RAY_DRY_RUN=1 prints the
# sbatch command instead of submitting it. Prints the job id.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)  # physical paths: a symlinked checkout is the same repository
repo=$(cd "$here/../.." && pwd -P)
if [[ -n "${OEL_RAY_PYTHON:-}" ]]; then PYTHON=$OEL_RAY_PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python
else PYTHON=python3; fi

# The composed (and validated) cluster section: the experiment, its groups and the overrides.
cluster=$("$PYTHON" -m oel_ray.main "$@" --cfg job --package cluster)
value() { awk -v key="$1:" '$1 == key {print $2}' <<< "$cluster"; }
nodes=$(value nodes)
gpus=$(value gpus_per_node)

cmd=(sbatch --parsable --chdir="$repo" --nodes="$nodes")  # the job runs in the repository, wherever this ran
(( gpus > 0 )) && cmd+=(--gpus-per-node="$gpus")
cmd+=("$here/oel_ray.sbatch" "$@")
if [[ -n "${OEL_RAY_DRY_RUN:-}" ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
