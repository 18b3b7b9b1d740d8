#!/bin/sh
# Slurm TaskEpilog: unregister the job that task_prolog.sh registered, once the task it
# registered ends (see task_prolog.sh). The batch task's epilog, which Slurm runs without
# SLURM_STEP_ID, ends the job's registration; a step's epilog ends it only when that
# step's task was the one registered (a job started by srun alone). Never fails the task.

[ "${SLURM_LOCALID:-0}" = 0 ] || exit 0
[ -n "${SLURM_JOB_ID:-}" ] || exit 0
if [ -z "${SLURM_STEP_ID:-}" ]; then
    "${GOVERNOR:-governor}" unregister --slurm-job "$SLURM_JOB_ID" >/dev/null 2>&1
elif [ -n "${SLURM_TASK_PID:-}" ]; then
    "${GOVERNOR:-governor}" unregister --slurm-job "$SLURM_JOB_ID" \
        --pid "$SLURM_TASK_PID" >/dev/null 2>&1
fi
exit 0
