#!/usr/bin/env bash
# Submit a Hydra sweep as one Slurm job per combination, each with its own Ray cluster over the
# nodes its config asks for (launch/slurm/submit.sh), results under
# ${OEL_RAY_RUNS:-runs}/<name>-sweep/<time>/<job number>/ as `python -m oel_ray.main -m` lays them out
# (a relative path starts at the repository, where the jobs run).
#
#   launch/slurm/sweep.sh +experiment=frozenlake_4b extractor.k=10,25,50 learner.grad_accum=1,2
#
# Single-node jobs can instead go through Hydra's submitit launcher (one array job, no script):
#   python -m oel_ray.main -m hydra/launcher=submitit_slurm +experiment=tiny extractor.k=2,4
# OEL_RAY_DRY_RUN=1 prints the sbatch commands instead of submitting them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
if [[ -n "${OEL_RAY_PYTHON:-}" ]]; then PYTHON=$OEL_RAY_PYTHON
elif [[ -x $here/../../.venv/bin/python ]]; then PYTHON=$here/../../.venv/bin/python
else PYTHON=python3; fi
export OEL_RAY_PYTHON=$PYTHON

sweep_dir=${OEL_RAY_RUNS:-runs}/'${name}'-sweep/$(date +%Y-%m-%d_%H-%M-%S)  # ${name}: Hydra fills it in
job=0
while IFS= read -r line; do
  eval "combo=($line)"  # expand_sweep.py shell-quotes every override
  echo "job $job: ${combo[*]}" >&2
  "$here/submit.sh" "${combo[@]}" "hydra.run.dir=$sweep_dir/$job"
  job=$((job + 1))
done < <("$PYTHON" "$here/expand_sweep.py" "$@")
