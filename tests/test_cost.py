"""cost.py: the analytic FLOP count against torch's FLOP counter, the memory estimate against the bytes a real CPU
step holds (parameters, gradients, AdamW state exactly; activations against what autograd saves)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cost  # noqa: E402
import image  # noqa: E402
import text  # noqa: E402
import train  # noqa: E402

PAPER = train.TrainConfig(**train.PAPER, dataset="cnerta", out="")   # the paper's optimizer settings


@pytest.mark.parametrize("phones", [0, 23])
def test_forward_flops_equals_torch_flop_counter(phones):
    """The per-layer count MFU is based on equals what torch's FlopCounterMode sees in a real forward (batch of one,
    so there is no padding; the math SDPA backend, whose matmuls the counter sees)."""
    torch.manual_seed(0)
    config = image.Config.tiny()
    model = image.IMAGE(config).eval()
    frames, tokens = 301, 13
    kwargs = {}
    if phones:
        kwargs = dict(phones=torch.randint(4, 140, (1, phones)), phone_chars=torch.randint(4, 900, (1, phones)),
                      phone_lengths=torch.tensor([phones]), speech_present=torch.tensor([True]),
                      text_present=torch.tensor([True]))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, frames, 80), torch.tensor([frames]), torch.randint(4, 900, (1, tokens)), **kwargs)
    expected = cost.forward_flops(config, [frames], [tokens], [phones] if phones else None)
    assert counter.get_total_flops() == expected


def test_forward_flops_sums_rows_at_true_lengths():
    config = image.Config.tiny()
    both = cost.forward_flops(config, [301, 200], [13, 7])
    assert both == cost.forward_flops(config, [301], [13]) + cost.forward_flops(config, [200], [7])


def tiny_mner_batch(config, rows=3, frames=401, tokens=17, phones=30):
    """A batch with both streams and the modality flags, so that every parameter gets a gradient."""
    g = torch.Generator().manual_seed(0)
    full = lambda n: torch.full((rows,), n)
    present = torch.ones(rows, dtype=torch.bool)
    return dict(fbank=torch.randn(rows, frames, config.num_mel_bins, generator=g), fbank_lengths=full(frames),
                decoder_input=torch.randint(4, config.vocab_size, (rows, tokens), generator=g),
                phones=torch.randint(4, config.phone_vocab_size, (rows, phones), generator=g),
                phone_chars=torch.randint(4, config.vocab_size, (rows, phones), generator=g),
                phone_lengths=full(phones), speech_present=present, text_present=present)


def training_loss(model, batch):
    logits = model(**batch)                                                           # (B, L, V)
    target = torch.roll(batch["decoder_input"], -1, 1)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=text.PAD, reduction="sum")


def test_memory_estimate_weights_grads_and_adamw_are_the_bytes_of_a_real_step():
    """train.py's optimizer after one step on CPU: parameters, gradients and AdamW state (two moments and a step
    tensor per parameter) take exactly the bytes the estimate gives."""
    torch.manual_seed(0)
    config = image.Config.tiny()
    model = image.IMAGE(config).train()
    optimizer = train.make_optimizer(model, PAPER, torch.device("cpu"))
    training_loss(model, tiny_mner_batch(config)).backward()
    optimizer.step()
    params = list(model.parameters())
    assert all(p.grad is not None for p in params)                  # the batch reaches every parameter
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    estimate = cost.memory_estimate(batch=3, precision="fp32", frames=401, target_tokens=17, phones=30,
                                     device="cpu", config=config)
    assert estimate["weights"] == nbytes(params)
    assert estimate["grads"] == nbytes(p.grad for p in params)
    assert estimate["adamw"] == nbytes(state)
    assert estimate["autocast_copies"] == 0
    assert cost.memory_estimate(batch=3, precision="bf16", config=config)["autocast_copies"] > 0


def test_memory_estimate_counts_the_parameters_of_the_large_model():
    with torch.device("meta"):
        model = image.IMAGE(image.Config.large(vocab_size=cost.FULL_VOCAB))
    estimate = cost.memory_estimate("large", 12, 20.0, "bf16")
    assert estimate["shapes"]["parameters"] == model.num_parameters()
    assert estimate["weights"] == 4 * model.num_parameters()


ACTIVATIONS = ("inputs", "subsampling", "encoder_stream", "encoder_layers", "cross_memory", "decoder_layers",
               "logits", "loss_backward")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_estimate_activations_are_linear_in_batch_and_encoder_layers_in_seconds(precision):
    est = lambda batch, seconds=20.0: cost.memory_estimate("base", batch, seconds, precision, phones=0)
    for part in ACTIVATIONS:
        assert est(6)[part] - est(3)[part] == est(3)[part] - est(0)[part] > 0, part
    for part in ("weights", "grads", "adamw", "autocast_copies"):
        assert est(6)[part] == est(1)[part]
    # memory-efficient attention keeps O(T) per query: the encoder layers' bytes follow the subsampled frames
    for seconds in (5.0, 10.0, 20.0):
        e = est(2, seconds)
        assert e["encoder_layers"] == 2 * e["shapes"]["subsampled"] * 12 * e["shapes"]["encoder_bytes_per_token_"
                                                                                             "per_layer"]
    assert est(2, 20.0)["encoder_layers"] > 1.9 * est(2, 10.0)["encoder_layers"]


def test_memory_estimate_matches_the_tensors_autograd_saves():
    """One fp32 training forward of the tiny model on CPU (both streams, dropout on): the bytes of every distinct
    storage autograd saves for backward (parameters left out) against the estimate's activation parts, without
    the loss's backward transients. Measured: estimate / saved = 0.994 (0.994 speech only)."""
    torch.manual_seed(0)
    config = image.Config.tiny()
    model = image.IMAGE(config).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    batch = tiny_mner_batch(config)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(model, batch)
    estimate = cost.memory_estimate(batch=3, precision="fp32", frames=401, target_tokens=17, phones=30,
                                     device="cpu", config=config)
    predicted = sum(estimate[part] for part in ACTIVATIONS if part != "loss_backward")
    assert 0.95 < predicted / sum(saved.values()) < 1.05
    del loss


def test_max_frames_auto_fits_the_card_from_the_estimate():
    """train.py --max-frames auto with the GPU's memory passed in: large, bf16, rows of 20 s. A 24 GiB card gets a
    budget under 12 rows (the estimate says 12 need more than it holds), an 80 GiB card more than 12 rows, a CPU
    (0 bytes) none."""
    large = image.Config.large(vocab_size=cost.FULL_VOCAB)
    rows_of = lambda frames: frames / 1998
    on_4090, note = cost.auto_max_frames(24 * cost.GiB, large, "bf16", 1998, 12)
    assert 8 < rows_of(on_4090) < 12 and f"--max-frames auto: {on_4090} frames" in note
    fits = cost.memory_estimate(None, rows_of(on_4090), 20.0, "bf16", config=large, frames=1998)
    assert fits["total_with_context"] <= 21 * cost.GiB          # 3 GiB of the 24 left free
    assert rows_of(cost.auto_max_frames(80 * cost.GiB, large, "bf16", 1998, 12)[0]) > 12
    assert cost.auto_max_frames(0, large, "bf16", 1998, 12) == (0, None)
