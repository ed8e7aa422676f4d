"""
CheXQuery: a query-based chest X-ray report generator, in one file.

Data flows top to bottom, and so does this file:

  image (B, 3, 384, 384)
    -> SigLIP vision encoder (LoRA on q_proj, v_proj)   global (B, D), patches (B, 576, D)
    -> 20 queries (14 condition + 6 anatomical)         (B, 20, D)
       x 2 cross-attention layers over the patches      (B, 20, D)
    -> gated fusion of global vs queries, query pooling  visual tokens (B, 11, D)
    -> Flan-T5 decoder (LoRA on q, k, v, o)             "Findings: ... | Impression: ..."
  and an auxiliary head on the 14 condition queries     CheXpert logits (B, 14)

D is SigLIP's width (768 for base). The T5 encoder is never run: the 11 visual
tokens take the place of its output, so it is deleted.
"""
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from chexpert import ATLAS, CONDITIONS, REGIONS, check_atlas
from condition_vectors import condition_name_vectors


ANATOMICAL_PRIORS = ('none', 'soft', 'strict')  # for the anatomical queries' cross-attention


@dataclass
class CheXQueryConfig:
    # backbones: a hub name or local directory of pretrained weights, unless the
    # matching *_config dict is given, which builds that backbone with random weights
    vision_model: str = 'google/siglip-base-patch16-384'
    text_model: str = 'google/flan-t5-base'
    vision_config: dict = None
    text_config: dict = None
    text_dropout: float = None    # T5's own dropout_rate; None: its config's (Flan-T5: 0.1)
    image_size: int = 384
    # queries and cross-attention
    n_condition_queries: int = 14
    n_anatomical_queries: int = 6
    n_cross_layers: int = 2
    n_heads: int = 8
    ffn_dim: int = None           # None: 4 x the vision width, as the recipe's 3072 on SigLIP-base's 768
    dropout: float = 0.1
    # 'dmis-lab/biobert-v1.1' (any BERT-family name or directory), 'random',
    # or a .safetensors file holding a (14, D) 'condition_queries' tensor
    query_init: str = 'dmis-lab/biobert-v1.1'
    # fusion, pooling, auxiliary head
    n_pool_queries: int = 10
    learned_gate: bool = True     # False: a fixed 0.5 mix of global token and queries (an ablation)
    # the anatomical queries' cross-attention: 'none', 'soft' (log of a spatial prior added to
    # the logits) or 'strict' (no attention outside the region); atlas None: chexpert.ATLAS
    anatomical_prior: str = 'none'
    atlas: dict = None
    aux_hidden: int = 384
    aux_dropout: float = 0.2
    # LoRA
    vision_lora_r: int = 8
    vision_lora_alpha: float = 16
    vision_lora_dropout: float = 0.05
    vision_lora_targets: tuple = ('q_proj', 'v_proj')
    text_lora_r: int = 16
    text_lora_alpha: float = 32
    text_lora_dropout: float = 0.05
    text_lora_targets: tuple = ('q', 'k', 'v', 'o')

    def __post_init__(self):
        if self.n_condition_queries != len(CONDITIONS):
            raise ValueError(f"n_condition_queries must be {len(CONDITIONS)} (one per CheXpert "
                             f"condition), got {self.n_condition_queries}")
        self.vision_lora_targets = tuple(self.vision_lora_targets)
        self.text_lora_targets = tuple(self.text_lora_targets)
        if self.anatomical_prior not in ANATOMICAL_PRIORS:
            raise ValueError(f"anatomical_prior must be 'none', 'soft' or 'strict', got {self.anatomical_prior!r}")
        if self.anatomical_prior != 'none' and self.n_anatomical_queries != len(REGIONS):
            raise ValueError(f"anatomical_prior={self.anatomical_prior!r} needs one anatomical query per region "
                             f"(n_anatomical_queries={len(REGIONS)}), got {self.n_anatomical_queries}")
        if self.anatomical_prior != 'none' or self.atlas is not None:
            # the boxes themselves, not None, so a checkpoint keeps the atlas it was trained with
            self.atlas = check_atlas(ATLAS if self.atlas is None else self.atlas, 'CheXQueryConfig.atlas')

    @property
    def n_queries(self):
        return self.n_condition_queries + self.n_anatomical_queries


