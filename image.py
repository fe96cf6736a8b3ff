"""IMAGE model: MMSpeech (ModelScope's OFA-MMSpeech) plus IMAGE's modality-absence embedding, in plain PyTorch.

    fbank (B, T, 80) -> Conv2dSubsampling4 -> Linear -> [+ modality] -> + conv positions -> encoder layers 0..5
    phones (B, P) -> phone emb [+ char emb + modality] -> + conv positions ----------------\\ joined at layer 6
    encoder layers 6.. over [speech | text] -> LayerNorm -> OFA decoder (cross-attention) -> tied LM head

The architecture and every number come from ../shared/reference/MMSPEECH.md (ModelScope 1.40.2). IMAGE adds:
  * text-stream features = phone embedding + embedding of the character the phone came from (the decoder's token
    embedding, shared, unscaled);
  * a learned modality-absence embedding nn.Embedding(2, d) (0 = absent, 1 = present), zero-initialised, added to
    every speech frame and every text position. At zero, with no text stream, the model computes exactly MMSpeech.

Padding: ModelScope's padding mask is 1-2 frames longer than the true conv output and its 5-layer positional
convolution zeroes padding only before its first layer, so its outputs depend on batch composition. By default we use
the true lengths and re-zero padding before every conv layer (a padded row computes what it computes alone);
Config.modelscope_padding=True reproduces ModelScope exactly. At batch size 1 the two agree.

This module knows tensors only (no files): weights.py converts ModelScope checkpoints and loads ours.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

BOS, PAD, EOS, UNK = 0, 1, 2, 3      # decoder vocabulary specials (fairseq layout); phone ids use the same 0..3
MASK_VALUE = -30000.0                # additive mask: finite and representable in fp16, so all-masked rows give no NaN
REL_POS_MAX_DISTANCE = 1024          # ModelScope builds its token bucket table for 1024 positions (fixed constant)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    vocab_size: int = 51134              # decoder vocabulary (tied LM head)
    phone_vocab_size: int = 141          # phone embedding rows (4 specials + phone_dict.txt)
    phone_dict_size: int = 124           # CTC phone head = phone embedding rows [3, phone_dict_size)
    num_mel_bins: int = 80
    d_model: int = 1024
    encoder_layers: int = 24
    encoder_heads: int = 16
    encoder_ffn: int = 4096
    decoder_layers: int = 12
    decoder_heads: int = 16
    decoder_ffn: int = 4096
    subsample_channels: int = 0          # conv subsampling channels; 0 = d_model (MMSpeech). Fewer: cheaper small models
    pos_conv_layers: int = 5             # conv positional embedding depth (ModelScope encoder_pos_conv_depth)
    pos_conv_width: int = 95             # total width; kernel per layer = max(3, width // layers) = 19
    pos_conv_groups: int = 16
    text_join_layer: int = 6             # the text stream joins the speech stream before this encoder layer
    max_positions: int = 1024            # decoder learned positions: max_positions + 2 rows
    token_bucket_size: int = 256         # decoder relative-position buckets: 2 * size - 1 per layer
    attn_scale_factor: float = 2.0       # decoder attention scale (head_dim * factor) ** -0.5
    scale_embedding: bool = True         # decoder token embedding * sqrt(d_model)   (config.json)
    entangle_position_embedding: bool = True   # add absolute positions to decoder token embeddings (config.json)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    modelscope_padding: bool = False     # compat switch: reproduce ModelScope's batch-dependent padding exactly
    mask_pseudo: bool = False            # ablation: key-pad absent modalities instead of attending the pseudo input
    use_modality_embedding: bool = True  # ablation "no MAF": False removes the modality-absence embedding

    @classmethod
    def tiny(cls, **overrides) -> "Config":
        """CPU tests and the demo: 8 encoder layers so the text stream still joins at layer 6."""
        dims = dict(vocab_size=1000, d_model=64, encoder_layers=8, encoder_heads=4, encoder_ffn=128,
                    decoder_layers=2, decoder_heads=4, decoder_ffn=128)
        return cls(**{**dims, **overrides})

    @classmethod
    def base(cls, **overrides) -> "Config":
        """damo/ofa_mmspeech_pretrain_base_zh dimensions (210,967,464 MMSpeech parameters with unused tables)."""
        dims = dict(d_model=768, encoder_layers=12, encoder_heads=12, encoder_ffn=3072,
                    decoder_layers=6, decoder_heads=12, decoder_ffn=3072)
        return cls(**{**dims, **overrides})

    @classmethod
    def large(cls, **overrides) -> "Config":
        """damo/ofa_mmspeech_pretrain_large_zh dimensions (608,949,696 MMSpeech parameters with unused tables)."""
        return cls(**overrides)

    def __post_init__(self):
        sizes = ("vocab_size", "phone_vocab_size", "num_mel_bins", "d_model", "encoder_layers", "encoder_heads",
                 "encoder_ffn", "decoder_layers", "decoder_heads", "decoder_ffn", "pos_conv_groups", "max_positions",
                 "token_bucket_size")
        bad = [f"{name}={getattr(self, name)!r}" for name in sizes
               if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int)
               or getattr(self, name) < 1]
        if bad:
            raise ValueError(f"Config: sizes must be positive integers, got {', '.join(bad)}")
        for name, heads in (("encoder_heads", self.encoder_heads), ("decoder_heads", self.decoder_heads)):
            if self.d_model % heads:
                raise ValueError(f"Config: d_model {self.d_model} is not divisible by {name} {heads}")
        if self.d_model % self.pos_conv_groups:
            raise ValueError(f"Config: d_model {self.d_model} is not divisible by pos_conv_groups "
                             f"{self.pos_conv_groups}")
        if self.subsample_channels < 0:
            raise ValueError(f"Config: subsample_channels must be >= 0 (0 = d_model), got {self.subsample_channels}")
        if self.pos_conv_layers < 2:
            raise ValueError(f"Config: pos_conv_layers must be >= 2 (got {self.pos_conv_layers}; ModelScope's "
                             "depth-1 variant is a weight-normed conv that this model does not implement)")
        if not 0 < self.text_join_layer < self.encoder_layers:
            raise ValueError(f"Config: text_join_layer {self.text_join_layer} must be in [1, encoder_layers "
                             f"{self.encoder_layers})")


def parse_config_overrides(text: str) -> dict:
    """'d_model=256,encoder_layers=8' -> {'d_model': 256, 'encoder_layers': 8}, typed by Config's fields (train.py
    --model)."""
    types = {f.name: f.type for f in fields(Config)}
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        if kind == "bool":
            if value.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{item!r}: {key} takes true or false")
            out[key] = value.strip().lower() in ("true", "1")
        else:
            try:
                out[key] = {"int": int, "float": float}[kind](value)
            except (KeyError, ValueError):
                raise ValueError(f"{item!r}: {key} takes a {kind}") from None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Lengths and masks

def conv_output_lengths(fbank_lengths: Tensor) -> Tensor:
    """True frame counts after the two 3x3 stride-2 convolutions (no padding); a tensor of lengths or an int."""
    return ((fbank_lengths - 1) // 2 - 1) // 2


def modelscope_output_lengths(fbank_lengths: Tensor) -> Tensor:
    """ModelScope's mask lengths ((L - 1) // 2 + 1, twice): 1-2 frames longer than the true conv output."""
    half = (fbank_lengths - 1) // 2 + 1
    return (half - 1) // 2 + 1


