# The built-in demo: the tiny model (random weights, nothing downloaded) learns the
# phantom data (generated on first use) on a CPU in minutes. Phase 2 with whole
# backbones training, since LoRA on random backbones would have nothing to adapt.
# Effective batch: 16 x 2 accumulation steps x 1 process = 32; with torchrun's 2 processes,
# 16 x 1 x 2 = 32 as well.
dataset = 'phantom'
data_dir = 'data/phantom'
out_dir = 'out-phantom'
model_size = 'tiny'
image_size = 128
phase = 2
full_backbones = True
epochs = 8
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
label_smoothing = 0.0
lambda_aux = 0.5
eval_interval = 250
log_interval = 25
sample_reports = 2
num_workers = 1           # 2 cores: one loads while the other computes
