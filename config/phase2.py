# Phase 2, end to end with LoRA on SigLIP (q_proj, v_proj) and the T5 decoder (q, k, v, o),
# from phase 1's best checkpoint. Effective batch: 8 x 4 accumulation steps = 32.
phase = 2
out_dir = 'out-phase2'
init_from = 'out-phase1/ckpt.safetensors'
epochs = 15
batch_size = 8
gradient_accumulation_steps = 4
learning_rate = 5e-5
warmup_iters = 500
label_smoothing = 0.1
lambda_gen = 1.0
lambda_aux = 0.3
