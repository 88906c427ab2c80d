#!/bin/bash
# Shared logic of the megaflow sbatch scripts in this directory; sourced, not run. It provides:
#   - the launcher: srun on the host (PYTHON) or in a container through pyxis/enroot (CONTAINER);
#   - the rendezvous environment (MASTER_ADDR, MASTER_PORT) and per-rank threads (OMP_NUM_THREADS);
#   - mf_train STAGE CONFIG [key=value ...]   one `megaflow train STAGE` run, requeued while unfinished;
#   - mf_pipeline PIPELINE [key=value ...]    one `megaflow run PIPELINE` runner, requeued while unfinished.
# Every variable is explained in README.md next to this file; the preemption/requeue mechanism is under
# "Preemption and requeue" there.
# shellcheck shell=bash

# -- settings (from the environment of `sbatch`; the defaults are for one node with 8 GPUs) ---------------
MEGAFLOW_HOME=${MEGAFLOW_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}  # repository root: configs and relative paths resolve here
CONTAINER=${CONTAINER:-}                  # image for pyxis/enroot (srun --container-image); empty: run on the host
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}    # extra SRC:DST[,SRC:DST...] mounts; the repository is always mounted
CONTAINER_NAME=${CONTAINER_NAME-megaflow-${SLURM_JOB_ID:-0}}  # pyxis container name (reused by the job's steps); set empty for none
PYTHON=${PYTHON:-}                        # host interpreter; default: MEGAFLOW_HOME/.venv/bin/python, else python3
RUN_DIR=${RUN_DIR:-}                      # run.dir; default: read from the resolved config (megaflow ... --dry-run)
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}  # CPUs per task; default: the node's CPUs shared among its tasks
MAX_REQUEUES=${MAX_REQUEUES:-20}          # stop requeueing after this many restarts (SLURM_RESTART_COUNT)
REQUEUE=${REQUEUE:-1}                     # 0: never requeue; an unfinished run is left for a manual resubmission

# -- environment of every rank ------------------------------------------------------------------------------
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}   # CPU threads per rank (data loading, tokenization)
export PYTHONUNBUFFERED=1                     # log lines reach the job log as they are printed
# megaflow reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID in each task (megaflow/runtime/distributed.py)
# and takes MASTER_ADDR / MASTER_PORT from the environment when set. Its own fallback parses the first host
# of SLURM_JOB_NODELIST itself; `scontrol show hostnames` expands every node-list syntax, so use it here.
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | sed -n 1p)
fi
[ -n "${MASTER_ADDR:-}" ] && export MASTER_ADDR
# The same port megaflow derives from the job id; exported so that every launcher (and the enroot PyTorch
# hook, which only fills in variables that are unset) agrees on it.
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# Multi-node networking: NCCL's defaults suit most InfiniBand clusters. Uncomment and adapt when needed:
# export NCCL_DEBUG=INFO                  # print the transport NCCL picks (IB, RoCE, sockets) at startup
# export NCCL_SOCKET_IFNAME=ib0           # interface for NCCL's bootstrap / socket traffic (e.g. ib0, eth0, ^lo,docker)
# export NCCL_IB_HCA=mlx5                 # InfiniBand adapters to use (prefix match, or a list: mlx5_0,mlx5_1)
# export NCCL_IB_DISABLE=1                # no InfiniBand: TCP sockets only (slow; for debugging a fabric)
# export NCCL_NET_GDR_LEVEL=PHB           # how far apart a GPU and a NIC may be for GPUDirect RDMA
# export CUDA_DEVICE_MAX_CONNECTIONS=1    # Megatron-LM's launch scripts set it for TP/SP communication overlap

# -- helpers ---------------------------------------------------------------------------------------------------
mf_log() { printf 'megaflow-slurm: %s\n' "$*" >&2; }
mf_die() { mf_log "error: $*"; exit 2; }

cd "$MEGAFLOW_HOME" || mf_die "MEGAFLOW_HOME=$MEGAFLOW_HOME is not a directory (submit from the repository root or set MEGAFLOW_HOME)"
[ -f pyproject.toml ] && [ -d megaflow ] \
    || mf_die "$PWD is not the megaflow repository (submit from the repository root or set MEGAFLOW_HOME)"

