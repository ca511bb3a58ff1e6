#!/usr/bin/env bash
# Upload offline Weights & Biases runs (wandb/offline-run-* folders, e.g. from cluster nodes without internet).
#
#   launchers/wandb_sync.sh [--dry-run] [FOLDER...] [-- WANDB_SYNC_OPTIONS...]
#   launchers/wandb_sync.sh outputs/sweeps/2026-11-23_10-00-00
#   launchers/wandb_sync.sh outputs -- --project harmsweep --entity my-team
#
# FOLDER (default: outputs, in the folder it is called in) is searched recursively for offline-run-* folders; all of them go to one `wandb sync`
# call, so the pieces of a run that was resumed after a requeue (same run id, several offline-run-* folders) are
# uploaded in order. Runs already uploaded are skipped by wandb (it marks them *.synced).
# --dry-run lists what would be uploaded. The API key comes from WANDB_API_KEY or ~/.netrc (`wandb login`).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry=0
folders=()
extra=()
while (($#)); do
  case $1 in
    --dry-run) dry=1; shift ;;
    -h | --help) usage ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "wandb_sync: unknown option $1 (options for wandb sync go after --)" >&2; exit 2 ;;
    *) folders+=("$1"); shift ;;
  esac
done
((${#folders[@]})) || folders=("$PWD/outputs")

if [[ -x $root/.venv/bin/wandb ]]; then wandb=$root/.venv/bin/wandb
elif command -v wandb >/dev/null; then wandb=$(command -v wandb)
else
  echo "wandb_sync: the wandb command is not installed (pip install wandb, in the environment the runs used);" >&2
  echo "            nothing was uploaded" >&2
  exit 3
fi

for f in "${folders[@]}"; do [[ -d $f ]] || { echo "wandb_sync: no such folder: $f" >&2; exit 2; }; done
runs=()
while IFS= read -r -d '' d; do runs+=("$d"); done < <(find "${folders[@]}" -type d -name 'offline-run-*' -print0 | sort -z)
if ((${#runs[@]} == 0)); then
  echo "wandb_sync: no offline W&B runs (offline-run-* folders) under: ${folders[*]}"
  exit 0
fi
echo "wandb_sync: ${#runs[@]} offline run folder(s) under ${folders[*]}"
if ((dry)); then
  printf '  %s\n' "${runs[@]}"
  exit 0
fi
if [[ -z ${WANDB_API_KEY:-} ]] && ! grep -qs 'api.wandb.ai\|WANDB' ~/.netrc 2>/dev/null && [[ -z ${WANDB_BASE_URL:-} ]]; then
  echo "wandb_sync: warning: no WANDB_API_KEY and no W&B entry in ~/.netrc; run 'wandb login' first if the upload fails" >&2
fi
unset WANDB_MODE   # an inherited WANDB_MODE=offline would keep sync from uploading
exec "$wandb" sync "${extra[@]}" "${runs[@]}"
