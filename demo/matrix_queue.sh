#!/bin/bash
# The matrix's training runs (issue 32) as a job queue: start one worker per core,
#     OMP_NUM_THREADS=1 bash demo/matrix_queue.sh &  OMP_NUM_THREADS=1 bash demo/matrix_queue.sh &
# Jobs, in order: one seed of every method, then seeds 1 and 2, then the Psi x k ablation (k = 50 pair
# first, then k = 5, then DPM-Solver++ at k = 20; DDIM at k = 20 is the matrix's LCD row). A worker claims
# a job with mkdir (atomic), skips it when its LoRA exists and resumes it (resume=true) when it has
# checkpoints, so rerunning the same command after a kill or reboot continues. `touch outputs/matrix/STOP`
# stops the workers between jobs (a SIGTERM to a train.py saves a checkpoint first); after a kill, remove
# outputs/matrix/claims while no worker runs. Start and end times go to outputs/matrix/chain.log.
# PYTHON=.venv/bin/python picks the interpreter (default: python on the PATH). A job that fails (or is
# killed) stops its worker, with its log named. LOGGER="logger=wandb logger.group=matrix_compose" logs
# every run to one wandb group, each with the config fields `configuration` (its overrides but the seed)
# and `seed`, so wandb's grouping averages seeds.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
mkdir -p outputs/matrix/claims outputs/matrix_psi
job_list() {
  for s in 0 1 2; do for m in tcd pcm scm lcm dmd2 rcm; do
    echo "outputs/matrix/compose_${m}_lora_s$s $m experiment=compose_${m}_lora train.seed=$s"; done; done
  for k in 50 5 20; do for psi in ddim dpmsolver++; do for s in 0 1 2; do
    [ "$k$psi" = 20ddim ] && continue
    echo "outputs/matrix_psi/psi_${psi}_k${k}_s$s lcm experiment=compose_lcm_lora objective.teacher_solver=$psi objective.k=$k train.seed=$s"
  done; done; done
}
job_list | while read -r d name overrides; do
  [ -f outputs/matrix/STOP ] && exit 0
  [ -f "$d/$name.safetensors" ] && continue
  mkdir "outputs/matrix/claims/$(basename "$d")" 2>/dev/null || continue
  r=""; [ -d "$d/checkpoints" ] && r="resume=true"
  echo "start $d $(date +%s) worker $$" >> outputs/matrix/chain.log
  # shellcheck disable=SC2086
  $PY train.py $overrides $LOGGER "hydra.run.dir=$d" $r >> "$d.log" 2>&1 < /dev/null
  rc=$?
  echo "end $d $(date +%s) rc=$rc worker $$" >> outputs/matrix/chain.log
  rmdir "outputs/matrix/claims/$(basename "$d")"
  if [ $rc -ne 0 ]; then echo "$d failed (exit $rc; see $d.log): this worker stops" >&2; exit $rc; fi
done
