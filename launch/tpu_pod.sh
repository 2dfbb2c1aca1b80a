#!/usr/bin/env bash
# Run a gradual_jax config on every worker of a Cloud TPU VM pod slice (e.g. a v5e-16: 4 hosts x
# 4 chips).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE           # once: code + Python environment on every worker
#   launch/tpu_pod.sh run   TPU_NAME ZONE CONFIG [key=value ...]
#   launch/tpu_pod.sh stop  TPU_NAME ZONE           # stop a detached run on every worker
#
# `run` executes the same command on all workers over `gcloud compute tpus tpu-vm ssh
# --worker=all`. Each worker is one JAX process: `distributed.enabled=true` makes
# gradual_jax call `jax.distributed.initialize()` with no arguments, and JAX finds the
# coordinator, process count and process id from the TPU VM metadata. JAX sees the whole slice's
# chips as one device list, so the config's mesh spans every chip (the paper configs put them
# all on the fsdp axis). Every worker trains on its own rows of each batch, probes its own share
# of the questions on its own chips, loads only the weight slices its chips hold and writes its
# own shards of each checkpoint; worker 0 writes every other file (probe records, metrics,
# TensorBoard events, <run>/run.log, the report).
#
# The run directory must be the same shared storage on every worker (an NFS/Filestore mount or a
# gcsfuse-mounted bucket at the same path): Orbax checkpoints are written jointly by all
# workers, and a per-worker local disk would leave each one holding a fragment. Pass it as
# RUN_DIR. The run checks at start that every worker sees the lock worker 0 writes there and
# refuses (exit 2) otherwise.
#
# One run per run directory: `run` gives all workers one GRADUAL_JAX_LAUNCH_ID, by which they
# recognise each other; a second `run` into a held directory exits 2 at once naming the holder.
# The lock of a killed run is taken over after 60 s without its heartbeat. When a worker dies
# the others end within about 20 s (distributed.heartbeat_timeout_s) instead of waiting at a
# collective; an internal error exits 1 with its traceback in <run>/run.log.
#
# Check that the config fits the slice before renting it (runs anywhere, CPU only):
#   python -m gradual_jax.launch CONFIG --plan --devices 16 --hbm-gib 16
#
# Environment (all optional except RUN_DIR for `run`):
#   RUN_DIR     run_dir on the workers (shared storage, see above)
#   PROJECT     gcloud project (default: gcloud's configured one)
#   REPO_URL    git URL the workers clone (setup; default: this checkout's origin)
#   REPO_REF    branch, tag or commit to check out (setup; default: this checkout's HEAD commit)
#   REPO_DIR    where the code lives on the workers (default: ~/gradual_jax)
#   DETACH=1    run under nohup and return; logs in $REPO_DIR/logs/<name>.worker<N>.log
#   EXTRA_ENV   extra "VAR=value ..." exported before the command (e.g. XLA flags)
#   GRADUAL_JAX_LAUNCH_ID  the launch token (default: a new one per `run`)
set -euo pipefail

usage() { sed -n '2,42p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3

repo_dir=${REPO_DIR:-'~/gradual_jax'}
gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project "$PROJECT")

on_all_workers() {  # the same shell command on every worker, output prefixed by worker
  gcloud "${gcloud_args[@]}" --command "$1"
}

case "$action" in
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    url=${REPO_URL:-$(git -C "$here" remote get-url origin)}
    ref=${REPO_REF:-$(git -C "$here" rev-parse HEAD)}
    # A venv per worker; jax[tpu] brings libtpu. Safe to re-run: it updates in place.
    on_all_workers "set -e
      [ -d $repo_dir/.git ] || git clone -q $(printf %q "$url") $repo_dir
      cd $repo_dir && git fetch -q origin && git checkout -q $(printf %q "$ref")
      [ -d .venv ] || python3 -m venv .venv
      . .venv/bin/activate
      pip install -q --upgrade pip
      pip install -q -e . 'jax[tpu]'
      python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    : "${RUN_DIR:?set RUN_DIR to a directory on storage shared by every worker}"
    config=$1
    shift
    args=$(printf ' %q' "$config" distributed.enabled=true "run_dir=$RUN_DIR" "$@")
    name=$(basename "$config" .yaml)
    launch_id=${GRADUAL_JAX_LAUNCH_ID:-tpu-$(date +%s)-$RANDOM$RANDOM}
    cmd="cd $repo_dir && . .venv/bin/activate && mkdir -p logs && export GRADUAL_JAX_LAUNCH_ID=$launch_id && ${EXTRA_ENV:+export $EXTRA_ENV &&} "
    if [[ "${DETACH:-0}" == 1 ]]; then
      # The worker number comes from the TPU metadata, as JAX reads it.
      worker='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
      cmd+="nohup python -m gradual_jax.launch$args > logs/$name.worker$worker.log 2>&1 < /dev/null & echo started"
    else
      cmd+="python -m gradual_jax.launch$args"
    fi
    on_all_workers "$cmd"
    ;;
  stop)
    # Ends a detached run (a run still holding the chips makes the next one fail with
    # "TPU in use"); matches only this launcher's command line.
    on_all_workers "pkill -INT -f '^python -m gradual_jax.launch' || true"
    ;;
  *)
    usage
    ;;
esac