def lengths_to_padding(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths -> (B, size) bool, True = padded."""
    return torch.arange(size, device=lengths.device)[None, :] >= lengths[:, None]


def padding_to_bias(padding: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, S) bool -> (B, 1, 1, S) additive attention mask."""
    return torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(
        padding, MASK_VALUE)[:, None, None, :]


def relative_bucket_table(max_len: int, bucket_size: int) -> Tensor:
    """OFA's token relative-position bucket of every distance query - key in [-(max_len - 1), max_len - 1]:
    (2 * max_len - 1,) long in [0, 2 * bucket_size - 1), entry rel + max_len - 1 for distance rel.

    Exact for |rel| <= bucket_size // 2, log-spaced beyond (up to REL_POS_MAX_DISTANCE). Computed once, on the CPU
    (whatever device the model is built on) and in float32 as ModelScope's make_token_bucket_position does, so the
    indices are identical to its; another device's log could round one ceil up and index past the bias table, so
    the indices are also clamped into it.
    """
    rel = torch.arange(-(max_len - 1), max_len, device="cpu")
    mid = bucket_size // 2
    abs_rel = torch.where((rel < mid) & (rel > -mid), mid - 1, rel.abs())
    log_rel = torch.ceil(torch.log(abs_rel / mid) / math.log((REL_POS_MAX_DISTANCE - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_rel <= mid, rel, log_rel.int() * torch.sign(rel))
    return (bucket.long() + bucket_size - 1).clamp(0, 2 * bucket_size - 2)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks

def autocast_input(x: Tensor) -> Tensor:
    """x in the autocast dtype when autocast is on for its device, else x itself (fp32 stays bit-identical).

    For a tensor that feeds several projections: autocast casts a matmul's input once per call, so q, k and v
    would each make (and keep for the backward) their own low-precision copy of it; cast once, they share one.
    The forward is unchanged (the same rounding); in the backward their gradients add up in that dtype."""
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def embedding(num: int, dim: int, padding_idx: Optional[int] = None) -> nn.Embedding:
    """nn.Embedding without its own random init (IMAGE._init_weights initialises it). Building on the meta device
    then never calls normal_, which on meta tensors imports torch._dynamo (seconds of start-up)."""
    return nn.Embedding(num, dim, padding_idx, _weight=torch.empty(num, dim))


class Attention(nn.Module):
    """Multi-head attention with biased projections; optional per-head output scale (NormFormer) and scale factor."""

    def __init__(self, d: int, heads: int, scale_factor: float = 1.0, head_scale: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, d // heads, dropout
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.head_scale = nn.Parameter(torch.ones(heads)) if head_scale else None

    def split(self, x: Tensor) -> Tensor:             # (B, T, d) -> (B, H, T, hd)
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def query(self, x: Tensor) -> Tensor:             # (B, T, d) -> (B, H, T, hd)
        return self.split(self.q_proj(x))

    def key_value(self, x: Tensor) -> tuple:          # (B, S, d) -> 2 x (B, H, S, hd)
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, group: int = 1) -> Tensor:
        """q (N, H, T, hd), k/v (N / group, H, S, hd), mask additive, broadcastable to (N / group, H, T, S).

        group > 1: rows n * group ... n * group + group - 1 of q share k/v row n (beams of one source), so the
        encoder keys are never copied per beam.
        """
        n, _, t, _ = q.shape
        if group > 1:                                  # fold the beams into the query axis
            q = q.reshape(n // group, group, self.heads, t, self.head_dim).transpose(1, 2)
            q = q.reshape(n // group, self.heads, group * t, self.head_dim)
            if t > 1:
                mask = mask.repeat(1, 1, group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=self.scaling,
                                             dropout_p=self.dropout if self.training else 0.0)
        if group > 1:
            out = out.reshape(n // group, self.heads, group, t, self.head_dim).transpose(1, 2)
            out = out.reshape(n, self.heads, t, self.head_dim)
        if self.head_scale is not None:
            out = out * self.head_scale.view(1, -1, 1, 1).to(out.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, self.heads * self.head_dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # self-attention, (B, T, d) -> (B, T, d)
        return self.attend(self.query(x), *self.key_value(x), mask)


class Subsample(nn.Module):
    """Conv2dSubsampling4: two 3x3 stride-2 Conv2d + ReLU (no padding), then Linear over channels x mel bins."""

    def __init__(self, num_mel_bins: int, d: int, channels: int = 0):
        super().__init__()
        channels = channels or d
        self.conv1 = nn.Conv2d(1, channels, 3, 2)
        self.conv2 = nn.Conv2d(channels, channels, 3, 2)
        self.proj = nn.Linear(channels * (((num_mel_bins - 1) // 2 - 1) // 2), d)

    def forward(self, fbank: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """(B, T, mels) -> (B, T', d), T' = ((T - 1) // 2 - 1) // 2.

        With lengths (B,), each row is convolved at its own length (at least 7 frames) and zero-padded to T': the
        valid frames are the same (no conv reads past a row's end) and no time goes into padding, which is half of
        a CPU training step's encoder time at the base preset; on the CPU without gradients always row by row, so
        that the convolutions' activations (B x channels x T/2 x 39 floats, the encoder's largest) never exist for
        the whole batch at once and peak memory does not depend on how many rows are full length (on a GPU a batch
        of full rows stays one call, for throughput: not measured row by row there). Without lengths, the whole
        padded batch (ModelScope's way). Under torch.compile always the whole batch: the per-row loop branches on
        the lengths' values (a graph per row length), and the caller masks the padded frames either way.
        """
        if lengths is None or torch.compiler.is_compiling() or (
                (torch.is_grad_enabled() or fbank.is_cuda) and bool((lengths >= fbank.size(1)).all())):
            return self._run(fbank)
        t_out = ((fbank.size(1) - 1) // 2 - 1) // 2
        rows = [self._run(fbank[i:i + 1, :max(int(n), 7)]) for i, n in enumerate(lengths.tolist())]
        return torch.cat([F.pad(r, (0, 0, 0, t_out - r.size(1))) for r in rows])   # (B, T', d)

    def _run(self, fbank: Tensor) -> Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(fbank.unsqueeze(1)))))    # (B, d, T', F')
        b, c, t, f = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, t, c * f))          # channel-major flatten, as ModelScope


class NativeBackwardConv1d(torch.autograd.Function):
    """F.conv1d whose backward runs PyTorch's native CPU kernels instead of oneDNN's (which autograd picks by the
    global flag at backward time): for the grouped positional convolutions oneDNN's backward takes about twice as
    long, at 8 channels a group (tiny) as at 48 (base). Same gradients; CUDA and CPU autocast never come here."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, padding: int, groups: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups = padding, groups
        return F.conv1d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        onednn = torch.backends.mkldnn.enabled  # only this flag: mkldnn.flags() would reset the others
        torch.backends.mkldnn.enabled = False
        try:
            dx, dw, db = torch.ops.aten.convolution_backward(
                grad.contiguous(), x, weight, [weight.size(0)], [1], [ctx.padding], [1], False, [0], ctx.groups,
                list(ctx.needs_input_grad[:3]))
        finally:
            torch.backends.mkldnn.enabled = onednn
        return dx, dw, db, None, None


class ConvPositions(nn.Module):
    """Convolutional positional embedding: layers x [grouped Conv1d -> LayerNorm (no affine) -> GELU]."""

    def __init__(self, d: int, layers: int, width: int, groups: int):
        super().__init__()
        k = max(3, width // layers)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, k, padding=k // 2, groups=groups) for _ in range(layers))
        self.trim = 1 - k % 2                          # even kernels give one extra frame (fairseq SamePad)

    def forward(self, x: Tensor, padding: Tensor, rezero: bool) -> Tensor:
        """x (B, T, d) -> (B, T, d). Padding is zeroed before the first conv; with rezero before every conv."""
        pad = padding[:, None, :]                      # (B, 1, T)
        h = x.transpose(1, 2)                          # (B, d, T)
        for i, conv in enumerate(self.convs):
            if i == 0 or rezero:
                h = h.masked_fill(pad, 0.0)
            if h.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
                h = NativeBackwardConv1d.apply(h, conv.weight, conv.bias, conv.padding[0], conv.groups)
            else:
                h = conv(h)
            if self.trim:
                h = h[..., :-1]
            h = F.gelu(F.layer_norm(h.transpose(1, 2), h.shape[1:2])).transpose(1, 2)
        return h.transpose(1, 2)


class EncoderLayer(nn.Module):
    """fairseq TransformerSentenceEncoderLayer, pre-LN."""

    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.d_model)
        self.attn = Attention(c.d_model, c.encoder_heads, dropout=c.attention_dropout)
        self.ffn_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.encoder_ffn)
        self.fc2 = nn.Linear(c.encoder_ffn, c.d_model)
        self.dropout, self.activation_dropout = c.dropout, c.activation_dropout

    def forward(self, x: Tensor, mask: Tensor, packed: Optional["Packed"] = None) -> Tensor:
        """x (B, S, d), mask (B, 1, 1, S) -> (B, S, d). With packed, x is (N, d), the N unpadded positions only:
        the row-wise work (projections, FFN: ~95 % of the FLOPs) skips padding; attention runs on the padded
        layout (padded keys are masked, padded queries are dropped)."""
        h = autocast_input(self.attn_norm(x))                             # feeds q, k and v
        if packed is None:
            x = x + F.dropout(self.attn(h, mask), self.dropout, self.training)
        else:
            a = self.attn
            q, k, v = (a.split(packed.unpack(proj(h))) for proj in (a.q_proj, a.k_proj, a.v_proj))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=a.scaling,
                                                 dropout_p=a.dropout if self.training else 0.0)   # (B, H, S, hd)
            out = packed.pack(out.transpose(1, 2).flatten(2))                                   # (N, d)
            x = x + F.dropout(a.out_proj(out), self.dropout, self.training)
        h = F.dropout(F.gelu(self.fc1(self.ffn_norm(x))), self.activation_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)


class Packed:
    """The unpadded positions of a (B, S) padding mask: pack (B, S, ...) -> (N, ...), unpack (N, ...) -> (B, S, ...)
    with zeros at the padded positions."""

    def __init__(self, padding: Tensor):
        self.shape = padding.shape
        self.index = (~padding).flatten().nonzero().squeeze(1)             # (N,) flat positions kept

    def pack(self, x: Tensor) -> Tensor:
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        flat = x.new_zeros((self.shape[0] * self.shape[1],) + x.shape[1:])
        return flat.index_copy(0, self.index, x).view(self.shape + x.shape[1:])


class DecoderLayer(nn.Module):
    """OFA decoder layer: pre-LN with NormFormer mid-LNs (after self/cross attention, inside the FFN), head scales."""

    def __init__(self, c: Config):
        super().__init__()
        d = c.d_model

        def attention():
            return Attention(d, c.decoder_heads, c.attn_scale_factor, head_scale=True, dropout=c.attention_dropout)
        self.self_attn_norm, self.self_attn, self.self_attn_mid_norm = nn.LayerNorm(d), attention(), nn.LayerNorm(d)
        self.cross_attn_norm, self.cross_attn, self.cross_attn_mid_norm = nn.LayerNorm(d), attention(), nn.LayerNorm(d)
        self.ffn_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, c.decoder_ffn)
        self.ffn_mid_norm = nn.LayerNorm(c.decoder_ffn)
        self.fc2 = nn.Linear(c.decoder_ffn, d)
        self.dropout, self.activation_dropout = c.dropout, c.activation_dropout

    def forward(self, x: Tensor, self_mask: Tensor, memory_kv: tuple, cross_mask: Tensor,
                kv_cache: Optional[Tensor] = None, start: int = 0, group: int = 1) -> Tensor:
        """x (N, T, d) for positions start..start+T-1 -> (N, T, d).

        self_mask: additive, broadcastable to (N, H, T, start+T) (position biases, causal mask).
        memory_kv: encoder keys/values 2 x (N / group, H, S, hd); cross_mask broadcastable to (N / group, H, T, S).
        kv_cache: None (full sequence) or this layer's preallocated (2, N, H, max_len, hd) self-attention cache.
        """
        h = autocast_input(self.self_attn_norm(x))                        # feeds q, k and v
        q, (k, v) = self.self_attn.query(h), self.self_attn.key_value(h)
        if kv_cache is not None:
            end = start + x.size(1)
            kv_cache[0, :, :, start:end] = k
            kv_cache[1, :, :, start:end] = v
            k, v = kv_cache[0, :, :, :end], kv_cache[1, :, :, :end]
        h = self.self_attn_mid_norm(self.self_attn.attend(q, k, v, self_mask))
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.cross_attn.query(self.cross_attn_norm(x))
        h = self.cross_attn_mid_norm(self.cross_attn.attend(h, *memory_kv, cross_mask, group))
        x = x + F.dropout(h, self.dropout, self.training)
        h = F.dropout(F.gelu(self.fc1(self.ffn_norm(x))), self.activation_dropout, self.training)
        return x + F.dropout(self.fc2(self.ffn_mid_norm(h)), self.dropout, self.training)


# ----------------------------------------------------------------------------------------------------------------------
# Encoder

@dataclass
class Encoded:
    """Encoder output. S = speech frames (+ text positions when a text stream is given)."""
    hidden: Tensor          # (B, S, d)
    padding_mask: Tensor    # (B, S) bool, True = padded / not attended
    position: Tensor        # (B, S, d) conv positional embeddings (feed the decoder's cross-attention position bias)


class Encoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.subsample = Subsample(c.num_mel_bins, c.d_model, c.subsample_channels)
        self.input_proj = nn.Linear(c.d_model, c.d_model)
        self.phone_embed = embedding(c.phone_vocab_size, c.d_model, padding_idx=PAD)
        self.modality_embed = embedding(2, c.d_model) if c.use_modality_embedding else None
        self.speech_pos_conv = ConvPositions(c.d_model, c.pos_conv_layers, c.pos_conv_width, c.pos_conv_groups)
        self.text_pos_conv = ConvPositions(c.d_model, c.pos_conv_layers, c.pos_conv_width, c.pos_conv_groups)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.final_norm = nn.LayerNorm(c.d_model)

    def add_modality(self, x: Tensor, present: Optional[Tensor]) -> Tensor:
        """x (B, T, d) + the present/absent embedding of its row; nothing when present is None (plain MMSpeech)."""
        if present is None or self.modality_embed is None:
            return x
        return x + self.modality_embed(present.long())[:, None, :].to(x.dtype)

    def speech(self, fbank: Tensor, fbank_lengths: Tensor, present: Optional[Tensor]) -> tuple:
        """fbank (B, T, mels) -> frames (B, T', d), padding (B, T'), conv positions (B, T', d).

        Rows without speech all carry the same pseudo input, and this stream is a function of its row alone (no
        dropout before the return): it is computed once for them and shared (the gradient sums over the copies).
        Text-only training (README's CNERTA recipe, batch 32, one core) went from 43 to 63 sentences/s."""
        c = self.config
        if fbank.dim() != 3 or fbank.size(-1) != c.num_mel_bins or fbank.size(1) < 7:
            raise ValueError(f"fbank must be (B, T >= 7, {c.num_mel_bins}) (two 3x3 stride-2 convolutions), "
                             f"got {tuple(fbank.shape)}")
        rows = self._distinct_rows(fbank, fbank_lengths, present)
        if rows is None:
            return self._speech(fbank, fbank_lengths, present)
        kept, inverse = rows  # (U,), (B,): compute the kept rows, row i of the batch is kept row inverse[i]
        x, padding, position = self._speech(fbank[kept], fbank_lengths[kept], present[kept])
        # index_select, not x[inverse]: the backward of advanced indexing (index_put_ accumulate) adds the copies'
        # gradients with unordered atomic adds on CPU with > 1 thread (32768+ elements); index_add_ adds in row order
        share = lambda t: t.index_select(0, inverse)
        return share(x), share(padding), share(position)

    @staticmethod
    def _distinct_rows(fbank: Tensor, lengths: Tensor, present: Optional[Tensor]):
        """-> (kept (U,), inverse (B,)) when two or more absent rows equal the first absent row, else None.
        None under torch.compile: the kept rows' count depends on the data (a graph break and a new shape)."""
        if present is None or torch.compiler.is_compiling():
            return None
        absent = (~present).nonzero().flatten()
        if absent.numel() < 2:
            return None
        first = absent[0]
        same = (fbank[absent] == fbank[first]).flatten(1).all(1) & (lengths[absent] == lengths[first])  # (A,)
        copies = absent[same][1:]                      # rows that reuse the first absent row
        if copies.numel() == 0:
            return None
        keep = torch.ones_like(present)
        keep[copies] = False
        inverse = keep.long().cumsum(0) - 1            # (B,): a kept row's slot among the kept rows
        inverse[copies] = inverse[first].clone()
        return keep.nonzero().flatten(), inverse

    def _speech(self, fbank: Tensor, fbank_lengths: Tensor, present: Optional[Tensor]) -> tuple:
        c = self.config
        # ModelScope's padding lets 1-2 frames computed from padding through: that needs the batched conv
        x = self.input_proj(self.subsample(fbank, None if c.modelscope_padding else fbank_lengths))   # (B, T', d)
        lengths = (modelscope_output_lengths if c.modelscope_padding else conv_output_lengths)(fbank_lengths)
        padding = lengths_to_padding(lengths, x.size(1))
        x = self.add_modality(x, present)
        if c.mask_pseudo and present is not None:
            padding = padding | ~present[:, None]
        x = x.masked_fill(padding[..., None], 0.0)
        position = self.speech_pos_conv(x, padding, rezero=not c.modelscope_padding)
        return x + position, padding, position

    def text(self, phones: Tensor, char_embeds: Optional[Tensor], phone_lengths: Optional[Tensor],
             present: Optional[Tensor]) -> tuple:
        """phones (B, P) -> features (B, P, d), padding (B, P), conv positions (B, P, d)."""
        c = self.config
        x = self.phone_embed(phones)
        if char_embeds is not None:
            x = x + char_embeds.to(x.dtype)
        x = self.add_modality(x, present)
        padding = phones.eq(PAD)
        if phone_lengths is not None:
            padding = padding | lengths_to_padding(phone_lengths, phones.size(1))
        if c.mask_pseudo and present is not None:
            padding = padding | ~present[:, None]
        x = x.masked_fill(padding[..., None], 0.0)
        position = self.text_pos_conv(x, padding, rezero=not c.modelscope_padding)
        return x + position, padding, position

    def forward(self, fbank, fbank_lengths, phones=None, char_embeds=None, phone_lengths=None,
                speech_present=None, text_present=None) -> Encoded:
        x, padding, position = self.speech(fbank, fbank_lengths, speech_present)
        x = F.dropout(x, self.config.dropout, self.training)             # ModelScope drops the speech stream only
        text = None
        if phones is not None and phones.size(1) > 0:
            text = self.text(phones, char_embeds, phone_lengths, text_present)
        # Padded positions are never read downstream (masked keys, dropped frames), so the layers skip them when
        # they are worth skipping. ModelScope's padding mode keeps the padded layout (parity of every position), and
        # so does torch.compile: the packed length is data-dependent (a graph break and a new shape per batch).
        padded_layout = self.config.modelscope_padding or torch.compiler.is_compiling()
        pack = lambda pad: Packed(pad) if not padded_layout and pad.float().mean() > 0.05 else None
        mask, packed = padding_to_bias(padding, x.dtype), pack(padding)
        x = packed.pack(x) if packed else x                               # (N, d) or (B, T', d)
        for i, layer in enumerate(self.layers):
            if i == self.config.text_join_layer and text is not None:
                x = packed.unpack(x) if packed else x
                x = torch.cat([x, text[0].to(x.dtype)], 1)               # (B, T' + P, d)
                padding = torch.cat([padding, text[1]], 1)
                position = torch.cat([position, text[2]], 1)
                mask, packed = padding_to_bias(padding, x.dtype), pack(padding)
                x = packed.pack(x) if packed else x
            x = layer(x, mask, packed)
        x = self.final_norm(x)
        return Encoded(packed.unpack(x) if packed else x, padding, position)


# ----------------------------------------------------------------------------------------------------------------------
# Decoder and its incremental cache

class Cache:
    """Explicit decoding state for rows = sources x beams.

    self_kv    (layers, 2, N, H, max_len, hd)  self-attention keys/values, preallocated; positions < length are filled
    memory_kv  (layers, 2, Bs, H, S, hd)       encoder keys/values per *source*, computed once
    memory_pos (Bs, H, S, hd)                  cross-attention position keys (from the encoder conv positions)
    memory_mask (Bs, 1, 1, S)                  encoder padding, additive
    self_bias  (layers, H, max_len, max_len)   absolute + relative position bias, computed once
    pos_query  (H, max_len, hd)                cross-attention position queries (scaled)
    positions  (max_len, d)                    learned absolute positions (added to embeddings when entangled)
    source     (N,)                            encoder row of every cache row
    """

    def __init__(self, self_kv, memory_kv, memory_pos, memory_mask, self_bias, pos_query, positions):
        self.self_kv, self.memory_kv, self.memory_pos, self.memory_mask = self_kv, memory_kv, memory_pos, memory_mask
        self.self_bias, self.pos_query, self.positions = self_bias, pos_query, positions
        self.source = torch.arange(memory_kv.size(2), device=memory_kv.device)
        self.group = 1                 # rows n*group .. n*group+group-1 read source n; None = gather by self.source
        self.length = 0                # next position to decode

    @property
    def max_len(self) -> int:
        return self.self_kv.size(4)

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder/repeat rows: new row i = old row index[i] (beam search bookkeeping, expansion to beams)."""
        index = index.to(self.source.device).long()
        t = self.length
        new = self.self_kv.new_empty(self.self_kv.shape[:2] + (index.numel(),) + self.self_kv.shape[3:])
        new[:, :, :, :, :t] = self.self_kv[:, :, index, :, :t]           # copy only the filled positions
        self.self_kv = new
        self.source = self.source[index]
        self._compact_sources()

    def _compact_sources(self) -> None:
        used = torch.unique(self.source)                                  # sorted
        if used.numel() < self.memory_kv.size(2):                         # sources dropped: shrink the encoder state
            self.memory_kv = self.memory_kv[:, :, used]
            self.memory_pos, self.memory_mask = self.memory_pos[used], self.memory_mask[used]
            self.source = torch.searchsorted(used, self.source)
        n, bs = self.source.numel(), self.memory_kv.size(2)
        regular = n % bs == 0 and torch.equal(
            self.source, torch.arange(bs, device=self.source.device).repeat_interleave(n // bs))
        self.group = n // bs if regular else None

    def memory_for_rows(self) -> tuple:
        """Encoder keys/values, position keys and mask as the attention needs them, plus the group size."""
        if self.group is not None:
            return self.memory_kv, self.memory_pos, self.memory_mask, self.group
        return (self.memory_kv.index_select(2, self.source), self.memory_pos.index_select(0, self.source),
                self.memory_mask.index_select(0, self.source), 1)


class Decoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        d, heads = c.d_model, c.decoder_heads
        self.embed_tokens = embedding(c.vocab_size, d, padding_idx=PAD)
        self.embed_positions = embedding(c.max_positions + 2, d)
        self.embed_norm = nn.LayerNorm(d)
        self.pos_norm = nn.LayerNorm(d)
        self.self_pos_q, self.self_pos_k, self.cross_pos_q, self.cross_pos_k = (nn.Linear(d, d) for _ in range(4))
        self.rel_pos_bias = nn.ModuleList(embedding(2 * c.token_bucket_size - 1, heads)
                                          for _ in range(c.decoder_layers))
        # (2 * max_len - 1,) bucket of every query - key distance; derived, so not in checkpoints (persistent=False)
        self.register_buffer("rel_buckets", relative_bucket_table(self.max_len, c.token_bucket_size),
                             persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.final_norm = nn.LayerNorm(d)
        self.heads, self.head_dim = heads, d // heads
        self.pos_scaling = (self.head_dim * c.attn_scale_factor) ** -0.5
        self.embed_scale = math.sqrt(d) if c.scale_embedding else 1.0

    def split(self, x: Tensor) -> Tensor:              # (..., T, d) -> (..., H, T, hd)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:   # (N, T), (T, d) -> (N, T, d)
        x = self.embed_tokens(tokens) * self.embed_scale
        if self.config.entangle_position_embedding:
            x = x + positions
        return F.dropout(self.embed_norm(x), self.config.dropout, self.training)

    def self_position_bias(self, length: int) -> Tensor:
        """(layers, H, L, L): learned absolute-position attention bias + each layer's bucketed relative bias."""
        pos = autocast_input(self.pos_norm(self.embed_positions.weight[:length]))    # (L, d), feeds q and k
        absolute = (self.split(self.self_pos_q(pos)) * self.pos_scaling) @ self.split(self.self_pos_k(pos)).transpose(
            -1, -2)                                                                   # (H, L, L)
        rel = torch.arange(length, device=pos.device)
        buckets = self.rel_buckets[rel[:, None] - rel[None, :] + self.max_len - 1]    # (L, L)
        relative = torch.stack([table(buckets) for table in self.rel_pos_bias])       # (layers, L, L, H)
        return absolute + relative.permute(0, 3, 1, 2)

    def position_queries(self, length: int) -> Tensor:  # (H, L, hd), scaled
        return self.split(self.cross_pos_q(self.pos_norm(self.embed_positions.weight[:length]))) * self.pos_scaling

    def position_keys(self, enc: Encoded) -> Tensor:    # (B, H, S, hd)
        return self.split(self.cross_pos_k(enc.position))

    def logits(self, x: Tensor, vocab_limit: Optional[int] = None) -> Tensor:   # (..., d) -> (..., V), tied head
        """vocab_limit: only ids < limit (the search bans the rest anyway): ModelScope's constraint range ends at
        21134 of 51134 ids, so this skips 59 % of the LM head per decoding step."""
        return F.linear(self.final_norm(x), self.embed_tokens.weight[:vocab_limit])

    @property
    def max_len(self) -> int:
        """Longest decoder sequence: the learned positions, and the 1024 positions the bucket scheme covers."""
        return min(self.embed_positions.num_embeddings, REL_POS_MAX_DISTANCE)

    def forward(self, tokens: Tensor, enc: Encoded) -> Tensor:
        """Teacher-forced: tokens (B, L) -> logits (B, L, V)."""
        length = tokens.size(1)
        if length > self.max_len:
            raise ValueError(f"decoder input of {length} tokens exceeds the {self.max_len} decoder positions")
        x = self.embed(tokens, self.embed_positions.weight[:length])
        causal = torch.full((length, length), MASK_VALUE, device=x.device).triu(1)
        self_masks = self.self_position_bias(length) + causal                         # (layers, H, L, L)
        cross_mask = autocast_input(self.position_queries(length) @ self.position_keys(enc).transpose(-1, -2)
                                    + padding_to_bias(enc.padding_mask, x.dtype))     # (B, H, L, S), every layer's
        memory = autocast_input(enc.hidden)                                           # every layer's keys, values
        for layer, self_mask in zip(self.layers, self_masks):
            memory_kv = layer.cross_attn.key_value(memory)
            x = layer(x, self_mask, memory_kv, cross_mask)
        return self.logits(x)

    def new_cache(self, enc: Encoded, max_len: int) -> Cache:
        if not 0 < max_len <= self.max_len:
            raise ValueError(f"max_len {max_len} must be in [1, {self.max_len}]")
        b, s, _ = enc.hidden.shape
        dtype = enc.hidden.dtype
        memory = autocast_input(enc.hidden)                                           # every layer's keys, values
        memory_kv = torch.stack([torch.stack(layer.cross_attn.key_value(memory)) for layer in self.layers])
        self_kv = torch.zeros(len(self.layers), 2, b, self.heads, max_len, self.head_dim, dtype=memory_kv.dtype,
                              device=enc.hidden.device)
        return Cache(self_kv, memory_kv, self.position_keys(enc), padding_to_bias(enc.padding_mask, dtype),
                     self.self_position_bias(max_len), self.position_queries(max_len),
                     self.embed_positions.weight[:max_len])

    def step(self, tokens: Tensor, cache: Cache, vocab_limit: Optional[int] = None) -> Tensor:
        """tokens (N,) at position cache.length -> logits (N, V or vocab_limit) for the next token; advances the
        cache."""
        t = cache.length
        if t >= cache.max_len:
            raise ValueError(f"cache is full: {cache.max_len} positions decoded")
        if tokens.numel() != cache.self_kv.size(2):
            raise ValueError(f"{tokens.numel()} tokens for a cache of {cache.self_kv.size(2)} rows")
        x = self.embed(tokens.view(-1, 1), cache.positions[t:t + 1])                    # (N, 1, d)
        memory_kv, memory_pos, memory_mask, group = cache.memory_for_rows()
        cross_mask = autocast_input(cache.pos_query[:, t:t + 1] @ memory_pos.transpose(-1, -2)
                                    + memory_mask)                                        # (Bs, H, 1, S)
        for i, layer in enumerate(self.layers):
            self_mask = cache.self_bias[i, :, t:t + 1, :t + 1]                          # (H, 1, t + 1)
            x = layer(x, self_mask, memory_kv[i], cross_mask, kv_cache=cache.self_kv[i], start=t, group=group)
        cache.length = t + 1
        return self.logits(x[:, 0], vocab_limit)


# ----------------------------------------------------------------------------------------------------------------------
# The model

class IMAGE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if not self.decoder.embed_tokens.weight.is_meta:        # built on the meta device: shapes only, no init
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """From-scratch init as OFA/fairseq: N(0, 0.02) linears and embeddings, zero pad rows, zero bias tables."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, Decoder):
            for table in module.rel_pos_bias:
                nn.init.zeros_(table.weight)
        if isinstance(module, Encoder) and module.modality_embed is not None:
            nn.init.zeros_(module.modality_embed.weight)   # zero: a converted MMSpeech behaves exactly as before

    def encode(self, fbank: Tensor, fbank_lengths: Tensor, phones: Optional[Tensor] = None,
               phone_chars: Optional[Tensor] = None, phone_lengths: Optional[Tensor] = None,
               speech_present: Optional[Tensor] = None, text_present: Optional[Tensor] = None) -> Encoded:
        """fbank (B, T, mels) float, fbank_lengths (B,); phones/phone_chars (B, P) padded with PAD, phone_lengths (B,);
        speech_present/text_present (B,) bool or None (None: no modality embedding, plain MMSpeech).
        phones None or P == 0: no text stream. phone_chars None: phone embeddings only (MMSpeech's own phone input)."""
        char_embeds = None
        if phones is not None and phone_chars is not None and phones.size(1) > 0:
            char_embeds = self.decoder.embed_tokens(phone_chars)          # shared with the decoder, unscaled
        return self.encoder(fbank, fbank_lengths, phones, char_embeds, phone_lengths, speech_present, text_present)

    def decode(self, decoder_input: Tensor, enc: Encoded) -> Tensor:
        """decoder_input (B, L) starting with BOS -> logits (B, L, V)."""
        return self.decoder(decoder_input, enc)

    def forward(self, fbank, fbank_lengths, decoder_input, phones=None, phone_chars=None, phone_lengths=None,
                speech_present=None, text_present=None) -> Tensor:
        """Teacher-forced logits (B, L, V) for one batch (the data.collate dict without 'target')."""
        enc = self.encode(fbank, fbank_lengths, phones, phone_chars, phone_lengths, speech_present, text_present)
        return self.decode(decoder_input, enc)

    def new_cache(self, enc: Encoded, max_len: int) -> Cache:
        """Cache for up to max_len decoder positions (BOS included), one row per encoder row. Expand to beams with
        cache.reorder(torch.arange(B).repeat_interleave(beam)): the encoder keys/values then stay per source."""
        return self.decoder.new_cache(enc, max_len)

    def decode_step(self, tokens: Tensor, cache: Cache, vocab_limit: Optional[int] = None) -> Tensor:
        """tokens (N,): each row's token at position cache.length -> logits (N, V) for the next position; with
        vocab_limit only the first vocab_limit ids (N, vocab_limit)."""
        return self.decoder.step(tokens, cache, vocab_limit)

    def phone_logits(self, enc: Encoded) -> Tensor:
        """MMSpeech's CTC phone head, tied to phone embedding rows [3, phone_dict_size): (B, S, phone_dict_size - 3)."""
        return F.linear(enc.hidden, self.encoder.phone_embed.weight[3:self.config.phone_dict_size])

    def speech_phone_log_probs(self, enc: Encoded, fbank_frames: int) -> tuple[Tensor, Tensor]:
        """CTC log-probs over the speech frames (the speech stream comes first in enc) of a batch whose padded
        fbank has fbank_frames frames. -> (B, T', phone_dict_size - 3) float32 (class 0 = blank), valid frames (B,)."""
        n = conv_output_lengths(fbank_frames)                           # int arithmetic: no tensor, no host sync
        frames = (~enc.padding_mask[:, :n]).sum(1)
        return self.phone_logits(enc)[:, :n].float().log_softmax(-1), frames

    def num_parameters(self, mmspeech_only: bool = False) -> int:
        """Unique parameters (the tied head once); mmspeech_only leaves out IMAGE's modality embedding."""
        skip = {"encoder.modality_embed.weight"} if mmspeech_only else set()
        return sum(p.numel() for name, p in self.named_parameters() if name not in skip)
