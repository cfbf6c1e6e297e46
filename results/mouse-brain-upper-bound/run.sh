#!/usr/bin/env bash
# What limits the MIL methods on mouse-brain: an instance-supervised upper bound and the split bands.
# Every point a fresh `milbench run`, single-threaded, results in this folder.
#   MILBENCH_DATA_ROOT=../shared/data bash results/mouse-brain-upper-bound/run.sh
# (the oracle ceiling -- bag AUC from the test bags' true tile labels -- is oracle.py beside this file)
set -u
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=results/mouse-brain-upper-bound
SEEDS=${SEEDS:-"0 1 2"}
for s in $SEEDS; do
  # instance-supervised upper bound: resnet18 on the training area's region tiles, labelled by the class map
  # (the test bags' distribution and labels), bag score = mean P(gene A) (the region rule is a key share) or max
  for score in mean max; do
    milbench run -m transcriptome-cnn -d mouse-brain --seed $s --device cpu --results $OUT \
      --set train_bags=regions --set bag_score=$score
  done
  # the MIL baseline on the same region bags (bag labels only)
  milbench run -m abmil -d mouse-brain --seed $s --device cpu --results $OUT --set train_bags=regions
  # the same, validation and test bands swapped: is the test band harder than the validation band?
  milbench run -m abmil -d mouse-brain --seed $s --device cpu --results $OUT --set train_bags=regions \
    --set test_band=0.8 --set test_band_width=0.15 --set val_band=0.3 --set val_band_width=0.2
done
