#!/usr/bin/env bash
# Regenerate the committed reference results (results/README.md tables and plots).
# Every point is a fresh `milbench run` process; rerunning resumes (finished points are skipped).
#   MILBENCH_DATA_ROOT=../shared/data bash benchmarks/reference.sh [sweeps|tables|all]
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
: "${MILBENCH_DATA_ROOT:?set MILBENCH_DATA_ROOT to the folder with MNIST/, imagenette2-*/ and mouse-brain-ca1/}"
export MILBENCH_DATA_ROOT

if [[ "$what" == sweeps || "$what" == all ]]; then
  # 5 methods x 3 datasets, default preset, 3 seeds, one training protocol (milbench/protocol.py)
  milbench sweep -m all -d qmnist,imagenette,mouse-brain --seeds 0,1,2 --device cpu --results results/reference
  # grad-accum against abmil, paired by seed: 5 seeds on qmnist and imagenette
  milbench sweep -m abmil,grad-accum -d qmnist,imagenette --seeds 0-4 --device cpu --results results/reference
  # sampled's draw size: qmnist at three draws, Imagenette at a 70 % draw (the default 30 % is the table's)
  milbench sweep -m sampled -d qmnist --grid sample_fraction=0.5,0.7,1.0 --seeds 0,1,2 --device cpu \
    --results results/sampled-fraction-qmnist
  milbench sweep -m sampled -d imagenette --grid sample_fraction=0.7 --seeds 0,1,2 --device cpu \
    --results results/sampled-fraction-imagenette
  # equal-budget tuning: 4 trials per method on validation (seed 0, so every method gets the same candidates),
  # then the tuned preset on 3 seeds, on every dataset (transcriptome-cnn on Imagenette alone is about
  # 4-5 CPU hours: 4 trials and 3 seeds at 33-40 CPU minutes a run)
  # (earlier tunings, under earlier qmnist settings, are under results/previous-protocol/)
  for d in qmnist mouse-brain imagenette; do
    for m in sampled streamingclam abmil grad-accum transcriptome-cnn; do
      milbench tune -m $m -d $d --trials 4 --seed 0 --device cpu --results results/tuned-$d-cpu
      for s in 0 1 2; do
        milbench run -m $m -d $d --preset tuned-$m-$d --seed $s --device cpu --results results/tuned-$d-cpu
      done
    done
  done
  # the README's main job on the shipped sample, seeds 0-2
  for s in 0 1 2; do
    env -u MILBENCH_DATA_ROOT milbench run --method grad-accum --dataset imagenette --seed $s --results results/main-job
  done
  # bag size: abmil vs grad-accum vs sampled, one fresh `milbench run` per point
  python benchmarks/bag_size_memory.py --results results/bag-size-cpu --cpu-time
  # image size: streamed vs plain trunk forward+backward, one fresh process per point
  python benchmarks/streaming_memory.py --out results/streaming-memory-cpu/cpu --trunks small \
    --sides 512 1024 2048 4096 8192 --tile small=512 --repeats 2 --mem-limit-gb 8
  python benchmarks/streaming_memory.py --out results/streaming-memory-cpu/cpu --trunks resnet34 \
    --sides 512 1024 2048 --tile resnet34=1920 --mem-limit-gb 8
  python benchmarks/streaming_memory.py --out results/streaming-memory-cpu/area --trunks resnet34 \
    --sides 2048 --tile resnet34=1920 --tile-shape area --mem-limit-gb 16
  # transcriptome CNN on mouse-brain: five backbones x two patch fields of view x 3 seeds
  bb=resnet18,efficientnet_b0,mobilenetv3_small_100,densenet121,convnext_atto
  milbench sweep -m transcriptome-cnn -d mouse-brain --grid backbone=$bb --seeds 0,1,2 --device cpu \
    --results results/mouse-brain-cpu
  milbench sweep -m transcriptome-cnn -d mouse-brain --grid backbone=$bb --seeds 0,1,2 --device cpu \
    --results results/mouse-brain-cpu --set instance_size=64 --set bag_size=4 --set n_train_bags=600 \
    --set patch_size=32 --set patch_fit=resize
fi

if [[ "$what" == tables || "$what" == all ]]; then
  milbench report --results results/reference --format markdown \
    --metric bag_auc --metric bag_accuracy --metric dice --metric train_cpu_s_per_bag --metric peak_mib \
    -o results/reference.md
  milbench report --results results/reference --format markdown --dataset mouse-brain \
    --metric mean_dice --metric dice --metric bag_auc -o results/reference-mouse-brain.md
  milbench plot --results results/reference --kind tradeoff --metric bag_auc -o results/tradeoff.png
  milbench plot --results results/reference --kind curves -o results/learning-curves.png
  milbench report --results results/bag-size-cpu --format markdown --metric train_s_per_bag --metric peak_mib \
    -o results/bag-size-cpu.md
  milbench report --results results/parity-cpu --format markdown --metric bag_auc --metric bag_accuracy \
    --metric dice -o results/parity-cpu.md
  milbench plot --results results/bag-size-cpu --x bag_size --logx -o results/bag-size-cpu.png
fi
