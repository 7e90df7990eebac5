import pytest

from configurator import configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, dataset="demo", compile=False, n_kv_head=None)


def test_file_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\nbatch_size = 4 * 8\n_helper = 3\nlearning_rate = 1\n")
    cfg = configure(DEFAULTS, [str(cfg_file), "--dataset=shakespeare", "--compile=True", "--n_kv_head=2"])
    assert cfg == dict(batch_size=32, learning_rate=1.0, dataset="shakespeare", compile=True, n_kv_head=2)
    assert DEFAULTS["batch_size"] == 12  # defaults are not mutated
    assert configure(DEFAULTS, ["--learning_rate=3e-4"])["learning_rate"] == 3e-4


@pytest.mark.parametrize("argv, message", [
    (["--batch_size=1.5"], "'batch_size' must be int"),
    (["--compile=1"], "'compile' must be bool"),
    (["--dataset=3"], "'dataset' must be str"),
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--batch_size"], "expected --key=value"),
    (["no/such/config.py"], "config file 'no/such/config.py'"),
])
def test_errors_name_the_problem(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, argv)
    assert message in str(e.value)


def test_unknown_key_in_file(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batchsize = 4\n")
    with pytest.raises(SystemExit, match=r"c.py': unknown config key 'batchsize'"):
        configure(DEFAULTS, [str(cfg_file)])


def test_a_single_string_is_a_list_of_one():
    assert configure({"plot": []}, ["--plot=out/run"]) == {"plot": ["out/run"]}


def test_progress_writes_plain_lines_when_not_on_a_terminal(capsys):
    from configurator import progress
    for _ in progress(range(1000), desc="work", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and "work: 100%" in err.splitlines()[-1]
