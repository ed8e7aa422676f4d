# Phase 3 of the pretrained path on the phantom data (after config/mini2.py), generation
# polish: SigLIP fully frozen (its LoRA too), no aux loss (so the aux head freezes as well),
# decoder LoRA and the query side keep training, from phase 2's best checkpoint.
dataset = 'phantom'
data_dir = 'data/phantom'
model_size = 'base'
vision_model = 'out-pretrained/siglip'
text_model = 'out-pretrained/t5'
query_init = 'out-pretrained/bert'
tokenizer = 'out-pretrained/t5'
image_size = 128
full_backbones = False
phase = 3
out_dir = 'out-mini3'
init_from = 'out-mini2/ckpt.safetensors'
epochs = 3
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 20
label_smoothing = 0.1
lambda_gen = 1.0
lambda_aux = 0.0
eval_interval = 200
log_interval = 25
sample_reports = 2
num_workers = 1
