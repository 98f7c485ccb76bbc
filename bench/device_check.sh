#!/usr/bin/env bash
# The GPU check, run on a lent device machine (PyTorch preinstalled there, no Ray needed):
# the CUDA path of all five stages at the smoke preset, the paper preset briefly (256 px, ResNet-18, one epoch per
# stage on 2000 samples), and fit() vs a bare loop on the GPU.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi -L
python3 -c "import torch, torchvision, pyarrow; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
python3 -m cmkg train target --config smoke --set run.device=cuda --set run.progress=lines --out /tmp/runs 2>&1 | tee "$OUT/smoke_cuda.log" | tail -6
time python3 -m cmkg train kd --config paper --set data.source.num=2000 --set epochs.teacher=1 \
  --set epochs.student=1 --set epochs.kd=1 --set run.device=cuda --set run.loader_workers=4 \
  --set run.progress=lines --out /tmp/runs 2>&1 | tee "$OUT/paper_brief.log" | tail -12
python3 bench/bench_fit.py --arch resnet18 --size 256 --steps 20 --rounds 3 --device cuda 2>&1 | tee "$OUT/bench_fit_cuda.log"
python3 bench/bench_meta.py --arch resnet18 --size 256 --iters 3 --rounds 2 --device cuda 2>&1 | tee "$OUT/bench_meta_cuda.log"
# real-dataset layout through the CUDA path: an RHD-layout example converted at 256 px, then the
# paper preset's teacher, student and kd on the converted folder
python3 -c "from cmkg.data.convert.examples import write_rhd; write_rhd('/tmp/RHD', n_train=160, n_eval=40)"
python3 -m cmkg data convert rhd /tmp/RHD --out /tmp/rhd256 --size 256 2>&1 | tail -2
python3 -m cmkg train kd --config paper --set data.source.path=/tmp/rhd256 --set epochs.teacher=2 \
  --set epochs.student=2 --set epochs.kd=1 --set optim.batch_size=16 --set run.device=cuda \
  --set run.progress=lines --out /tmp/runs 2>&1 | tee "$OUT/paper_rhd.log" | tail -5
