# What the three phases of the miniature share (bash mini.sh runs them): CheXQuery exactly as on
# real data, from the tiny backbones pretrain.py made on the phantom training split, LoRA only.
# Each phase adds its own file: python train.py config/mini.py config/mini1.py (then mini2, mini3).
dataset = 'phantom'
data_dir = 'data/phantom'
model_size = 'base'
vision_model = 'out-pretrained/siglip'
text_model = 'out-pretrained/t5'
query_init = 'out-pretrained/bert'
tokenizer = 'out-pretrained/t5'   # the phantom words plus T5's sentinels: the decoder's vocabulary
image_size = 128
full_backbones = False            # LoRA only, as with real pretrained backbones
batch_size = 16                   # effective batch 16 x 2 = 32
gradient_accumulation_steps = 2
lambda_gen = 1.0
finding_weight = 5.0              # the finding sentences' tokens count x5 in the loss, as in DiseaseT5 (docs/diagnosis.md's A/B)
eval_interval = 200
log_interval = 25
sample_reports = 2
num_workers = 1                   # 2 cores: one loads while the other computes
