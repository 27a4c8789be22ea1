#!/bin/bash
# Submit the label phases as Slurm jobs chained by dependencies, then return:
#   jobs/slurm/label.sh [CONFIG] [SHARDS]      (defaults: jobs/s3/label.yaml, 8)
# blocks (array of SHARDS) --afterok--> merge (one job) --afterok--> grow (array of SHARDS)
# --afterok--> sizes (one job) --afterok--> relabel (array of SHARDS) --afterok--> clean
# (one job: summary, intermediate files removed): every phase of label.PHASES. grow and
# sizes belong to the contour/distance modes; in connected_components mode they succeed at
# once, doing nothing, so the one chain serves every instance_mode.
# If a phase fails, the later ones stay pending with reason DependencyNeverSatisfied;
# cancel them (scancel), fix the cause and run this script again: done blocks are skipped.
# Or resubmit only a failed task of an array with the same count, e.g. task 5 of 8:
#   CATENA_NUM_SHARDS=8 sbatch --array=5 jobs/slurm/label-blocks.sbatch CONFIG
# (task id = shard index; the arrays are 0..SHARDS-1).
# Environment knobs (CATENA_SIF, CATENA_BIND, AWS_*) are passed on by sbatch.
set -euo pipefail

CONFIG=${1:-jobs/s3/label.yaml}
SHARDS=${2:-8}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ! [[ "$SHARDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "label.sh: SHARDS must be a positive integer, got '$SHARDS'" >&2
    exit 2
fi

# --parsable prints "jobid" or "jobid;cluster"; keep the id.
submit() { sbatch --parsable "$@" | cut -d';' -f1; }

# The array of SHARDS tasks is 0..SHARDS-1 and each task is told SHARDS, so a task
# resubmitted alone later (CATENA_NUM_SHARDS=SHARDS sbatch --array=5 ...) is the same shard.
array=(--array="0-$((SHARDS - 1))" --export="ALL,CATENA_NUM_SHARDS=$SHARDS")
blocks=$(submit "${array[@]}" "$HERE/label-blocks.sbatch" "$CONFIG")
# afterok on an array job waits for every task of the array to succeed.
merge=$(submit --dependency="afterok:$blocks" "$HERE/label-merge.sbatch" "$CONFIG")
grow=$(submit --dependency="afterok:$merge" "${array[@]}" "$HERE/label-grow.sbatch" "$CONFIG")
sizes=$(submit --dependency="afterok:$grow" "$HERE/label-sizes.sbatch" "$CONFIG")
relabel=$(submit --dependency="afterok:$sizes" "${array[@]}" "$HERE/label-relabel.sbatch" "$CONFIG")
clean=$(submit --dependency="afterok:$relabel" "$HERE/label-clean.sbatch" "$CONFIG")

echo "submitted label for $CONFIG in $SHARDS shards:"
echo "  blocks  $blocks"
echo "  merge   $merge   (after blocks)"
echo "  grow    $grow   (after merge)"
echo "  sizes   $sizes   (after grow)"
echo "  relabel $relabel (after sizes)"
echo "  clean   $clean   (after relabel)"
echo "watch with: squeue -j $blocks,$merge,$grow,$sizes,$relabel,$clean"
