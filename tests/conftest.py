"""Shared test setup: never touch the network, one small phantom set and one tiny training run
per session, train.py run in this process, and raw-data fixtures."""
import json
import os
import sys

import pytest

os.environ['HF_HUB_OFFLINE'] = '1'  # a hub name fails at once instead of after ~28 s of retries
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (a module opts in with pytestmark): at the tiny sizes a
    second thread gains little, and on a shared 2-core machine OpenMP's waiting threads made
    steps up to 3x slower (10 tiny training steps: 5.7 s on one thread, 10.8 s on two)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the tiny model and a batch for it --------------------------------------------------
S, V = 64, 64  # the tiny model's image size (a 4 x 4 patch grid) and vocabulary


def tiny(image_size=S, **config):
    """The tiny CheXQuery, random weights from seed 0: every call builds the same model."""
    import torch
    from chexquery import CheXQuery, tiny_config
    torch.manual_seed(0)
    return CheXQuery(tiny_config(vocab_size=V, image_size=image_size, **config))


def batch(B=2, T=10, seed=0, image_size=S):
    """(images, decoder_input_ids, labels, cond_labels) for tiny(): random images and tokens,
    the first two label positions a prompt (-100), random 0/1 condition labels."""
    import torch
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, image_size, image_size, generator=g)
    tokens = torch.randint(3, V, (B, T), generator=g)
    decoder_input_ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), tokens[:, :-1]], 1)
    labels = tokens.clone()
    labels[:, :2] = -100
    cond = torch.randint(0, 2, (B, 14), generator=g).float()
    return images, decoder_input_ids, labels, cond


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


def train_in_process(data_dir, out_dir, **overrides):
    """Runs train.py in this process (no interpreter start, no second import of torch) with
    tiny_train_args; returns (exit code, what it printed). Its errors are raised as they are.
    Patch chexquery.CheXQuery.forward beforehand to make a step misbehave."""
    import contextlib
    import io
    import runpy
    import signal
    import torch
    argv, handler, out, threads = sys.argv, signal.getsignal(signal.SIGINT), io.StringIO(), torch.get_num_threads()
    sys.argv = tiny_train_args(data_dir, out_dir, **overrides)
    code = 0
    torch.set_num_threads(1)  # see one_thread
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)  # train.py installs its Ctrl-C handler
        torch.set_num_threads(threads)
    return code, out.getvalue()


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    """{iteration: training loss} of a run's metrics.jsonl."""
    return {m['iter']: m['loss'] for m in read_metrics(out_dir) if 'loss' in m}


@pytest.fixture(scope='session')
def tiny_run(phantom_dir, tmp_path_factory):
    """out_dir of a 30-iteration phantom training run (ckpt.safetensors, metrics.jsonl, its stdout)."""
    out = str(tmp_path_factory.mktemp('runs') / 'tiny')
    code, printed = train_in_process(phantom_dir, out)
    assert code == 0, printed[-3000:]
    with open(os.path.join(out, 'stdout.txt'), 'w') as f:
        f.write(printed)
    return out


# --- raw data in the datasets' real layouts ----------------------------------------------
def write_csv(path, header, rows):
    import csv
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def iu_fixture(root, n=20):
    """IU X-ray in the Kaggle layout: n studies with one frontal and one lateral image each,
    plus the odd cases (1: XXXX to clean, 2: findings empty, 3: both empty, 4: no frontal)."""
    import numpy as np
    from PIL import Image
    images = root / 'images' / 'images_normalized'
    images.mkdir(parents=True)
    reports = [('1', 'The heart is normal.There is no XXXX effusion. Lungs are clear.', 'No acute disease.'),
               ('2', '', 'Cardiomegaly.'),                         # findings empty: kept
               ('3', 'XXXX XXXX.', 'XXXX.'),                      # both empty after cleaning: dropped
               ('4', 'Small left pleural effusion.', 'Effusion.')]  # no frontal image: dropped
    reports += [(str(i), f'Finding number {i}.', 'Normal.') for i in range(5, n + 1)]
    write_csv(root / 'indiana_reports.csv', ['uid', 'MeSH', 'Problems', 'image', 'indication', 'comparison',
                                            'findings', 'impression'],
              [(u, 'normal', 'normal', 'Xray Chest', 'Cough. XXXX pain.', '', f, i) for u, f, i in reports])
    rows = []
    for u, _, _ in reports:
        if u != '4':
            rows.append((u, f'{u}_IM-1.dcm.png', 'Frontal'))
        rows.append((u, f'{u}_IM-2.dcm.png', 'Lateral'))
    write_csv(root / 'indiana_projections.csv', ['uid', 'filename', 'projection'], rows)
    rng = np.random.default_rng(0)
    for u, name, _ in rows:
        Image.fromarray(rng.integers(0, 255, (700, 600), dtype=np.uint8)).save(images / name)
    return root


@pytest.fixture(scope='session')
def random_run(phantom_dir, tmp_path_factory):
    """A run directory with an untrained tiny checkpoint on the phantom set: the generation
    path in-process in seconds (what it writes is noise; its shape is what is checked)."""
    import torch
    import data
    from checkpoint import save_checkpoint
    from chexquery import CheXQuery, tiny_config
    torch.manual_seed(0)
    model = CheXQuery(tiny_config(vocab_size=len(data.load_tokenizer(phantom_dir)), image_size=64))
    config = dict(data_dir=phantom_dir, target='both', max_len=64, uncertain='positive', tokenizer='',
                  model_size='tiny', text_model='')
    out = tmp_path_factory.mktemp('random_run')
    save_checkpoint(out / 'ckpt.safetensors', model, dict(config=config))
    return str(out)


# --- files that are not regular files ---------------------------------------------------
SPECIAL = ('b_fifo.png', 'c_directory.png', 'd_loop.png', 'e_device.png', 'f_socket.jpg')


def special_files(directory):
    """Puts in `directory` one of each kind of thing that is named like an image but is not a
    regular file (SPECIAL: a FIFO, a directory, a symlink loop, a device, a socket); their paths."""
    import socket
    d = str(directory)
    os.mkfifo(os.path.join(d, 'b_fifo.png'))
    os.mkdir(os.path.join(d, 'c_directory.png'))
    os.symlink('d_loop.png', os.path.join(d, 'd_loop.png'))
    os.symlink(os.devnull, os.path.join(d, 'e_device.png'))
    cwd = os.getcwd()
    os.chdir(d)  # a relative name: a socket's path is limited to ~107 bytes
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind('f_socket.jpg')
    finally:
        os.chdir(cwd)
    return [os.path.join(d, name) for name in SPECIAL]


class NeverOpened:
    """A context in which any reader that opens one of `fifos` is released after `seconds` (by
    opening its writing end), so code that blocks on a FIFO fails the test instead of hanging it;
    .released counts the readers that had to be released."""

    def __init__(self, fifos, seconds=20):
        import threading
        self.fifos, self.seconds, self.released = fifos, seconds, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        if self.stop.wait(self.seconds):
            return
        while not self.stop.wait(0.2):
            for f in self.fifos:
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))  # only succeeds while a reader waits
                    self.released += 1
                except OSError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
