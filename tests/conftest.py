"""Shared test setup: never touch the network, and one small phantom set per session."""
import os
import sys

import pytest

os.environ['HF_HUB_OFFLINE'] = '1'  # a hub name fails at once instead of after ~28 s of retries
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope='session')
def phantom_dir(tmp_path_factory):
    """A small phantom set (64 px) in the prepared format, made once per test session."""
    import phantom
    d = str(tmp_path_factory.mktemp('data') / 'phantom')
    phantom.generate(d, n_train=96, n_val=32, n_test=32, image_size=64, seed=0, workers=1)
    return d
