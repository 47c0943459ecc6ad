
import json

import pytest
import torch
from conftest import copy_record, d3_args, expect_error

import defense.d3 as d3
from models import create_model
from utils.errors import UserError
from utils.record import (
    load_into,
    load_tensors,
    load_weights,
    read_yaml,
    safe_torch_load,
    save_tensors,
    sha256_file,
    torch_save,
    write_json,
)


def test_tensor_round_trip_and_atomic_write(tmp_path):
    model = create_model("preactresnet18_w8", 10)
    save_tensors(tmp_path / "m.safetensors", model.state_dict())
    other = create_model("preactresnet18_w8", 10)
    load_into(other, load_tensors(tmp_path / "m.safetensors"), "m")
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    write_json(tmp_path / "a.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.safetensors"]  # no temporaries left


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_unsafe_pickle_is_refused_and_does_not_run(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(UserError, match="refused to load"):
        safe_torch_load(path)
    with pytest.raises(UserError, match="refused to load"):
        load_weights(path)
    assert not sentinel.exists()


def test_plain_checkpoint_loads(tmp_path):
    torch_save(tmp_path / "ok.pt", {"model": {"w": torch.ones(2)}, "epoch": 3, "rows": [{"a": 1.0}]})
    assert safe_torch_load(tmp_path / "ok.pt")["epoch"] == 3
    assert torch.equal(load_weights(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_weights_that_do_not_fit_are_named(tmp_path):
    small = create_model("preactresnet18_w8", 10).state_dict()
    with pytest.raises(UserError, match="do not fit.*shape of"):
        load_into(create_model("preactresnet18_w16", 10), small, "x")
    with pytest.raises(UserError, match="missing"):
        load_into(create_model("preactresnet18_w8", 10), {k: v for k, v in small.items() if "linear" not in k}, "x")


def test_corrupted_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_tensors(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="missing file"):
        load_tensors(tmp_path / "absent.safetensors")


# Damage to record.json, the record's root of trust, each a change a defense must refuse in one line
# (exit 2, nothing written) rather than die with a traceback or defend a damaged record.
def _drop(key):
    return lambda meta: meta.pop(key)


def _set(*path_and_value):
    *path, value = path_and_value

    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


RECORD_DAMAGE = [
    ("no dataset", _drop("dataset"), "'dataset' is missing"),
    ("dataset a string", _set("dataset", "cifar10"), "'dataset' is str, not dict"),
    ("files a list", _set("files", ["model.safetensors"]), "'files' is list, not dict"),
    ("files emptied", _set("files", {}), "it lists no config.yaml"),
    ("target a string", _set("attack_target", "0"), "'attack_target' is str, not int"),
    ("attack __init__", _set("attack", "__init__"), "names attack '__init__', which this toolkit does not have"),
    ("attack a path", _set("attack", "../badnet"), "names attack '../badnet'"),
    ("model changed", _set("model", "preactresnet18_w16"), "where config.yaml's model is 'preactresnet18_w8'"),
    ("num_classes changed", _set("dataset", "num_classes", 43), "where cifar10's number of classes is 10"),
    ("num_classes a string", _set("dataset", "num_classes", "10"), "the dataset's 'num_classes' is not int"),
    ("a file outside", _set("files", "../x", "0" * 64), "plain file names"),
]


@pytest.mark.parametrize("what,damage,message", RECORD_DAMAGE, ids=[d[0] for d in RECORD_DAMAGE])
def test_damaged_record_json_is_refused_in_one_line(capsys, tiny_data, tiny_record, tmp_path, what, damage, message):
    import json

    from conftest import copy_record, expect_error, run_args

    import defense.d3 as d3
    rec = copy_record(tiny_record, tmp_path)
    meta = json.loads((rec / "record.json").read_text())
    damage(meta)
    (rec / "record.json").write_text(json.dumps(meta))
    expect_error(capsys, d3.main, ["--result_file", "badnet", *run_args(tiny_data, tmp_path), "--epochs", "1"],
                 message)
    assert not (rec / "defense").exists()


def test_missing_files_are_named(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    (rec / "summary.json").unlink()
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "summary.json is missing; the record is incomplete")
    (rec / "record.json").unlink()
    err = expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "record.json, written last by a finished run, "
                       "is missing")
    assert "model.safetensors" in err  # says what is there
    (rec / "checkpoint.pt").write_bytes(b"")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "its run was interrupted")


def test_flipped_bytes_in_the_weights_are_caught(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    data = bytearray((rec / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 100, header + 1100):  # 1,000 bytes inside the tensor data
        data[i] ^= 0xFF
    (rec / "model.safetensors").write_bytes(bytes(data))
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path),
                 "model.safetensors does not match the SHA-256 in")
    assert not (rec / "defense").exists()


def _rewrite(rec, name, text):
    """Edit a record file and its hash alike, as a user who knows the format might."""
    (rec / name).write_text(text)
    meta = json.loads((rec / "record.json").read_text())
    meta["files"][name] = sha256_file(rec / name)
    (rec / "record.json").write_text(json.dumps(meta))


def test_config_yaml_faults_are_one_line(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    sentinel = tmp_path / "pwned"
    original = (rec / "config.yaml").read_text()
    (rec / "config.yaml").write_text(original + "x: 1\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml does not match the SHA-256")
    _rewrite(rec, "config.yaml", "model: [unclosed\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml is not plain YAML")
    _rewrite(rec, "config.yaml", f"model: !!python/object/apply:os.system ['touch {sentinel}']\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml is not plain YAML")
    assert not sentinel.exists()
    _rewrite(rec, "config.yaml", "[1, 2]\n")
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "does not hold a mapping")
    (rec / "config.yaml").unlink()
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path), "config.yaml is missing")
    with pytest.raises(UserError, match="not plain YAML"):
        read_yaml(_write(tmp_path / "t.yaml", "a: !!python/name:os.system\n"))


def _write(path, text):
    path.write_text(text)
    return path


def test_older_record_format_is_refused(capsys, tiny_data, tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path)
    meta = json.loads((rec / "record.json").read_text())
    meta["format_version"] = 1
    (rec / "record.json").write_text(json.dumps(meta))
    expect_error(capsys, d3.main, d3_args(tiny_data, tmp_path),
                 "has record format version 1, this toolkit reads version 2 only; rerun the step that wrote it")