def _from_pretrained(cls, name, what, config_key, **overrides):
    """Loads a Hugging Face model (overrides: its config's settings), turning an offline failure into advice.
    Transformers' load report lists every unused weight (a whole SigLIP's text tower, which the vision
    encoder never reads); it is replaced by a warning only for weights the model lacks. A local
    directory loads without a progress bar; a hub download keeps its own."""
    import warnings
    from transformers.utils import logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if os.path.isdir(name):
        logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, **overrides)
    except (OSError, ValueError) as e:
        raise OSError(
            f"Could not load the {what} '{name}' ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"If you are offline or the hub is unreachable, download it where you have network "
            f"(e.g. `hf download {name} --local-dir DIR`) and pass {config_key}=DIR, or give "
            f"{config_key.replace('_model', '_config')} to build it with random weights.") from None
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    if missing := sorted(info['missing_keys']):
        warnings.warn(f"the {what} '{name}' lacks {len(missing)} weights, left at random init: "
                      f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    return model


# -----------------------------------------------------------------------------
# 1. Vision encoder

def build_vision_encoder(cfg):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    if cfg.vision_config is not None:
        model = SiglipVisionModel(SiglipVisionConfig(**cfg.vision_config))
    else:
        model = _from_pretrained(SiglipVisionModel, cfg.vision_model, 'vision encoder', 'vision_model')
    if model.config.image_size != cfg.image_size:
        raise ValueError(f"image_size={cfg.image_size} but the vision encoder expects "
                         f"{model.config.image_size} px")
    # Module names have no .vision_model level here: encoder.layers.{i}.self_attn.q_proj
    lora.inject_lora(model, cfg.vision_lora_targets, cfg.vision_lora_r,
                     cfg.vision_lora_alpha, cfg.vision_lora_dropout)
    return model


# -----------------------------------------------------------------------------
# 2. Queries: condition queries from a text model's view of the condition names

def condition_query_init(name, dim):
    """(14, dim) initial condition queries: each CheXpert condition name's [CLS] embedding under
    a BERT-family model. A width W other than dim goes through a fixed Gaussian projection (seed 0
    on the CPU generator, so the same anywhere), which keeps their pairwise geometry."""
    vectors = condition_name_vectors(name)                                   # (14, W), cached
    if vectors.shape[1] != dim:
        g = torch.Generator().manual_seed(0)
        vectors = vectors @ (torch.randn(vectors.shape[1], dim, generator=g) / math.sqrt(dim))
    return vectors


# -----------------------------------------------------------------------------
# 3. Cross-attention of the queries over the patches

class Attention(nn.Module):
    """Multi-head attention of queries (B, Q, D) over keys/values (B, N, D)."""

    def __init__(self, dim, n_heads, dropout):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.dropout = dropout

    def forward(self, x, context, return_attention=False, bias=None):
        """bias: None or (Q, N) added to every head's logits (-inf: no attention)."""
        B, Q, D = x.shape
        N, H = context.shape[1], self.n_heads
        q = self.q(x).view(B, Q, H, D // H).transpose(1, 2)        # (B, H, Q, D/H)
        k = self.k(context).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        v = self.v(context).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        p = self.dropout if self.training else 0.0
        if bias is not None:  # SDPA wants a float mask in the queries' dtype (bf16 under autocast)
            bias = bias.to(q.dtype)
        if return_attention:  # the explicit path, only to show the maps
            scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)                 # (B, H, Q, N)
            weights = (scores if bias is None else scores + bias).softmax(-1)   # (B, H, Q, N)
            out = F.dropout(weights, p) @ v
        else:
            weights, out = None, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        out = self.o(out.transpose(1, 2).reshape(B, Q, D))          # (B, Q, D)
        return out, weights


class CrossAttentionLayer(nn.Module):
    """Queries attend over the patches, then an FFN; post-norm residuals."""

    def __init__(self, dim, n_heads, ffn_dim, dropout):
        super().__init__()
        self.attn = Attention(dim, n_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, queries, patches, return_attention=False, bias=None):
        a, weights = self.attn(queries, patches, return_attention, bias)
        x = self.norm1(queries + self.drop(a))           # (B, 20, D)
        x = self.norm2(x + self.drop(self.ffn(x)))       # (B, 20, D)
        return x, weights


# The soft prior's fall-off (sigma, in image fractions) outside a region's box: broad in the
# first cross-attention layer, sharp in the last, geometric in between.
PRIOR_SIGMAS = (0.2, 0.05)


def anatomical_prior_bias(cfg, patch_size):
    """(n_cross_layers, n_queries, N) attention logit biases over a row-major patch grid.
    Condition queries' rows are 0. 'soft': an anatomical query's row is log p, with p 1
    inside its atlas box and exp(-d^2 / 2 sigma^2) at distance d from it, normalized to sum 1.
    'strict': 0 on the patches whose centre is in the box, -inf elsewhere; a box between
    patch centres (the spine on an 8 x 8 grid) keeps the nearest patches instead."""
    g, L, C = cfg.image_size // patch_size, cfg.n_cross_layers, len(CONDITIONS)
    c = (torch.arange(g, dtype=torch.float64) + 0.5) / g                      # patch centres (g,)
    box = torch.tensor([cfg.atlas[r] for r in REGIONS], dtype=torch.float64)  # (6, 4)
    dx = torch.maximum(box[:, 0:1] - c, c - box[:, 2:3]).clamp(min=0)         # (6, g)
    dy = torch.maximum(box[:, 1:2] - c, c - box[:, 3:4]).clamp(min=0)         # (6, g)
    d = torch.hypot(dy[:, :, None], dx[:, None, :]).flatten(1)                # (6, N), row y, column x
    bias = torch.zeros(L, cfg.n_queries, g * g, dtype=torch.float64)
    for layer in range(L):
        if cfg.anatomical_prior == 'strict':
            outside = d > d.min(1, keepdim=True).values + 1e-9               # d is 0 inside; else the nearest
            bias[layer, C:] = torch.zeros_like(d).masked_fill(outside, -math.inf)
        else:
            hi, lo = PRIOR_SIGMAS
            sigma = hi * (lo / hi) ** (layer / max(L - 1, 1))
            logit = -d ** 2 / (2 * sigma ** 2)
            bias[layer, C:] = logit - logit.logsumexp(1, keepdim=True)        # log p, sum p = 1
    return bias.float()


# -----------------------------------------------------------------------------
# 4. Gated fusion and query pooling

class GatedFusion(nn.Module):
    """Weighs the global token against the queries, pools 20 queries to 10 and
    returns the 11 visual tokens [gate·global; pool((1-gate)·queries)]."""

    def __init__(self, dim, n_pool, n_heads, dropout, learned_gate=True):
        super().__init__()
        # learned_gate=False: a constant 0.5 mix, the ablation that asks what the gate is worth
        self.gate = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1)) if learned_gate else None
        self.pool_queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_pool, dim)))
        self.pool = Attention(dim, n_heads, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, global_token, queries):
        B = queries.shape[0]
        if self.gate is None:
            gate = global_token.new_full((B, 1), 0.5)
        else:
            gate = torch.sigmoid(self.gate(torch.cat([global_token, queries.mean(1)], -1)))  # (B, 1)
        global_gated = gate[:, :, None] * global_token[:, None]                          # (B, 1, D)
        queries_weighted = (1 - gate)[:, :, None] * queries                              # (B, 20, D)
        pool_q = self.pool_queries.expand(B, -1, -1)                                     # (B, 10, D)
        pooled, _ = self.pool(pool_q, queries_weighted)
        pooled = self.norm(pool_q + pooled)                                              # (B, 10, D)
        return torch.cat([global_gated, pooled], 1), gate                                # (B, 11, D)