# The launcher: MF_SRUN for all tasks of the job, MF_SRUN_ONE for a single task on the first node.
MF_SRUN=(srun --kill-on-bad-exit=1)
# A job step's tasks get one CPU each unless told otherwise; where SLURM binds or constrains cores, that
# leaves a rank and its data-loading threads one core. Share the node's CPUs among its tasks instead.
if [ -z "$CPUS_PER_TASK" ] && [ -n "${SLURM_CPUS_ON_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
    CPUS_PER_TASK=$(( SLURM_CPUS_ON_NODE / SLURM_NTASKS_PER_NODE ))
fi
if [ -n "$CPUS_PER_TASK" ] && [ "$CPUS_PER_TASK" -gt 0 ]; then MF_SRUN+=(--cpus-per-task="$CPUS_PER_TASK"); fi
MF_SRUN_ONE=(srun --nodes=1 --ntasks=1 --ntasks-per-node=1)
if [ -n "$CONTAINER" ]; then
    mf_mounts="$PWD:$PWD${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
    mf_container=(--container-image="$CONTAINER" --container-mounts="$mf_mounts" --container-workdir="$PWD")
    [ -n "$CONTAINER_NAME" ] && mf_container+=(--container-name="$CONTAINER_NAME")
    MF_SRUN+=("${mf_container[@]}")
    MF_SRUN_ONE+=("${mf_container[@]}")
    MF_PY=python                      # the container's interpreter; the mounted checkout is the working directory
else
    if [ -z "$PYTHON" ]; then
        if [ -x "$PWD/.venv/bin/python" ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
    fi
    MF_PY=$PYTHON
fi

# -- signals ----------------------------------------------------------------------------------------------------
# SIGUSR1 reaches this shell from `#SBATCH --signal=B:USR1@SECONDS` (before the time limit), from
# `scancel --batch --signal=USR1 JOBID`, or at preemption with PreemptParameters=send_user_signal. SIGTERM
# reaches it when SLURM ends the job (scancel, time limit reached). Either is passed on to srun as SIGUSR1,
# which srun forwards unchanged to every task; megaflow then saves a checkpoint at the next step boundary
# and exits 0. srun answers SIGTERM (and SIGHUP, SIGQUIT) by SIGKILLing its tasks, so TERM is never passed
# on as TERM; when SLURM ends the job it signals srun itself, so the reliable path is the USR1 warning.
MF_STOP=""      # name of the first stop signal this shell received
MF_CHILD=""     # pid of the running srun
mf_on_signal() {
    [ -n "$MF_STOP" ] || MF_STOP=$1
    mf_log "SIG$1 received: asking megaflow to save a checkpoint and stop"
    if [ -n "$MF_CHILD" ]; then kill -s USR1 "$MF_CHILD" 2>/dev/null || true; fi
}
trap 'mf_on_signal USR1' USR1
trap 'mf_on_signal TERM' TERM

# mf_sig FILE...: a signature (inode, size, mtime with nanoseconds) of each file, "-" for a missing one.
# Compared before and after srun it tells whether megaflow wrote the file during this job, without
# comparing clocks across nodes.
mf_sig() {
    local f
    for f in "$@"; do
        if [ -e "$f" ]; then stat -L -c '%i:%s:%y' -- "$f"; else printf -- '-\n'; fi
    done
}

# mf_progress_sig RUN_DIR: signatures of every STAGE/checkpoints/latest under RUN_DIR. megaflow replaces
# `latest` (atomically, after the checkpoint is complete) whenever it saves, including on a stop.
mf_progress_sig() {
    local files=()
    local had_nullglob=0
    shopt -q nullglob && had_nullglob=1
    shopt -s nullglob
    files=("$1"/*/checkpoints/latest)
    [ "$had_nullglob" = 1 ] || shopt -u nullglob
    printf '%s\n' "${files[@]}"
    [ "${#files[@]}" -eq 0 ] || mf_sig "${files[@]}"
}

# mf_decide RC STOP DONE_CHANGED PROGRESS_CHANGED -> prints finished | stopped | incomplete | failed
#   RC                exit code of srun (the highest of the tasks'; 128+N for a task killed by signal N)
#   STOP              name of the stop signal this shell received, or empty
#   DONE_CHANGED      1 if the completion marker (STAGE/eval.json) was written during this run
#   PROGRESS_CHANGED  1 if a checkpoint (some STAGE/checkpoints/latest) was saved during this run
mf_decide() {
    local rc=$1 stop=$2 done_changed=$3 progress_changed=$4
    if [ "$rc" -eq 0 ] && [ "$done_changed" = 1 ]; then
        echo finished       # eval.json is written only after the last step, the final eval and final/
    elif [ "$done_changed" != 1 ] && { [ -n "$stop" ] || { [ "$rc" -eq 0 ] && [ "$progress_changed" = 1 ]; }; }; then
        # Exit 0 with a new checkpoint: megaflow stopped on SIGTERM/SIGUSR1 (sent to the tasks directly, e.g. at
        # preemption) or at train.max_minutes. After a stop signal to this shell any exit counts: the signal may
        # have come before or after the training loop (setup, final evaluation), where it ends the process.
        echo stopped
    elif [ "$rc" -eq 0 ]; then
        echo incomplete     # exit 0 without finishing or saving (e.g. --dry-run): nothing to resume
    else
        echo failed
    fi
}

# mf_requeue: put this job back in the queue; the same batch script then starts again and megaflow
# resumes from checkpoints/latest. `Incomplete` makes scontrol requeue the job only while it is still
# RUNNING: a job that SLURM is already ending (scancel, time limit reached, preempted and cancelled) is
# left alone, although slurmctld would otherwise requeue even a completing job.
mf_requeue() {
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        mf_log "not a SLURM job: run the same command again to resume"
        return 0
    fi
    if [ "$REQUEUE" = 0 ]; then
        mf_log "REQUEUE=0: not requeueing; resubmit the same job to resume"
        return 0
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        mf_log "restarted ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing again"
        return 0
    fi
    mf_log "requeueing job $SLURM_JOB_ID (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))): it resumes from the last checkpoint"
    scontrol requeue Incomplete "$SLURM_JOB_ID" \
        || mf_log "warning: 'scontrol requeue' failed (is the job requeueable? #SBATCH --requeue); resubmit to resume"
}

# mf_resolve_run_dir MEGAFLOW-ARGS...: run.dir of the fully resolved config (`megaflow ... --dry-run`),
# in the container when one is used. Sets MF_RUN_DIR; RUN_DIR overrides.
mf_resolve_run_dir() {
    if [ -n "$RUN_DIR" ]; then
        MF_RUN_DIR=$RUN_DIR
        return 0
    fi
    local resolved rc=0
    if [ -n "$CONTAINER" ]; then
        resolved=$("${MF_SRUN_ONE[@]}" "$MF_PY" -m megaflow "$@" --dry-run) || rc=$?
    else
        resolved=$("$MF_PY" -m megaflow "$@" --dry-run) || rc=$?
    fi
    [ "$rc" -eq 0 ] || mf_die "'megaflow $* --dry-run' failed (exit $rc): see the message above; does this megaflow have the command? (README.md here lists what exists today)"
    MF_RUN_DIR=$(printf '%s\n' "$resolved" | awk '
        /^run:/ { inrun = 1; next }
        inrun && /^[^ ]/ { exit }
        inrun && /^  dir:/ { sub(/^  dir:[ ]*/, ""); gsub(/^["\047]|["\047]$/, ""); print; exit }')
    [ -n "$MF_RUN_DIR" ] || mf_die "could not read run.dir from 'megaflow $* --dry-run'; set RUN_DIR"
}

# mf_srun MEGAFLOW-ARGS...: srun megaflow on every task and wait for it, signals being handled meanwhile.
# Sets MF_RC to srun's exit code.
mf_srun() {
    local where="host python $MF_PY"
    if [ -n "$CONTAINER" ]; then where="container $CONTAINER"; fi
    mf_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-this host}, $where"
    mf_log "run: megaflow $*"
    "${MF_SRUN[@]}" "$MF_PY" -m megaflow "$@" &
    MF_CHILD=$!
    # `wait` also returns (with 128+N) when a trapped signal arrives: wait again while srun still runs. A
    # status above 128 is then read once more, which returns srun's own (bash keeps it for `wait PID`).
    local waited
    while :; do
        waited=0
        wait "$MF_CHILD" || waited=$?
        if [ "$waited" -gt 128 ] && kill -0 "$MF_CHILD" 2>/dev/null; then continue; fi
        break
    done
    MF_RC=$waited
    if [ "$MF_RC" -gt 128 ]; then MF_RC=0; wait "$MF_CHILD" || MF_RC=$?; fi
    MF_CHILD=""
}

