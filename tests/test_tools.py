"""The tools (tools/): the throughput benchmark compares models."""




def test_throughput_compares_models(tiny_data, capsys):
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "tools" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dataset_path", str(tiny_data["pickles"]), "--models", "preactresnet18_w8,vit_tiny_test",
                "--steps", "1", "--device", "cpu"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert set(rows) == {"model", "preactresnet18_w8", "vit_tiny_test"}
    assert all(float(rows[m][2]) > 0 and float(rows[m][3]) > 0 for m in ("preactresnet18_w8", "vit_tiny_test"))
