import pytest

from utils.config import add_common_arguments, new_parser, resolve_config, str2bool
from utils.errors import UserError


def _parser():
    p = new_parser("t")
    add_common_arguments(p)
    p.add_argument("--pratio", type=float)
    return p


def test_merge_order_defaults_layers_yaml_path_flags(tmp_path):
    (tmp_path / "proto.yaml").write_text("epochs: 100\nlr: 0.01\nbatch_size: 128\n")
    (tmp_path / "default.yaml").write_text("lr: 0.02\npratio: 0.1\n")
    (tmp_path / "extra.yaml").write_text("batch_size: 64\npratio: 0.2\n")
    cfg = resolve_config(_parser(), [tmp_path / "proto.yaml", tmp_path / "default.yaml", {"epochs": 7}],
                         ["--yaml_path", str(tmp_path / "extra.yaml"), "--pratio", "0.3"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.pratio) == (7, 0.02, 64, 0.3)
    assert cfg.device == "auto" and cfg.eval_every == 1  # the common defaults, lowest layer


def test_yaml_values_are_typed_and_unknown_keys_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 1\namp: 'false'\n")
    cfg = resolve_config(_parser(), [tmp_path / "a.yaml"], [])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.amp is False
    (tmp_path / "b.yaml").write_text("epochs: many\n")
    with pytest.raises(UserError, match="not a valid value for --epochs"):
        resolve_config(_parser(), [tmp_path / "b.yaml"], [])
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rate'"):
        resolve_config(_parser(), [tmp_path / "c.yaml"], [])
    with pytest.raises(UserError, match="not found"):
        resolve_config(_parser(), [tmp_path / "absent.yaml"], [])


@pytest.mark.parametrize("argv,yaml_text,message", [
    (["--lr", "nan"], "", "--lr nan is not a finite number"),
    (["--lr", "inf"], "", "--lr inf is not a finite number"),
    (["--wd=-inf"], "", "--wd -inf is not a finite number"),
    ([], "pratio: .nan\n", "--pratio nan is not a finite number"),
])
def test_number_flags_must_be_finite(tmp_path, argv, yaml_text, message):
    (tmp_path / "a.yaml").write_text(yaml_text or "lr: 0.1\n")
    with pytest.raises(UserError, match=message):
        resolve_config(_parser(), [tmp_path / "a.yaml"], argv)


def test_str2bool():
    assert str2bool("True") and str2bool("1") and not str2bool("off")
    with pytest.raises(Exception):
        str2bool("maybe")


def test_bd_yaml_path_replaces_the_attack_defaults(tmp_path):
    """BackdoorBench's --bd_yaml_path: the attack's defaults file, between the prototype and --yaml_path."""
    from attack.badnet import BadNet
    from attack.runner import _base_files
    from utils.config import CONFIG_DIR
    (tmp_path / "bd.yaml").write_text("pratio: 0.05\n")
    files = _base_files(BadNet)
    assert files({})[1] == CONFIG_DIR / "attack" / "badnet" / "default.yaml"
    assert files({"bd_yaml_path": str(tmp_path / "bd.yaml")})[1] == tmp_path / "bd.yaml"
    missing = files({"bd_yaml_path": str(tmp_path / "none.yaml")})[1]
    with pytest.raises(UserError, match="none.yaml not found"):
        resolve_config(_parser(), [missing], [])