# -----------------------------------------------------------------------------
# 5. Auxiliary head

class AuxHead(nn.Module):
    """One MLP shared by the 14 condition queries: one CheXpert logit each."""

    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, condition_queries):            # (B, 14, D)
        return self.mlp(condition_queries).squeeze(-1)  # (B, 14)


# -----------------------------------------------------------------------------
# 6. The decoder

def build_decoder(cfg):
    from transformers import T5Config, T5ForConditionalGeneration
    overrides = {} if cfg.text_dropout is None else dict(dropout_rate=cfg.text_dropout)
    if cfg.text_config is not None:
        t5 = T5ForConditionalGeneration(T5Config(**{**cfg.text_config, **overrides}))
        # A T5 built from a config always shares lm_head with the embedding. Flan-T5
        # is untied, so give lm_head its own weight, scaled so first logits are O(1).
        t5.lm_head.weight = nn.Parameter(torch.randn_like(t5.shared.weight) * t5.config.d_model ** -0.5)
    else:
        # from_pretrained keeps Flan-T5's separate lm_head (it sees both tensors in the file)
        t5 = _from_pretrained(T5ForConditionalGeneration, cfg.text_model, 'decoder', 'text_model', **overrides)
    # The visual tokens replace the encoder's output, so the encoder is never run.
    del t5.encoder
    lora.inject_lora(t5.decoder, cfg.text_lora_targets, cfg.text_lora_r,
                     cfg.text_lora_alpha, cfg.text_lora_dropout)
    return t5


