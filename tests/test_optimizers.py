"""``--client_optimizer`` as BackdoorBench's ``argparser_opt_scheduler`` builds it: Adam with AMSGrad and betas
(0.9, 0.999), which SAU and i-BAU (Adam at lr 1e-4 in their default configs) step their models with."""
import importlib
from types import SimpleNamespace

import pytest
import torch
from conftest import copy_record, run_args

from utils.train import build_optimizer


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_adam_has_amsgrad_and_backdoorbench_betas():
    optimizer = build_optimizer(_params(), SimpleNamespace(client_optimizer="Adam", lr=0.01, wd=5e-4))
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["amsgrad"] is True and optimizer.defaults["betas"] == (0.9, 0.999)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 5e-4


def test_sgd_and_adamw_unchanged():
    sgd = build_optimizer(_params(), SimpleNamespace(client_optimizer="sgd", lr=0.01, sgd_momentum=0.9, wd=5e-4))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(_params(), SimpleNamespace(client_optimizer="adamw", lr=0.01, wd=5e-4))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["amsgrad"] is False


class _Stop(Exception):
    pass


def built_optimizer(monkeypatch, tiny_data, tiny_record, tmp_path, name, flags=()):
    """The optimizer a defense hands the shared loop, from its own ``main`` (stopped there)."""
    module = importlib.import_module(f"defense.{name}")
    seen = []

    def stop_at_fit(model, loader, optimizer, *args, **kwargs):
        seen.append(optimizer)
        raise _Stop

    monkeypatch.setattr(module, "fit", stop_at_fit)
    copy_record(tiny_record, tmp_path)
    with pytest.raises(_Stop):
        module.main(["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--ratio", "0.5", *flags])
    (optimizer,) = seen
    return optimizer


@pytest.mark.parametrize("name", ["sau", "i-bau"])
def test_sau_and_ibau_step_the_model_with_amsgrad(monkeypatch, tiny_data, tiny_record, tmp_path, name):
    optimizer = built_optimizer(monkeypatch, tiny_data, tiny_record, tmp_path, name)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["amsgrad"] is True and optimizer.defaults["betas"] == (0.9, 0.999)
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 0.0


@pytest.mark.parametrize("flags,kind", [([], torch.optim.SGD), (["--client_optimizer", "adam"], torch.optim.Adam)])
def test_d3_honours_client_optimizer(monkeypatch, tiny_data, tiny_record, tmp_path, flags, kind):
    """D3 steps with the official code's SGD (momentum 0.9, no weight decay) by default, and with the
    optimizer ``--client_optimizer`` names when given, never ignoring it."""
    optimizer = built_optimizer(monkeypatch, tiny_data, tiny_record, tmp_path, "d3", flags)
    assert type(optimizer) is kind and optimizer.defaults["weight_decay"] == 0.0
    assert optimizer.defaults.get("momentum", 0.9) == 0.9 and optimizer.defaults.get("amsgrad", True) is True
