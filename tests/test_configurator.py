import pytest

from configurator import configure


def scope():
    return dict(batch_size=8, lr=1e-4, out_dir='out', compile=False, device=None,
                betas=(0.9, 0.95), targets=['q', 'v'], _private=1)


def test_command_line_overrides():
    s = scope()
    configure(s, ['--batch_size=32', '--lr=3e-5', '--out_dir=123', '--compile=True',
                  '--device=cuda', '--betas=(0.8, 0.99)', "--targets=['k']"])
    assert s['batch_size'] == 32 and s['lr'] == 3e-5 and s['compile'] is True
    assert s['out_dir'] == '123'  # strings are taken as written
    assert s['device'] == 'cuda' and s['betas'] == (0.8, 0.99) and s['targets'] == ['k']


def test_bare_flag_sets_a_boolean():
    s = scope()
    configure(s, ['--compile'])
    assert s['compile'] is True
    with pytest.raises(ValueError, match='--key=value'):
        configure(s, ['--lr'])


def test_int_is_accepted_for_a_float_and_list_for_a_tuple():
    s = scope()
    configure(s, ['--lr=1', '--betas=[0.5, 0.6]'])
    assert s['lr'] == 1.0 and isinstance(s['lr'], float)
    assert s['betas'] == (0.5, 0.6) and isinstance(s['betas'], tuple)


def test_unknown_key_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'batch_sise'.*batch_size"):
        configure(scope(), ['--batch_sise=4'])


def test_wrong_type_is_an_error():
    with pytest.raises(ValueError, match="'batch_size'.*expects int"):
        configure(scope(), ['--batch_size=0.5'])
    with pytest.raises(ValueError, match="'compile'.*expects bool"):
        configure(scope(), ['--compile=1'])
    with pytest.raises(ValueError, match="'lr'.*expects float"):
        configure(scope(), ['--lr=fast'])


def test_config_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("import math\nbatch_size = 4\nlr = math.pi\n_scratch = 3\n")
    s = scope()
    configure(s, [str(f), '--batch_size=2'])  # later arguments win
    assert s['batch_size'] == 2 and s['lr'] == pytest.approx(3.14159, rel=1e-5)


def test_config_file_unknown_key_and_bad_type(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=r"'learning_rate' \(.*c\.py\)"):
        configure(scope(), [str(f)])
    f.write_text("batch_size = 'big'\n")
    with pytest.raises(ValueError, match="expects int"):
        configure(scope(), [str(f)])


def test_bad_arguments():
    with pytest.raises(ValueError, match='cannot read config file'):
        configure(scope(), ['missing.py'])
    with pytest.raises(ValueError, match='--key=value'):
        configure(scope(), ['--batch_size'])
    with pytest.raises(ValueError, match='unknown config key'):
        configure(scope(), ['--_private=2'])
