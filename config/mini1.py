# The pretrained path on the phantom data: CheXQuery's three phases exactly as on real data,
# from the tiny backbones pretrain.py made on the phantom training split (run it first:
# python pretrain.py). Phase 1, query alignment: queries, cross-attention, fusion and the aux
# head learn to read the frozen SigLIP for the frozen T5. Effective batch 16 x 2 = 32.
dataset = 'phantom'
data_dir = 'data/phantom'
model_size = 'base'
vision_model = 'out-pretrained/siglip'
text_model = 'out-pretrained/t5'
query_init = 'out-pretrained/bert'
tokenizer = 'out-pretrained/t5'   # the phantom words plus T5's sentinels: the decoder's vocabulary
image_size = 128
full_backbones = False            # LoRA only, as with real pretrained backbones
phase = 1
out_dir = 'out-mini1'
init_from = 'scratch'
epochs = 3
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 30
label_smoothing = 0.0
lambda_gen = 1.0
lambda_aux = 0.5
eval_interval = 200
log_interval = 25
sample_reports = 2
num_workers = 1                   # 2 cores: one loads while the other computes