# -----------------------------------------------------------------------------
# The whole model

# Report generation settings: beam search with 4 beams, no repeated trigram, 20 to 512 tokens.
GENERATION = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=1.0, early_stopping=True,
                  min_length=20, max_length=512)


class ReportNGramBlock:
    """no_repeat_ngram_size over the generated tokens only: an indication ahead of the report
    ('Follow-up of known pleural effusion.') must not forbid the report to say 'pleural effusion.'"""

    def __init__(self, n, start):
        from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
        self.block, self.start = NoRepeatNGramLogitsProcessor(n), start

    def __call__(self, input_ids, scores):
        return self.block(input_ids[:, self.start:], scores)


class CheXQuery(nn.Module):

    def __init__(self, cfg: CheXQueryConfig):
        super().__init__()
        self.vision = build_vision_encoder(cfg)
        D = self.vision.config.hidden_size
        if cfg.ffn_dim is None:  # resolved in the config, so that checkpoints rebuild the same model
            cfg = replace(cfg, ffn_dim=4 * D)
        self.cfg = cfg
        A = cfg.n_anatomical_queries
        if cfg.query_init == 'random':
            cond = nn.init.xavier_uniform_(torch.empty(len(CONDITIONS), D))
        else:
            cond = condition_query_init(cfg.query_init, D)
            # The names' [CLS] vectors share most of their direction (cosine 0.94 on average under the phantom
            # BERT): taken as they are, the 14 queries start nearly alike. Centred, they keep what tells the
            # names apart; then on the anatomical queries' Xavier scale.
            cond = cond - cond.mean(0)
            cond = cond / cond.pow(2).mean().sqrt() * math.sqrt(2 / (A + D))
        self.condition_queries = nn.Parameter(cond)                                  # (14, D)
        self.anatomical_queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(A, D)))  # (6, D)
        self.cross_attention = nn.ModuleList(
            CrossAttentionLayer(D, cfg.n_heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.n_cross_layers))
        # not persistent: built from the config, so checkpoints keep their keys and shapes
        self.register_buffer('attention_prior', None if cfg.anatomical_prior == 'none' else
                             anatomical_prior_bias(cfg, self.vision.config.patch_size), persistent=False)
        self.fusion = GatedFusion(D, cfg.n_pool_queries, cfg.n_heads, cfg.dropout, cfg.learned_gate)
        self.aux_head = AuxHead(D, cfg.aux_hidden, cfg.aux_dropout)
        self.t5 = build_decoder(cfg)
        d_model = self.t5.config.d_model
        self.proj = nn.Identity() if d_model == D else nn.Linear(D, d_model)
        self.set_phase(1)

    # --- phases ---------------------------------------------------------------
    def trainable(self, name, phase, aux=True, full_backbones=False, gen=True):
        """Whether parameter `name` trains in `phase` (the methodology's tables). aux=False freezes
        the auxiliary head, which gets no gradient without the aux loss; phase 3 has none.
        gen=False (the aux loss alone, no report loss) freezes what only the report's loss
        reaches: SigLIP's pooling head (the global token), the anatomical queries, fusion,
        projection and decoder.
        full_backbones=True trains every backbone weight wherever its LoRA would train: for
        random backbones (the phantom demo), which have nothing pretrained to keep."""
        adapted = 'lora_' in name or full_backbones
        if not gen and name.startswith(('vision.head.', 'anatomical_queries', 'fusion.', 'proj.', 't5.')):
            return False
        if name.startswith('vision.'):
            return adapted and phase == 2
        if name.startswith('t5.'):
            return adapted and phase in (2, 3)
        if name.startswith('aux_head.'):
            return aux and phase != 3
        return True  # queries, cross-attention, fusion, projection

    def set_phase(self, phase, aux=True, full_backbones=False, gen=True):
        """Sets requires_grad for a training phase (1, 2 or 3); frozen modules go to eval."""
        if phase not in (1, 2, 3):
            raise ValueError(f"phase must be 1, 2 or 3, got {phase!r}")
        if not (aux or gen):
            raise ValueError("set_phase: with neither the aux loss nor the report's there is nothing to train")
        for name, p in self.named_parameters():
            p.requires_grad_(self.trainable(name, phase, aux, full_backbones, gen))
        self.phase = phase
        self.train(self.training)
        return self

    def train(self, mode=True):
        super().train(mode)
        # Frozen modules stay in eval mode (no dropout) while the rest trains.
        for module in self.children():
            params = list(module.parameters())
            if mode and params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    # --- the forward pass -------------------------------------------------------
    def vision_features(self, images):
        """(global (B, D), patches (B, N, D)). Runs under no_grad when SigLIP is
        frozen, so none of its activations are kept."""
        S = self.cfg.image_size
        if not (torch.is_tensor(images) and images.dim() == 4 and tuple(images.shape[1:]) == (3, S, S)):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor of shape (B, 3, {S}, {S}), got {got}")
        trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            out = self.vision(pixel_values=images)
        # SigLIP has no CLS token: its global token is the attention-pooling head's output.
        return out.pooler_output, out.last_hidden_state          # (B, D), (B, 576, D)

    def encode(self, images=None, features=None, return_attention=False):
        """Images (or cached vision features) -> visual tokens (B, 11, d_model),
        condition logits (B, 14), gate (B, 1) and, when asked, the last layer's
        attention maps (B, 20, N) averaged over heads, the anatomical prior's bias included."""
        global_token, patches = features if features is not None else self.vision_features(images)
        B = patches.shape[0]
        queries = torch.cat([self.condition_queries, self.anatomical_queries])[None].expand(B, -1, -1)  # (B, 20, D)
        queries = queries.to(patches.dtype)
        attention = None
        for i, layer in enumerate(self.cross_attention):
            bias = None if self.attention_prior is None else self.attention_prior[i]  # the anatomical prior
            queries, attention = layer(queries, patches, return_attention, bias)
        cond_logits = self.aux_head(queries[:, :len(CONDITIONS)])            # (B, 14)
        visual_tokens, gate = self.fusion(global_token, queries)             # (B, 11, D), (B, 1)
        out = dict(visual_tokens=self.proj(visual_tokens), cond_logits=cond_logits, gate=gate)
        if return_attention:
            out['attention'] = attention.mean(1)                             # (B, 20, N)
        return out

    def forward(self, images=None, decoder_input_ids=None, labels=None, cond_labels=None, label_smoothing=0.0,
                lambda_gen=1.0, lambda_aux=0.5, return_attention=False, features=None, text_from_logits=None,
                token_weights=None):
        """encode's outputs, the decoder's logits (B, T, V) with decoder_input_ids, and with labels
        and cond_labels the training loss: 'loss' = lambda_gen * 'loss_gen' + lambda_aux * 'loss_aux'.
        token_weights (B, T): each label's weight in loss_gen (None: the plain mean).
        text_from_logits: a function of the condition logits (B, 14) that returns the decoder's
        (input ids, labels, token weights) instead, for a prompt that states what the aux head decided.
        lambda_gen=0: no report to learn, so the decoder does not run and 'loss' is the aux loss alone."""
        if lambda_gen == 0:
            decoder_input_ids = text_from_logits = None
        out = self.encode(images, features, return_attention)
        if text_from_logits is not None:
            decoder_input_ids, labels, token_weights = (None if t is None else t.to(out['cond_logits'].device)
                                                        for t in text_from_logits(out['cond_logits'].detach()))
        if decoder_input_ids is not None:
            from transformers.modeling_outputs import BaseModelOutput
            dec = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=out['visual_tokens']),
                          decoder_input_ids=decoder_input_ids, use_cache=False)
            out['logits'] = dec.logits                                           # (B, T, V)
            if labels is not None:
                # computed here: T5's own forward ignores label smoothing
                weighted = token_weights is not None  # else torch's own mean, bit for bit
                ce = F.cross_entropy(dec.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     label_smoothing=label_smoothing, reduction='none' if weighted else 'mean')
                out['loss_gen'] = (ce * token_weights.flatten()).sum() / token_weights.sum() if weighted else ce
        if cond_labels is not None:
            out['loss_aux'] = F.binary_cross_entropy_with_logits(out['cond_logits'].float(), cond_labels.float())
            if 'loss_gen' in out:
                out['loss'] = lambda_gen * out['loss_gen'] + lambda_aux * out['loss_aux']
            elif decoder_input_ids is None:  # no decoder run (lambda_gen=0, or no report given): the aux loss alone
                out['loss'] = lambda_aux * out['loss_aux']
        return out

    @torch.inference_mode()  # not just no_grad: no autograd bookkeeping at all, which is faster
    def generate(self, images, prompt_ids, visual_tokens=None, prompt_mask=None, **settings):
        """Token ids (B, T) starting with prompt_ids ((P,) or (B, P), decoder start token first).
        Pass visual_tokens from encode() to skip encoding the images again. prompt_mask (B, P)
        is 0 on left padding, for prompts of different lengths (data.prompt_batch). settings
        override GENERATION and go on to Hugging Face's generate."""
        from transformers.modeling_outputs import BaseModelOutput
        if visual_tokens is None:
            visual_tokens = self.encode(images)['visual_tokens']
        B = visual_tokens.shape[0]
        prompt_ids = torch.as_tensor(prompt_ids, device=visual_tokens.device)
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None].expand(B, -1)
        settings = {**GENERATION, **settings}
        if settings['num_beams'] == 1:
            settings['early_stopping'] = False  # a beam-search flag: greedy search warns about it
        # a fresh BaseModelOutput on every call: generate expands it in place for beams
        if settings.get('no_repeat_ngram_size'):  # counted on the report alone, not the prompt ahead of it
            settings['logits_processor'] = [ReportNGramBlock(settings.pop('no_repeat_ngram_size'), prompt_ids.shape[1])]
        if prompt_mask is not None:  # generate extends it by a 1 per new token
            settings['decoder_attention_mask'] = torch.as_tensor(prompt_mask, device=visual_tokens.device)
        return self.t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=visual_tokens),
                                decoder_input_ids=prompt_ids, **settings)


# A tiny model for the phantom demo and the tests: the same architecture, CPU-sized.
TINY_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, image_size=128, patch_size=16)
TINY_TEXT = dict(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                 num_decoder_layers=2, num_heads=4, feed_forward_proj='gated-gelu',
                 dropout_rate=0.1, tie_word_embeddings=False,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_config(vocab_size=512, image_size=128, **overrides):
    """The CPU-sized model of the phantom demo and the tests, random weights throughout."""
    kw = dict(vision_config=dict(TINY_VISION, image_size=image_size),
              text_config=dict(TINY_TEXT, vocab_size=vocab_size), image_size=image_size,
              n_heads=4, ffn_dim=256, aux_hidden=64, query_init='random')
    return CheXQueryConfig(**dict(kw, **overrides))
