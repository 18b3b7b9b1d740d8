#!/bin/sh
# Slurm TaskProlog: register the job with this node's governor, for sites that would
# rather register each job than turn on discovery ([slurm] discover). In slurm.conf:
#
#   TaskProlog=/usr/local/lib/governor/task_prolog.sh
#   TaskEpilog=/usr/local/lib/governor/task_epilog.sh
#
# It runs as the job's user before each task, and reaches the daemon through its local
# unix socket (api.socket), where the daemon tells callers apart by uid: a user may
# register only a process of their own, and a Slurm job id only from a process in that
# job's cgroup, of a job Slurm says is theirs. A job is registered once on each node, by
# its first task: `--once` asks the daemon whether it has the job already (its word, not
# the task's environment: a GOVERNOR_JOB_ID given at submit time proves nothing). What
# it prints as "export NAME=VALUE" enters the task's environment: the job's governor id,
# as GOVERNOR_JOB_ID. It never fails the task: without a daemon the job simply runs
# ungoverned. Registration by prolog is the job's own; to govern every job whether its
# user likes it or not, turn on discovery ([slurm] discover), which wins over it.
#
# Settings, from slurmd's environment (e.g. a systemd drop-in for slurmd.service):
#   GOVERNOR         the governor command (default: governor, on PATH)
#   GOVERNOR_CONFIG  the config naming api.socket (default: /etc/governor/governor.toml)
#   GOVERNOR_HOLD    how a pause holds the job: suspend (default), signal or cgroup

[ "${SLURM_LOCALID:-0}" = 0 ] || exit 0     # one registration per node
[ -n "${SLURM_TASK_PID:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] || exit 0

devices=""
for index in $(printf '%s' "${SLURM_JOB_GPUS:-${SLURM_STEP_GPUS:-}}" | tr ',' ' '); do
    devices="$devices --device gpu$index"
done
# shellcheck disable=SC2086  # $devices is a list of options
id=$("${GOVERNOR:-governor}" register --name "${SLURM_JOB_NAME:-slurm-$SLURM_JOB_ID}" \
        --pid "$SLURM_TASK_PID" --mode "${GOVERNOR_HOLD:-suspend}" \
        --source slurm --scheduler-id "$SLURM_JOB_ID" --once $devices 2>/dev/null) || exit 0
[ -n "$id" ] && echo "export GOVERNOR_JOB_ID=$id"
exit 0