# mf_launch DONE_FILE RUN_DIR -- MEGAFLOW-ARGS...: srun megaflow on every task, then decide from srun's exit
# code and the files megaflow wrote whether the run finished or stopped early, and requeue the job in the
# second case. Exits the script with the outcome's code.
mf_launch() {
    local done_file=$1 run_dir=$2
    shift 3
    local done_before progress_before outcome done_changed=0 progress_changed=0
    done_before=$(mf_sig "$done_file")
    progress_before=$(mf_progress_sig "$run_dir")
    if [ -n "$MF_STOP" ]; then
        # The signal came while the run was being prepared: do not start megaflow only to stop it.
        mf_log "stop requested before the launch"
        mf_requeue
        exit 0
    fi
    mf_srun "$@"
    [ "$(mf_sig "$done_file")" = "$done_before" ] || done_changed=1
    [ "$(mf_progress_sig "$run_dir")" = "$progress_before" ] || progress_changed=1
    outcome=$(mf_decide "$MF_RC" "$MF_STOP" "$done_changed" "$progress_changed")
    mf_log "srun exited $MF_RC${MF_STOP:+ after SIG$MF_STOP}: $outcome"
    case $outcome in
        finished)   mf_log "done: $done_file"; exit 0 ;;
        stopped)    mf_requeue; exit 0 ;;
        incomplete) mf_log "megaflow exited 0 without finishing or saving a checkpoint: not requeued"; exit 0 ;;
        *)          mf_log "megaflow failed (exit $MF_RC): not requeued"; exit "$MF_RC" ;;
    esac
}

