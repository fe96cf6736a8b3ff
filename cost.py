"""
What one training step costs, from the model config alone: FLOPs (for MFU) and peak memory (for a GPU's budget).

  forward_flops(config, fbank_lengths, target_lengths)   exact matmul/convolution FLOPs of one forward
  memory_estimate(preset, batch, seconds, precision)     peak bytes of one training step, part by part
  suggest_max_frames(...)                                the train.py --max-frames that fits a card
  auto_max_frames(...)                                   train.py's --max-frames auto, from this GPU's free memory

bench.py reports them beside what it measures; train.py picks --max-frames auto on a GPU with auto_max_frames.
GB = 1e9 bytes, GiB = 2**30 bytes: every figure says which.
"""
import torch

import audio
import image

FULL_VOCAB = 51134                      # MMSpeech's decoder vocabulary (the head dominates a tiny model's step)


# ----------------------------------------------------------------------------------------------------------
# analytic FLOP count of one teacher-forced forward (exact per layer, matmuls and convolutions only)


def forward_flops(c, fbank_lengths, target_lengths, phone_lengths=None):
    """FLOPs (2 per multiply-add) of IMAGE.forward, summed over rows at each row's *true* lengths.

    Counts every Linear, convolution, attention score / weighted sum and the LM head; elementwise work, norms and
    softmax are left out (<1 %). Padding is not counted, so MFU from this number is charged for padding waste.
    A training step is 3x (the backward pass computes grads of inputs and of weights, 2x the forward).
    """
    d, ffn_e, ffn_d = c.d_model, c.encoder_ffn, c.decoder_ffn
    k = max(3, c.pos_conv_width // c.pos_conv_layers)
    f1 = (c.num_mel_bins - 3) // 2 + 1                           # mel axis after conv1, conv2
    f2 = (f1 - 3) // 2 + 1
    total = 0
    for i, (t, length) in enumerate(zip(fbank_lengths, target_lengths)):
        t, length = int(t), int(length)
        p = int(phone_lengths[i]) if phone_lengths is not None else 0
        t1 = (t - 3) // 2 + 1
        t2 = (t1 - 3) // 2 + 1                                   # = image.conv_output_lengths
        ch = c.subsample_channels or d
        macs = t1 * f1 * ch * 9 + t2 * f2 * ch * ch * 9           # Conv2dSubsampling4
        macs += t2 * (ch * f2) * d + t2 * d * d                   # its Linear, input_proj
        macs += c.pos_conv_layers * (t2 + p) * d * (d // c.pos_conv_groups) * k   # speech + text conv positions
        for layer in range(c.encoder_layers):
            s = t2 + (p if p and layer >= c.text_join_layer else 0)
            macs += s * (4 * d * d + 2 * d * ffn_e) + 2 * s * s * d
        s = t2 + p
        macs += 2 * length * d * d + length * length * d          # self-attention position bias (q, k, scores)
        macs += length * d * d + s * d * d + length * s * d       # cross-attention position bias
        macs += c.decoder_layers * (length * (6 * d * d + 2 * d * ffn_d) + s * 2 * d * d
                                    + 2 * length * length * d + 2 * length * s * d)
        macs += length * d * c.vocab_size                         # tied LM head
        total += 2 * macs
    return total


# ----------------------------------------------------------------------------------------------------------
# analytic peak memory of one training step (fp32 master weights, AdamW, autocast), from the config's shapes

GB, GiB = 1e9, 2**30
CHARS_PER_SECOND = 4.0       # Mandarin read speech (AISHELL-1: ~3-4.5 characters/s); sets the default target length
BRACKETS_PER_CHAR = 0.25     # 2 bracket tokens per entity, about one entity per 8 characters (CNERTA bracketed text)
PHONES_PER_CHAR = 2.4        # MMSpeech units per character (text2phone_dict.txt: mean 2.36)
CUDA_CONTEXT = 1 * GiB       # allowance: CUDA context + cuBLAS/cuDNN workspaces, outside max_memory_allocated
PRECISIONS = {"fp32": 4, "bf16": 2, "fp16": 2}
MEMORY_PARTS = ("weights", "grads", "adamw", "autocast_copies", "inputs", "subsampling", "encoder_stream",
                "encoder_layers", "cross_memory", "decoder_layers", "logits", "loss_backward")


def dropout_mask_bytes(p, dtype_bytes, device):
    """Bytes a dropout keeps per element: a bool mask on CUDA; CPU's dropout multiplies by a noise tensor of the
    dropped tensor's dtype and keeps that."""
    return 0 if p == 0 else (1 if device == "cuda" else dtype_bytes)


def model_tensors(config, text_stream=True):
    """-> (parameters, parameter tensors, parameters autocast copies to half precision) of the model built on the
    meta device (shapes only). Copies: every Linear and convolution that runs (weight and bias: F.linear/conv cast
    both; the text stream's convolutions only with a text stream) and the tied LM head; embeddings, LayerNorms
    and bias tables stay fp32 (not autocast ops)."""
    with torch.device("meta"):
        model = image.IMAGE(config)
    params = list(model.parameters())                            # unique: the tied head once
    unused = set() if text_stream else set(model.encoder.text_pos_conv.modules())
    matmul = [p for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
              and m not in unused for p in m.parameters()]
    return (sum(p.numel() for p in params), len(params),
            sum(p.numel() for p in matmul) + model.decoder.embed_tokens.weight.numel())


def encoder_layer_bytes(c, precision="bf16", device="cuda"):
    """Bytes one EncoderLayer keeps for backward per token (residual stream fp32, as autocast leaves it).

    Saved: the two LayerNorm inputs (fp32) + mean/rstd; the inputs of q/k/v, fc1 (fp32 LayerNorm outputs; under
    autocast each Linear saves its own half-precision cast, so q/k/v keep three); q, k, v, the attention output
    and its logsumexp (memory-efficient SDPA: O(T) per query, no (T, T) weights; its output is laid out (B, T, H,
    hd), so out_proj reads it without a copy); fc1's output (GELU input) and GELU's output (fc2 input); dropout
    masks (bool on CUDA; CPU's dropout saves a noise tensor of the dropped tensor's dtype)."""
    a, d, f = PRECISIONS[precision], c.d_model, c.encoder_ffn
    cast = 0 if a == 4 else a                                    # a Linear's half-precision copy of an fp32 input
    mask = lambda p, size: dropout_mask_bytes(p, size, device)
    return (4 * d + 8 + (4 * d if a == 4 else 3 * cast * d)     # attn_norm input + stats, q/k/v inputs
            + 3 * a * d + a * d + 4 * c.encoder_heads            # q, k, v, attention output, logsumexp
            + mask(c.dropout, a) * d                             # dropout after out_proj
            + 4 * d + 8 + (4 * d if a == 4 else cast * d)        # ffn_norm input + stats, fc1 input
            + 2 * a * f + mask(c.activation_dropout, a) * f      # GELU input, fc2 input
            + mask(c.dropout, a) * d)                            # dropout after fc2


def decoder_layer_bytes(c, precision="bf16", device="cuda"):
    """Bytes one DecoderLayer keeps per target token (fp32 residual): as the encoder layer for self-attention
    and FFN, plus the NormFormer mid-LayerNorms (fp32 copies of their inputs), the head-scaled attention output
    copied for out_proj (self and cross), the cross-attention query. The encoder keys/values are per source token
    (cross_memory); the attention biases per (query, key) pair in memory_estimate."""
    a, d, f = PRECISIONS[precision], c.d_model, c.decoder_ffn
    cast = 0 if a == 4 else a
    mask = lambda p, size: dropout_mask_bytes(p, size, device)
    lse = 4 * c.decoder_heads
    self_attn = 4 * d + 8 + (4 * d if a == 4 else 3 * cast * d) + 4 * a * d + lse + a * d + 4 * d + 8
    cross_attn = 4 * d + 8 + (4 * d if a == 4 else cast * d) + 2 * a * d + lse + a * d + 4 * d + 8
    ffn = 4 * d + 8 + (4 * d if a == 4 else cast * d) + a * f + 4 * f + 8 + (4 * f if a == 4 else cast * f)
    return self_attn + cross_attn + ffn + mask(c.dropout, 4) * 2 * d + mask(c.activation_dropout, a) * f \
        + mask(c.dropout, a) * d


def memory_estimate(preset="large", batch=12, seconds=20.0, precision="bf16", *, frames=None, target_tokens=None,
                    phones=None, device="cuda", config=None):
    """Peak memory of one training step (train.py's, one micro-batch) -> {part: bytes}, plus totals.

    batch rows of `frames` padded fbank frames each (default: audio.num_fbank_frames of `seconds`), decoder input
    `target_tokens` (default BOS + characters + brackets at CHARS_PER_SECOND) and a text stream of `phones`
    positions (default: an MNER row's phones of those characters; 0 = speech only, MMSpeech's ASR). Every row at
    the longest length (padding costs as much as speech). batch may be fractional (a frame budget / frames per row):
    every activation is linear in batch. The activation parts hold what autograd saves for backward at its start,
    the peak: nothing is freed yet. Gradients are counted whole: they exist during the backward of every
    micro-batch after the first (accumulation), and grow to full size in the first. total_allocated is what
    torch.cuda.max_memory_allocated measures; total_with_context adds CUDA_CONTEXT. Not counted: allocator
    rounding and fragmentation (max_memory_reserved - max_memory_allocated), one layer's backward transients."""
    c = config or getattr(image.Config, preset)(vocab_size=FULL_VOCAB)
    a = PRECISIONS[precision]
    half = a != 4
    mask = lambda p: dropout_mask_bytes(p, 4, device)            # dropout on an fp32 tensor
    frames = frames if frames is not None else audio.num_fbank_frames(round(seconds * audio.SAMPLE_RATE))
    chars = round(frames / 100 * CHARS_PER_SECOND)               # 100 fbank frames per second
    target_tokens = target_tokens if target_tokens is not None else 1 + round(chars * (1 + BRACKETS_PER_CHAR))
    phones = phones if phones is not None else round(chars * PHONES_PER_CHAR)
    n_params, n_tensors, n_copied = model_tensors(c, text_stream=phones > 0)
    d, ch = c.d_model, c.subsample_channels or c.d_model
    t1, f1 = (frames - 1) // 2, (c.num_mel_bins - 1) // 2      # after conv1 (3x3, stride 2, no padding)
    t2, f2 = (t1 - 1) // 2, (f1 - 1) // 2                       # after conv2 = image.conv_output_lengths
    s = t2 + phones                                              # encoder positions from text_join_layer on
    n_join = c.encoder_layers - c.text_join_layer
    # per position: each conv layer's input, LayerNorm input (fp32) + mean/rstd, GELU input (fp32)
    pos_conv = c.pos_conv_layers * (((a if half else 4) + 8) * d + 8)
    L = target_tokens

    parts = dict.fromkeys(MEMORY_PARTS, 0)
    parts["weights"] = 4 * n_params
    parts["grads"] = 4 * n_params
    parts["adamw"] = 2 * 4 * n_params + 4 * n_tensors            # exp_avg, exp_avg_sq; a float32 step per tensor
    parts["autocast_copies"] = a * n_copied if half else 0
    parts["inputs"] = batch * (frames * c.num_mel_bins * 4 + 8 * (2 * L + 2 * phones))   # fbank, ids
    # conv1 input (a cast per row under autocast), ReLU outputs (conv2 input; ReLU keeps its own), the
    # channel-major flatten of the second ReLU's output (proj input)
    parts["subsampling"] = batch * ((a * frames * c.num_mel_bins if half else 0)
                                    + a * ch * t1 * f1 + 2 * a * ch * t2 * f2)
    # input_proj's input, the speech conv positions, the speech dropout; the text stream's conv positions;
    # the final LayerNorm's input
    parts["encoder_stream"] = batch * (t2 * ((a if half else 4) * d + pos_conv + mask(c.dropout) * d)
                                       + phones * pos_conv + s * (4 * d + 8))
    per_token = encoder_layer_bytes(c, precision, device)
    parts["encoder_layers"] = batch * per_token * (c.text_join_layer * t2 + n_join * s)
    # per decoder layer the encoder output's keys and values (and, under autocast, k_proj's and v_proj's own
    # casts of it; fp32 shares the one output); the cross-attention position keys (cross_pos_k input, a copy of
    # its output for the matmul) once
    kv = c.decoder_layers * (4 * a * d if half else 2 * a * d) + (0 if half else 4 * d)
    parts["cross_memory"] = batch * s * (kv + (a if half else 4) * d + a * d)
    # decoder layers; embedding LayerNorm input and dropout; the final LayerNorm and the head's input; the
    # position queries' copy for the cross-bias matmul. The attention biases (position biases + padding, kept by
    # SDPA): self (H, L, L) per layer, shared by the rows; cross (B, H, L, S), a half-precision copy per layer
    # under autocast, one fp32 tensor otherwise
    dec = (c.decoder_layers * decoder_layer_bytes(c, precision, device) + 4 * d + 8 + mask(c.dropout) * d
           + 4 * d + 8 + (a if half else 4) * d + a * d)
    cross_bias = (c.decoder_layers * a if half else 4) * c.decoder_heads * L * s
    parts["decoder_layers"] = batch * (L * dec + cross_bias) + c.decoder_layers * c.decoder_heads * L * L * a
    # the loss: fp32 log-probs (B, L, V) kept by log_softmax; at the start of backward two more (B, L, V) fp32
    # tensors (the gradients of the log-probs and of the logits) while the log-probs are alive
    parts["logits"] = batch * L * c.vocab_size * 4
    parts["loss_backward"] = batch * L * c.vocab_size * 8
    total = sum(parts.values())
    return {**parts, "total_allocated": total, "cuda_context": CUDA_CONTEXT if device == "cuda" else 0,
            "total_with_context": total + (CUDA_CONTEXT if device == "cuda" else 0),
            "shapes": {"frames": frames, "subsampled": t2, "phones": phones, "target_tokens": L, "batch": batch,
                       "encoder_bytes_per_token_per_layer": per_token, "parameters": n_params}}


def suggest_max_frames(preset, precision, seconds, card_gib=24.0, margin_gib=3.0, **kwargs):
    """-> (frames, rows): the largest train.py --max-frames (padded fbank frames per micro-batch = rows x the
    longest row's frames) whose estimate, CUDA context included, leaves margin_gib of a card_gib card, for rows of
    `seconds` (the longest utterance: per frame, long rows cost the most). 0 frames when not even the weights fit."""
    fixed = memory_estimate(preset, 0, seconds, precision, **kwargs)
    one_row = memory_estimate(preset, 1, seconds, precision, **kwargs)
    per_row = one_row["total_with_context"] - fixed["total_with_context"]
    rows = max(0.0, ((card_gib - margin_gib) * GiB - fixed["total_with_context"]) / per_row)
    return int(rows * fixed["shapes"]["frames"]), rows


def auto_max_frames(card_bytes, config, precision, longest, rows):
    """train.py --max-frames auto -> (frames, note): none on a CPU (card_bytes 0); on a GPU with card_bytes usable
    (devices.gpu_bytes: this process's share, what other processes leave) the budget whose estimated peak (this
    model and precision, rows of the corpus's longest row, `longest` fbank frames) leaves 3 GiB free for
    fragmentation; the note says so, with the estimate for `rows` such rows at once."""
    if not card_bytes:
        return 0, None
    card_gib, seconds = card_bytes / GiB, longest / 100  # fbank frames are 10 ms apart
    frames, fit_rows = suggest_max_frames(None, precision, seconds, card_gib, 3.0, config=config, frames=longest)
    need = memory_estimate(None, rows, seconds, precision, config=config, frames=longest)["total_with_context"] / GiB
    if frames == 0:
        return 0, (f"warning: cost.py estimates that this model does not fit the GPU's {card_gib:.1f} GiB even "
                   "without activations; training anyway (--max-frames 0)")
    return frames, (f"--max-frames auto: {frames} frames ({fit_rows:.1f} rows of the longest, {seconds:.1f} s) per "
                    f"micro-batch on the {card_gib:.1f} GiB of GPU memory this process may use; {rows} such rows at "
                    f"once would need ~{need:.1f} GiB (cost.py estimate)")


MEMORY_NOTES = {
    "weights": "fp32 master weights", "grads": "fp32 gradients (whole: accumulation keeps them)",
    "adamw": "AdamW exp_avg + exp_avg_sq fp32, a step per tensor", "autocast_copies": "half copies of Linear/conv "
    "weights + LM head", "inputs": "fbank (fp32) and id batches", "subsampling": "conv ReLU outputs, flatten",
    "encoder_stream": "input_proj, conv positions, dropout, final norm",
    "encoder_layers": "LN inputs, q/k/v, attention out, FFN, masks",
    "cross_memory": "encoder k/v per decoder layer, position keys", "decoder_layers":
    "decoder layers, embeddings, head input, attention biases", "logits": "fp32 log-probs (B, L, V)",
    "loss_backward": "2 fp32 (B, L, V) gradients in backward", "total_allocated": "= torch.cuda.max_memory_allocated",
    "cuda_context": "allowance, outside the allocator", "total_with_context": "what the card must hold"}


def format_memory(estimate, title):
    """The estimate as a table in GB (1e9 bytes) and GiB (2**30 bytes)."""
    sh = estimate["shapes"]
    lines = [title, f"  rows {sh['batch']:g} x {sh['frames']} fbank frames ({sh['subsampled']} after subsampling) "
             f"+ {sh['phones']} phones, decoder {sh['target_tokens']} tokens; {sh['parameters']:,} parameters; "
             f"encoder layer {sh['encoder_bytes_per_token_per_layer'] / 1e3:.1f} kB per token",
             f"  {'part':20s} {'GB':>8s} {'GiB':>8s}  what"]
    for part, note in MEMORY_NOTES.items():
        lines.append(f"  {part:20s} {estimate[part] / GB:8.3f} {estimate[part] / GiB:8.3f}  {note}")
    return "\n".join(lines)
