"""The guard against the oneDNN bug of PyTorch 2.14.1 (see ``utils/device.py`` above ``place_model``): a
narrow strided 1x1 convolution's weight gradient in channels_last corrupts the heap on an AVX-512 CPU. The
runs that can crash go to a subprocess, so a crash is a failed test, not a dead pytest."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models import create_model
from utils.device import _is_nchw, onednn_unsafe, place_model

ROOT = Path(__file__).resolve().parents[1]

# The shapes that crashed here without the guard: 64x64 images at batch 32, and 32x32 (CIFAR-10, GTSRB) at an
# odd batch; then the same after the model was put in channels_last again, past place_model.
NARROW_TRAINING = textwrap.dedent("""
    import torch
    from models import create_model
    from utils.device import place_model
    torch.manual_seed(0)
    for classes, batch, size, again in [(10, 32, 64, False), (43, 9, 32, False), (10, 9, 32, True)]:
        model = place_model(create_model("preactresnet18_w8", classes), torch.device("cpu")).train()
        if again:
            model = model.to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        model(x).pow(2).mean().backward()  # one step was enough to crash
    print("survived")
""")


def test_narrow_model_trains_on_cpu_without_a_native_crash():
    try:
        run = subprocess.run([sys.executable, "-c", NARROW_TRAINING], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("training preactresnet18_w8 on CPU hung (the oneDNN bug hangs on AVX2)")
    signal = f" (signal {-run.returncode})" if run.returncode < 0 else ""
    assert run.returncode == 0 and "survived" in run.stdout, \
        f"training preactresnet18_w8 on CPU died, exit {run.returncode}{signal}: {run.stderr[-2000:]}"


@pytest.mark.parametrize("name,guarded", [("preactresnet18_w8", ["layer2.0.shortcut.0"]),
                                          ("preactresnet18_w16", []), ("preactresnet18", [])])
def test_only_the_narrow_strided_1x1_convolutions_are_guarded(name, guarded):
    model = place_model(create_model(name, 10), torch.device("cpu"))
    assert [n for n, m in model.named_modules() if onednn_unsafe(m)] == guarded
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):  # the guarded weights in NCHW, every other one in channels_last
            assert _is_nchw(m.weight) == (n in guarded), n
            assert bool(m._forward_pre_hooks) == (n in guarded), n
    place_model(model, torch.device("cpu"))  # placing again adds no second hook
    assert all(len(m._forward_pre_hooks) == 1 for n, m in model.named_modules() if n in guarded)
    copied = copy.deepcopy(model)  # the runner's speed estimate and frozen copies train or run a deep copy
    assert all(len(m._forward_pre_hooks) == 1 for n, m in copied.named_modules() if n in guarded)


def test_guarded_model_computes_what_the_nchw_model_does(monkeypatch):
    torch.manual_seed(0)
    reference = create_model("preactresnet18_w8", 10).train()
    guarded = place_model(create_model("preactresnet18_w8", 10), torch.device("cpu")).train()
    guarded.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 16, 16)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the guard's own arithmetic, away from the bug
    reference(x).pow(2).mean().backward()
    guarded(x.contiguous(memory_format=torch.channels_last)).pow(2).mean().backward()
    for (n, a), b in zip(reference.named_parameters(), guarded.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)