# mf_train STAGE CONFIG [key=value ...]: `megaflow train STAGE --config CONFIG ...` on every task.
# Finished when RUN_DIR/STAGE/eval.json is written (megaflow writes it only at the end of the stage).
mf_train() {
    local stage=$1 config=$2
    shift 2
    [ -f "$config" ] || mf_die "config not found: $config (relative to $PWD; set CONFIG)"
    mf_resolve_run_dir train "$stage" --config "$config" "$@"
    mf_launch "$MF_RUN_DIR/$stage/eval.json" "$MF_RUN_DIR" -- train "$stage" --config "$config" "$@"
}

# mf_pipeline PIPELINE [key=value ...]: `megaflow run PIPELINE ...` as the job's one task; the runner starts
# each stage on this node's GPUs (the stage's nproc_per_node). `megaflow run` exits 0 when every stage is
# done, 75 when a stage saved a checkpoint and stopped (a stop signal, train.max_minutes): requeued, and
# the next job skips the finished stages and resumes that one. pipeline.json under run.dir holds the state.
mf_pipeline() {
    local pipeline=$1
    shift
    [ -f "$pipeline" ] || mf_die "pipeline file not found: $pipeline (relative to $PWD)"
    [ "${SLURM_NNODES:-1}" -le 1 ] || mf_die "a pipeline runs on one node (its stages' nproc_per_node); run the stages of a multi-node job one by one with the stage scripts here"
    [ "${SLURM_NTASKS:-1}" -le 1 ] || mf_die "a pipeline job has one task (#SBATCH --ntasks-per-node=1): the runner launches each stage's ranks itself"
    if [ -n "$MF_STOP" ]; then
        mf_log "stop requested before the launch"
        mf_requeue
        exit 0
    fi
    mf_srun run "$pipeline" "$@"
    mf_log "srun exited $MF_RC${MF_STOP:+ after SIG$MF_STOP}"
    case $MF_RC in
        0)  mf_log "pipeline finished: report.md under its run.dir"; exit 0 ;;
        75) mf_requeue; exit 0 ;;
        *)  if [ -n "$MF_STOP" ] && [ "$MF_RC" -gt 128 ]; then mf_requeue; exit 0; fi
            mf_log "megaflow run failed (exit $MF_RC): not requeued"; exit "$MF_RC" ;;
    esac
}
