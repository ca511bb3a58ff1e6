#!/usr/bin/env bash
# Start a harmsweep multirun driver detached from this shell, so that logging out does not end the sweep.
# The driver (`harmsweep -m ...`) submits the Slurm jobs and waits for them; the jobs themselves live in Slurm.
#
#   launchers/submit_detached.sh [--name NAME] OVERRIDES...
#   launchers/submit_detached.sh --name sp-grid hydra/launcher=slurm_gpu hydra.launcher.partition=gpu \
#       pruning.sparsity=1e-6,1e-5,1e-4 pruning=signed_snip,random
#
# Runs from the folder it is called in, like harmsweep itself (relative paths in overrides mean the same). The sweep
# goes to outputs/sweeps/NAME there (NAME defaults to the date and time) unless the overrides set hydra.sweep.dir;
# the driver's log and pid file are written beside it:
#   outputs/sweeps/NAME.driver.log   outputs/sweeps/NAME.driver.pid
# Without a hydra/launcher=... override the sweep runs with the default (local) launcher, in the driver itself.
# Follow:  tail -f outputs/sweeps/NAME.driver.log
# Stop:    kill -- -$(cat outputs/sweeps/NAME.driver.pid)   (the driver's process group; Slurm jobs already
#          submitted keep running: scancel them, e.g. scancel --name=harmsweep, the job name the profiles set)
# When the driver ends, its exit status is written to outputs/sweeps/NAME.driver.rc.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

name=""
while (($#)); do
  case $1 in
    --name) [[ $# -ge 2 ]] || usage; name=$2; shift 2 ;;
    --name=*) name=${1#--name=}; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) break ;;
  esac
done
(($#)) || usage
[[ -z $name || $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "submit_detached: --name may hold only letters, digits, . _ -" >&2; exit 2; }
name=${name:-$(date +%Y-%m-%d_%H-%M-%S)}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # the checkout: its .venv, when there is one
here=$PWD

if [[ -x $root/.venv/bin/harmsweep ]]; then cmd=("$root/.venv/bin/harmsweep")
elif command -v harmsweep >/dev/null; then cmd=(harmsweep)
else cmd=(python3 -m harmsweep.cli); fi

sweep_dir=""
for arg in "$@"; do [[ $arg == hydra.sweep.dir=* ]] && sweep_dir=${arg#hydra.sweep.dir=}; done
overrides=("$@")
if [[ -z $sweep_dir ]]; then
  sweep_dir=outputs/sweeps/$name
  overrides+=("hydra.sweep.dir=$sweep_dir")
fi
sweep_dir=${sweep_dir%/}
[[ $sweep_dir == /* ]] || sweep_dir=$here/$sweep_dir
mkdir -p "$(dirname "$sweep_dir")"
log=$sweep_dir.driver.log
pidfile=$sweep_dir.driver.pid

if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "submit_detached: a driver for $sweep_dir is already running (pid $(cat "$pidfile")); pick another --name" >&2
  exit 1
fi

{
  echo "# $(date -Is) $(hostname) cwd=$here"
  printf '# '; printf '%q ' "${cmd[@]}" -m "${overrides[@]}"; echo
} >"$log"
rm -f "$sweep_dir.driver.rc"
# setsid: own session and process group, no controlling terminal (no SIGHUP on logout); nohup for good measure.
# The small bash wrapper records the driver's exit status in NAME.driver.rc.
HS_DRIVER_RC=$sweep_dir.driver.rc setsid nohup bash -c '"$@"; echo $? >"$HS_DRIVER_RC"' harmsweep-driver "${cmd[@]}" -m "${overrides[@]}" \
  >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"

sleep 3   # a bad override fails within a second or two: say so here rather than in a log nobody reads
if ! kill -0 "$pid" 2>/dev/null; then
  for _ in 1 2 3 4 5; do [[ -s $sweep_dir.driver.rc ]] && break; sleep 0.2; done
  rc=$(cat "$sweep_dir.driver.rc" 2>/dev/null || echo '?')
  if [[ $rc == 0 ]]; then   # e.g. a relaunch whose every run was done: it answers from the sweep's manifest
    echo "sweep driver finished already (status 0); the end of its log ($log):"
    tail -n 3 "$log"
    exit 0
  fi
  echo "submit_detached: the driver exited at once (status $rc):" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
cat <<EOF
sweep driver running detached: pid $pid
  sweep:  $sweep_dir
  log:    $log
  pid:    $pidfile   (exit status, once it ends: $sweep_dir.driver.rc)
  follow: tail -f $log
  stop:   kill -- -$pid
EOF
