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


# The real IU X-ray report tables (no images), for the tests that read real report text.
# Point CHEXQUERY_IU_TABLES at a folder holding indiana_reports.csv and indiana_projections.csv;
# without it those tests skip.
IU_TABLES = os.environ.get('CHEXQUERY_IU_TABLES', '')
needs_iu_tables = pytest.mark.skipif(not os.path.isfile(os.path.join(IU_TABLES, 'indiana_reports.csv')),
                                     reason='set CHEXQUERY_IU_TABLES to the IU X-ray report tables to run this')


def run_script(*args, check=True, timeout=600):
    """Runs `python <script> args...` from the project root, offline; returns the CompletedProcess."""
    import subprocess
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, HF_HUB_OFFLINE='1', PYTHONWARNINGS='default'))
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def tiny_train_args(data_dir, out_dir, **overrides):
    """train.py arguments for a few seconds of the phantom demo on the 64 px test set."""
    kw = dict(data_dir=data_dir, out_dir=out_dir, image_size=64, batch_size=8, gradient_accumulation_steps=1,
              warmup_iters=5, eval_interval=1000, log_interval=1, num_workers=0, sample_reports=1, max_iters=30)
    kw.update(overrides)
    return ['train.py', 'config/phantom.py'] + [f'--{k}={v}' for k, v in kw.items()]


@pytest.fixture(scope='session')
def tiny_run(phantom_dir, tmp_path_factory):
    """out_dir of a 30-iteration phantom training run (ckpt.safetensors, metrics.jsonl, its stdout)."""
    out = str(tmp_path_factory.mktemp('runs') / 'tiny')
    r = run_script(*tiny_train_args(phantom_dir, out))
    with open(os.path.join(out, 'stdout.txt'), 'w') as f:
        f.write(r.stdout + r.stderr)
    return out
