"""analysis/tsne.py (Figure 4a): the features are the classifier layer's input, every subsampled point is
embedded once per model, seeded runs repeat exactly, bad input is one line, and a missing scikit-learn
(the optional extra ``analysis``) is one line naming the extra."""
import importlib
import sys

import pytest
import torch
from conftest import copy_record, expect_error, run_args
from test_analysis import analysis_files, rows_of

from attack.record import load_model
from utils.loader import Normalizer
from utils.sources import load_dataset

tsne = importlib.import_module("analysis.tsne")
d3 = importlib.import_module("defense.d3")

N = 40
FAST = ["--n", str(N), "--perplexity", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def defended(tiny_data, tiny_record, tmp_path_factory):
    root = tmp_path_factory.mktemp("tsne")
    rec = copy_record(tiny_record, root)
    d3.main(["--result_file", "badnet", *run_args(tiny_data, root), "--epochs", "1", "--ratio", "0.5",
             "--batch_size", "50"])
    return rec


def test_the_features_are_the_classifier_layers_input(defended, tiny_data):
    model = load_model(defended)
    spec = load_dataset("cifar10", tiny_data["pickles"]).spec
    images = torch.as_tensor(tiny_data["x_test"][:16])
    normalizer = Normalizer(spec.mean, spec.std, "cpu")
    feats, logits = tsne.penultimate_features(model, "preactresnet18_w8", images, normalizer, device="cpu",
                                              batch_size=5)  # several batches, a short last one
    with torch.no_grad():
        x = normalizer(images)
        out = model.layer4(model.layer3(model.layer2(model.layer1(model.conv1(x)))))
        manual = torch.flatten(model.avgpool(out), 1)  # what PreActResNet.forward hands to ``linear``
        assert feats.shape == (16, model.linear.in_features)
        assert torch.allclose(feats, manual, atol=1e-5)
        assert torch.allclose(logits, model.linear(manual), atol=1e-5)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert not model._forward_pre_hooks and not model.linear._forward_pre_hooks  # the hook is gone


def test_the_clean_subsample_is_balanced_and_seeded():
    labels = torch.arange(100) % 10
    a = tsne.balanced_subsample(labels, 40, torch.Generator().manual_seed(0))
    b = tsne.balanced_subsample(labels, 40, torch.Generator().manual_seed(0))
    c = tsne.balanced_subsample(labels, 40, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a.unique()) == 40 and torch.bincount(labels[a], minlength=10).tolist() == [4] * 10
    uneven = torch.tensor([0] * 50 + [1] * 2 + [2] * 48)
    picked = tsne.balanced_subsample(uneven, 30, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(uneven[picked]).tolist()) == [2, 14, 14]  # the small class whole, the rest even
    assert len(tsne.balanced_subsample(uneven, 500, torch.Generator())) == 100  # fewer than asked: all


def test_tsne_embeds_2n_points_per_model_and_repeats_exactly(defended, tiny_data, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn is the optional extra 'analysis'")
    argv = ["--result_file", "badnet", *run_args(tiny_data, defended.parent), "--defense", "d3", *FAST]
    rows = tsne.main(argv)
    written = rows_of(defended / "analysis" / "tsne_d3.csv")
    assert len(written) == len(rows) == 2 * 2 * N
    assert set(written[0]) == {"model", "set", "index", "true_label", "pred_label", "x", "y"}
    for model in ("attacked", "d3"):
        part = [r for r in written if r["model"] == model]
        assert [r["set"] for r in part].count("clean") == [r["set"] for r in part].count("backdoor") == N
        clean = [int(r["true_label"]) for r in part if r["set"] == "clean"]
        assert sorted(clean.count(k) for k in range(10)) == [4] * 10  # balanced over the classes
    key = [(r["set"], r["index"]) for r in written]
    assert key[:2 * N] == key[2 * N:]  # the same points under both models
    assert (defended / "analysis" / "tsne_d3.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out

    tsne.main(argv + ["--out", str(tmp_path / "again")])
    assert (tmp_path / "again.csv").read_bytes() == (defended / "analysis" / "tsne_d3.csv").read_bytes()
    tsne.main(argv + ["--random_seed", "1", "--out", str(tmp_path / "other")])
    assert (tmp_path / "other.csv").read_bytes() != (tmp_path / "again.csv").read_bytes()


def test_tsne_of_the_attacked_model_alone(defended, tiny_data, tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn is the optional extra 'analysis'")
    tsne.main(["--result_file", "badnet", *run_args(tiny_data, defended.parent), *FAST, "--out", str(tmp_path / "a")])
    written = rows_of(tmp_path / "a.csv")
    assert len(written) == 2 * N and {r["model"] for r in written} == {"attacked"}
    assert (tmp_path / "a.png").is_file()


@pytest.mark.parametrize("extra,pattern", [
    (["--result_file", "nothing"], "no finished attack record"),
    (["--defense", "nc"], "no finished defense output"),
    (["--defense", "bogus"], "no defense of this toolkit"),
    (["--defense", "d3,,ft"], "--defense"),
    (["--n", "0"], "--n 0"),
    (["--perplexity", "0"], "--perplexity 0"),
    (["--perplexity", "nan"], "--perplexity nan"),
    (["--perplexity", "80"], "below the number of points"),
    (["--batch_size", "0"], "--batch_size 0"),
])
def test_tsne_bad_input_is_one_line_and_writes_nothing(defended, tiny_data, capsys, extra, pattern):
    pytest.importorskip("sklearn", reason="scikit-learn is the optional extra 'analysis'")
    before = analysis_files(defended)
    argv = ["--result_file", "badnet", *run_args(tiny_data, defended.parent), *FAST, *extra]
    expect_error(capsys, tsne.main, argv, pattern)
    assert analysis_files(defended) == before


def test_a_missing_scikit_learn_is_one_line_naming_the_extra(defended, tiny_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn... now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    before = analysis_files(defended)
    err = expect_error(capsys, tsne.main, ["--result_file", "badnet", *run_args(tiny_data, defended.parent), *FAST],
                       "pip install -e '.[analysis]'")
    assert "scikit-learn" in err
    assert analysis_files(defended) == before
