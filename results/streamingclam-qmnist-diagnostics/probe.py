"""In-process probe: why streamingclam stays on the 0.693 plateau on qmnist (README.md here).

Trains the CLAM head (plugins/streamingclam/clam.py) without streaming (the gradients are the same),
with the protocol's AdamW (lr 1e-3, weight decay 1e-2), 4 bags per step, clipping at 1.0, no warm-up,
on qmnist seed 1's 200 training bags, and prints per epoch the mean training loss, the feature scale,
the share of the last bag's feature-map values that are zero (dead ReLUs) and the attention's entropy
(ln of the number of positions = uniform attention).

    MILBENCH_DATA_ROOT=../shared/data OMP_NUM_THREADS=1 python results/streamingclam-qmnist-diagnostics/probe.py VARIANT [EPOCHS]

VARIANT: small | lenet | lenet-pool7 (a trunk over the bag image; pool7 max-pools the stride-4 map to
one position per 28-px digit cell) | instances (the same LeNet applied to each digit, as abmil does,
then the same CLAM head over the 20 instance vectors). The trunks are built as the method builds them:
weight-standardised since that became the from-scratch trunks' default; add ``-plain`` to a trunk
variant for one without (``small-plain`` is what ``small`` was before).
"""

import itertools
import math
import os
import sys

import torch

from milbench.config import resolve
from milbench.models.encoders import LeNetEncoder
from milbench.plugins import get_registry
from milbench.protocol import PROTOCOL_PARAMS
from milbench_plugins.streamingclam.clam import CLAMHead, clam_loss
from milbench_plugins.streamingclam.trunk import build_trunk

torch.set_num_threads(1)
variant = sys.argv[1]
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 8
reg = get_registry()
ds, method = reg.get("dataset", "qmnist"), reg.get("method", "streamingclam")
cfg = resolve({**PROTOCOL_PARAMS, **dict(ds.params), **dict(method.params)},
              [("dataset", ds.defaults), ("method", method.defaults)], [])
bags = ds.load(cfg, 1, os.environ.get("MILBENCH_DATA_ROOT")).train
torch.manual_seed(1)
if variant == "instances":
    encoder = LeNetEncoder(1, 28, 500)
    head = CLAMHead(500, 128, 64, 2)
else:
    encoder = build_trunk("lenet" if variant.startswith("lenet") else "small", 1, None, False,
                          "off" if variant.endswith("plain") else "auto")
    head = CLAMHead(encoder.out_channels, 128, 64, 2, pool=7 if "pool7" in variant else 0)
params = [*encoder.parameters(), *head.parameters()]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
total = 0.0
for step, bag in enumerate(itertools.chain(*[bags] * epochs)):
    if variant == "instances":
        f = encoder(bag.instances)  # (20, 500)
        f = f.t().reshape(f.shape[1], 1, -1)  # the 20 instance vectors as a 1 x 20 "map"
    else:
        f = encoder(bag.image().unsqueeze(0))
    out = head(f)
    loss = clam_loss(out, bag.label)
    loss.backward()
    total += loss.item()
    if step % 4 == 3:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    if (step + 1) % len(bags) == 0:
        a, f = out.attention.detach(), f.detach()
        entropy = float(-(a * a.clamp_min(1e-12).log()).sum())
        print(f"epoch {(step + 1) // len(bags)}: train loss {total / len(bags):.3f}  feature mean "
              f"{float(f.mean()):.3g}  dead {float((f <= 0).float().mean()):.2f}  attention entropy {entropy:.2f} (uniform: {math.log(a.numel()):.2f}, "
              f"{a.numel()} positions)", flush=True)
        total = 0.0
