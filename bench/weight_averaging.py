"""The hand-written WeightAverage that training used until issue 16 vs torch.optim.swa_utils.AveragedModel (as
training uses it now, with ``training._running_mean``) on one sequence of models: the default network (depth 3,
16 filters, 2D, batch norm) trained with Adam on random tiles; numerics and cost per update.

    python bench/weight_averaging.py [STEPS]     (in a git clone: the old class is read from commit 3ac8a4c)
"""

import ast
import statistics
import subprocess
import sys
import time

import torch
import torch.optim.swa_utils as swa
from torch.optim.swa_utils import AveragedModel

from napari_unet.losses import masked_loss
from napari_unet.model import UNet
from napari_unet.training import _running_mean

OLD = subprocess.run(
    ["git", "show", "3ac8a4c:src/napari_unet/training.py"], capture_output=True, text=True, check=True
).stdout
node = next(n for n in ast.parse(OLD).body if isinstance(n, ast.ClassDef) and n.name == "WeightAverage")
namespace = {"torch": torch}
exec(ast.get_source_segment(OLD, node), namespace)  # the class training no longer has
WeightAverage = namespace["WeightAverage"]

torch.manual_seed(0)
torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40


model = UNet(in_channels=1, n_classes=2, ndim=2, depth=3, base_filters=16).train()
n_params = sum(p.numel() for p in model.parameters())
n_buf = sum(b.numel() for b in model.buffers())
out = model.legal_output_shape(96)
inp = model.legal_input_shape(out)
x = torch.randn(4, 1, *inp)
y = torch.randint(-1, 2, (4, *out))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
old, default, custom = WeightAverage(), None, None
step_times = []
for _ in range(steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = masked_loss(model(x), y, torch.ones(2))
    loss.backward()
    opt.step()
    step_times.append(time.perf_counter() - t)
    old.update(model)
    if default is None:
        default = AveragedModel(model, use_buffers=True)
        custom = AveragedModel(model, use_buffers=True, multi_avg_fn=_running_mean)
    default.update_parameters(model)
    custom.update_parameters(model)


def compare(name, averaged):
    state = averaged.module.state_dict()
    fl = [k for k, v in old.state.items() if v.is_floating_point()]
    d = max(float((state[k] - old.state[k]).abs().max()) for k in fl)
    rel = max(float(((state[k] - old.state[k]).abs() / old.state[k].abs().clamp_min(1e-30)).max()) for k in fl)
    ints = [k for k, v in old.state.items() if not v.is_floating_point()]
    print(
        f"{name}: float tensors max|diff| {d:.3g} (max rel {rel:.3g}), bit-identical "
        f"{all(torch.equal(state[k], old.state[k]) for k in fl)}; num_batches_tracked "
        f"{state[ints[0]].item()} (old: {old.state[ints[0]].item()}, model: {model.state_dict()[ints[0]].item()})"
    )


print(
    f"torch {torch.__version__}, threads 1; default UNet {n_params} parameters, {n_buf} buffer values, "
    f"tile {tuple(inp)}, {steps} steps averaged; training step median {statistics.median(step_times[2:]):.3f} s"
)
compare("AveragedModel default avg", default)
compare("AveragedModel + _running_mean", custom)
print(
    "largest |weight| in the average:", max(float(v.abs().max()) for v in old.state.values() if v.is_floating_point())
)

# CUDA takes AveragedModel's foreach path (cpu is not a foreach device): exercise that path here

saved = swa._get_foreach_kernels_supported_devices
swa._get_foreach_kernels_supported_devices = lambda: ["cpu"]
try:
    probe = AveragedModel(model, use_buffers=True)
    probe.update_parameters(model)
    probe.update_parameters(model)
    print("foreach path (as on CUDA): ok")
except RuntimeError as e:
    print("foreach path (as on CUDA): RuntimeError:", str(e)[:70])
finally:
    swa._get_foreach_kernels_supported_devices = saved


# cost per update: 100 updates in a row per timing, the three averagers in turn (so load drifts hit all), 7 rounds
def per_update(update, n=100):
    t = time.perf_counter()
    for _ in range(n):
        update(model)
    return (time.perf_counter() - t) / n * 1e3


names = {
    "WeightAverage (old)": old.update,
    "AveragedModel default": default.update_parameters,
    "AveragedModel + _running_mean": custom.update_parameters,
}
runs = {name: [] for name in names}
for _ in range(7):
    for name, update in names.items():
        runs[name].append(per_update(update))
for name, r in runs.items():
    print(f"per update {name:30s} median {statistics.median(r):.2f} ms (range {min(r):.2f}-{max(r):.2f})")
ts = []
for _ in range(5):
    t = time.perf_counter()
    AveragedModel(model, use_buffers=True)
    ts.append((time.perf_counter() - t) * 1e3)
print(
    f"AveragedModel construction (deepcopy): median {statistics.median(ts):.2f} ms (range {min(ts):.2f}-{max(ts):.2f})"
)
ts = []
for _ in range(5):
    t = time.perf_counter()
    w = WeightAverage()
    w.update(model)
    ts.append((time.perf_counter() - t) * 1e3)
print(f"WeightAverage first update (clone): median {statistics.median(ts):.2f} ms (range {min(ts):.2f}-{max(ts):.2f})")
