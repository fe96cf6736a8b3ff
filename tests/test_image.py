"""image.py: parity with ModelScope's MMSpeech (committed reference dumps), batch invariance, the KV cache, dtypes,
the IMAGE additions. Reference tensors: tests/fixtures/ref_ms_tiny_{a,b}.pt (made by reference/ref_make_fixtures.py
from the committed ModelScope directories ms_tiny_a/ms_tiny_b and wavs; both embedding-flag settings)."""
import dataclasses
import math
import os
import sys

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image  # noqa: E402
import weights  # noqa: E402
from image import IMAGE, Config, PAD  # noqa: E402
from numerics import excess, fp32_tol, model_terms  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def model_tol(model, values, backward=False):
    """Float32 tolerance of a model output of the size of `values`, n = model_terms (tests/numerics.py: the longest
    sum in a layer x the layers passed; twice that through a backward pass). ms_tiny_a: n = 128 x 10 = 1280,
    tol 9.4e-5 on logits of size 5.5; the measured differences are 0.01-0.09 of the tolerances in this file."""
    n = model_terms(model.config)
    return fp32_tol(values, 2 * n if backward else n)


@pytest.fixture(scope="module", params=["ms_tiny_a", "ms_tiny_b"])
def converted(request):
    """(checkpoint dict of the converted ModelScope directory, reference dump)."""
    ckpt = weights.convert(os.path.join(FIXTURES, request.param))
    ref = torch.load(os.path.join(FIXTURES, f"ref_{request.param}.pt"), weights_only=True)
    return ckpt, ref


def build(ckpt, **overrides):
    model = IMAGE(Config(**{**ckpt["config"], **overrides}))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def reference_batch(ref):
    fbank = pad_sequence(ref["fbank"], batch_first=True)                    # zero padding, as ModelScope's collate
    decoder_input = pad_sequence(ref["decoder_input"], batch_first=True, padding_value=PAD)
    return fbank, ref["fbank_lengths"], decoder_input


def valid_logits(logits, ref):                                             # (sum of lengths, V)
    return torch.cat([logits[i, :len(d)] for i, d in enumerate(ref["decoder_input"])])


def perturbed_tiny(seed=0, **overrides):
    """A tiny model whose every parameter is non-trivial (zero-initialised tables and LayerNorms perturbed)."""
    torch.manual_seed(seed)
    model = IMAGE(Config.tiny(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def random_inputs(batch=3, frames=(121, 70, 96), phone_lengths=(9, 0, 5), dec_lengths=(7, 4, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(frames[:batch])
    fbank = torch.randn(batch, int(lengths.max()), 80, generator=g)
    fbank = fbank.masked_fill(image.lengths_to_padding(lengths, fbank.size(1))[..., None], 0.0)
    p_len = torch.tensor(phone_lengths[:batch])
    phones = torch.randint(4, 141, (batch, int(p_len.max())), generator=g)
    chars = torch.randint(4, 1000, phones.shape, generator=g)
    pad = image.lengths_to_padding(p_len, phones.size(1))
    phones, chars = phones.masked_fill(pad, PAD), chars.masked_fill(pad, PAD)
    d_len = torch.tensor(dec_lengths[:batch])
    dec = torch.randint(4, 1000, (batch, int(d_len.max())), generator=g)
    dec[:, 0] = image.BOS
    dec = dec.masked_fill(image.lengths_to_padding(d_len, dec.size(1)), PAD)
    return dict(fbank=fbank, fbank_lengths=lengths, phones=phones, phone_chars=chars, phone_lengths=p_len,
                speech_present=torch.ones(batch, dtype=torch.bool), text_present=p_len > 0,
                decoder_input=dec), d_len


def row(batch, i, phone_len=None):
    """Row i of a batch dict, unpadded (what the same sample looks like alone)."""
    out = {}
    n_frames, n_phones = int(batch["fbank_lengths"][i]), int(batch["phone_lengths"][i])
    for key, value in batch.items():
        value = value[i:i + 1]
        if key == "fbank":
            value = value[:, :n_frames]
        elif key in ("phones", "phone_chars"):
            value = value[:, :n_phones]
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Parity with ModelScope


def select_rows(enc, index):
    """The encoder output of the rows in index (B',): what a slow reference decodes from."""
    return type(enc)(*(t.index_select(0, index) for t in (enc.hidden, enc.padding_mask, enc.position)))


def test_batch_parity_with_modelscope_padding(converted):
    """Mixed-length batch of 4 with ModelScope's mock phones [6,6,6] masked: compat switch reproduces it exactly."""
    ckpt, ref = converted
    model = build(ckpt, modelscope_padding=True, mask_pseudo=True)
    fbank, lengths, dec = reference_batch(ref)
    phones = torch.full((4, 3), 6)                                          # phone_masks False -> text absent, masked
    with torch.no_grad():
        enc = model.encode(fbank, lengths, phones, speech_present=torch.ones(4, dtype=torch.bool),
                           text_present=torch.zeros(4, dtype=torch.bool))
        logits = model.decode(dec, enc)
    assert torch.equal(enc.padding_mask, ref["batch"]["padding_mask"])
    assert_parity(model, enc, logits, ref, ref["batch"])


def assert_parity(model, enc, logits, ref, run):
    """Encoder output, positions and logits of a batch within float32 rounding of the dump `run`."""
    valid = ~enc.padding_mask
    for ours, expected in ((enc.hidden[valid], run["encoder_out"]), (enc.position[valid], run["position"]),
                           (valid_logits(logits, ref), torch.cat(run["logits"]))):
        assert excess(ours, expected, model_tol(model, expected)) <= 1


def test_parity_tolerance_catches_a_planted_layer_norm_bug(converted):
    """LayerNorm eps 1e-4 instead of 1e-5 moves the logits by >= 10x the parity tolerance (measured 250-770x;
    the real differences are 0.02-0.05 of it), so the tolerance cannot hide a bug of that size."""
    ckpt, ref = converted
    model = build(ckpt, modelscope_padding=True)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-4
    fbank, lengths, dec = reference_batch(ref)
    with torch.no_grad():
        logits = model.decode(dec, model.encode(fbank, lengths))
    expected = torch.cat(ref["batch"]["logits"])
    assert excess(valid_logits(logits, ref), expected, model_tol(model, expected)) >= 10


def test_batch_parity_without_text_stream(converted):
    """The masked mock phones cannot matter: no text stream at all gives the same speech positions and logits."""
    ckpt, ref = converted
    model = build(ckpt, modelscope_padding=True)
    fbank, lengths, dec = reference_batch(ref)
    with torch.no_grad():
        enc = model.encode(fbank, lengths)
        logits = model.decode(dec, enc)
    frames = enc.hidden.size(1)
    ref_pad = ref["batch"]["padding_mask"]
    assert torch.equal(enc.padding_mask, ref_pad[:, :frames]) and ref_pad[:, frames:].all()
    expected_hidden, expected_logits = ref["batch"]["encoder_out"], torch.cat(ref["batch"]["logits"])
    assert excess(enc.hidden[~enc.padding_mask], expected_hidden, model_tol(model, expected_hidden)) <= 1
    assert excess(valid_logits(logits, ref), expected_logits, model_tol(model, expected_logits)) <= 1


@pytest.mark.parametrize("modelscope_padding", [False, True])
def test_single_utterance_parity_zero_modality(converted, modelscope_padding):
    """Batch size 1: default and compat padding both equal ModelScope; the converted all-zero modality embedding with
    speech marked present and no text stream changes nothing."""
    ckpt, ref = converted
    model = build(ckpt, modelscope_padding=modelscope_padding)
    assert not model.encoder.modality_embed.weight.any()
    for i, single in enumerate(ref["single"]):
        fbank = ref["fbank"][i][None]
        with torch.no_grad():
            enc = model.encode(fbank, ref["fbank_lengths"][i:i + 1], speech_present=torch.ones(1, dtype=torch.bool))
            logits = model.decode(ref["decoder_input"][i][None], enc)[0]
        assert not enc.padding_mask.any()
        assert torch.equal(single["padding_mask"], torch.cat([enc.padding_mask[0], torch.ones(3, dtype=torch.bool)]))
        assert excess(enc.hidden[0], single["encoder_out"], model_tol(model, single["encoder_out"])) <= 1
        assert excess(logits, single["logits"], model_tol(model, single["logits"])) <= 1


def test_phone_stream_parity(converted):
    """A real phone stream (mixed lengths, one row with phone_masks False = text absent + mask_pseudo) joining at
    layer 6, against ModelScope's encoder and decoder; phone_chars None = MMSpeech's own phone input."""
    ckpt, ref = converted
    model = build(ckpt, modelscope_padding=True, mask_pseudo=True)
    fbank, lengths, dec = reference_batch(ref)
    run = ref["phones"]
    with torch.no_grad():
        enc = model.encode(fbank, lengths, run["phones"], speech_present=torch.ones(4, dtype=torch.bool),
                           text_present=run["phone_masks"])
        logits = model.decode(dec, enc)
    assert torch.equal(enc.padding_mask, run["padding_mask"])
    assert_parity(model, enc, logits, ref, run)


def test_ctc_phone_head(converted):
    ckpt, ref = converted
    model = build(ckpt)
    with torch.no_grad():
        enc = model.encode(ref["fbank"][0][None], ref["fbank_lengths"][:1])
        ctc = model.phone_logits(enc)[0]
    assert ctc.shape[-1] == 121
    expected = ref["phone_distribution"][:ctc.size(0)]
    assert excess(ctc, expected, model_tol(model, expected)) <= 1


def test_modelscope_batching_changes_results(converted):
    """What the default avoids: in ModelScope (and our compat mode) a padded utterance differs from itself alone."""
    ckpt, ref = converted
    short = 0                                                               # utt000 is padded in the batch of 4
    batched_ref, single_ref = ref["batch"]["logits"][short], ref["single"][short]["logits"]
    fbank, lengths, dec = reference_batch(ref)
    for compat in (True, False):
        model = build(ckpt, modelscope_padding=compat)
        tol = model_tol(model, single_ref)
        with torch.no_grad():
            batched = model.decode(dec, model.encode(fbank, lengths))[short, :len(ref["decoder_input"][short])]
        if compat:                                  # the same deviation as ModelScope
            assert excess(batched_ref, single_ref, tol) >= 10 and excess(batched, batched_ref, tol) <= 1
        else:                                       # default: the batched row equals the utterance alone
            assert excess(batched, single_ref, tol) <= 1


def buckets_on_the_fly(q_len, k_len, bucket_size):
    """The decoder's buckets as computed before the table (every call, on the device): the table's reference."""
    rel = torch.arange(q_len)[:, None] - torch.arange(k_len)[None, :]
    mid = bucket_size // 2
    abs_rel = torch.where((rel < mid) & (rel > -mid), mid - 1, rel.abs())
    log_rel = torch.ceil(torch.log(abs_rel / mid) / math.log((image.REL_POS_MAX_DISTANCE - 1) / mid) * (mid - 1)) + mid
    return torch.where(abs_rel <= mid, rel, log_rel.int() * torch.sign(rel)).long() + bucket_size - 1


def table_buckets(decoder, length):
    """(length, length) buckets of the decoder's table, indexed as self_position_bias does."""
    rel = torch.arange(length)
    return decoder.rel_buckets[rel[:, None] - rel[None, :] + decoder.max_len - 1]


def test_relative_position_buckets_match_modelscope():
    ref = torch.load(os.path.join(FIXTURES, "ref_ms_tiny_a.pt"), weights_only=True)["bucket_rows"]
    with torch.device("meta"):                                   # the table is computed on the CPU all the same
        decoder = image.Decoder(Config.large())
    ours = table_buckets(decoder, 1024)
    assert decoder.max_len == 1024 and torch.equal(ours[ref["rows"]], ref["buckets"].long())
    assert ours.min() == 0 and ours.max() == 2 * 256 - 2
    assert torch.equal(ours, buckets_on_the_fly(1024, 1024, 256))


@pytest.mark.parametrize("max_positions,bucket_size", [(30, 16), (62, 256), (2000, 8)])
def test_relative_bucket_table_equals_the_buckets_of_every_position_pair(max_positions, bucket_size):
    """Every (query, key) pair up to the decoder's max_len (learned positions or the 1024 the scheme covers); the
    table is a non-persistent buffer: not in checkpoints, moved by .to()."""
    decoder = image.Decoder(Config.tiny(max_positions=max_positions, token_bucket_size=bucket_size))
    n = decoder.max_len
    assert n == min(max_positions + 2, 1024) and decoder.rel_buckets.shape == (2 * n - 1,)
    assert torch.equal(table_buckets(decoder, n), buckets_on_the_fly(n, n, bucket_size))
    assert "rel_buckets" not in decoder.state_dict()
    assert decoder.to("meta").rel_buckets.is_meta


def test_relative_bucket_table_is_clamped_into_the_bias_table(monkeypatch):
    """A log that rounds up (as another device's may) must not push the longest distances past the bias table."""
    log = torch.log
    monkeypatch.setattr(torch, "log", lambda x: log(x) * (1 + 2 ** -20))
    table = image.relative_bucket_table(1024, 256)
    assert buckets_on_the_fly(1024, 1024, 256).max() == 2 * 256 - 1          # out of range without the clamp
    assert table.min() == 0 and table.max() == 2 * 256 - 2
    model = perturbed_tiny(token_bucket_size=256)
    with torch.no_grad():
        model.decoder.rel_buckets.copy_(table)
        assert model.decoder.self_position_bias(1024).shape == (2, 4, 1024, 1024)


# ---------------------------------------------------------------------------------------------------------------------
# Batch invariance and the KV cache

def test_default_padding_is_batch_invariant():
    """Each row of a mixed-length batch (speech and text streams, one empty text row) equals the sample alone."""
    model = perturbed_tiny()
    batch, d_len = random_inputs()
    with torch.no_grad():
        enc = model.encode(**{k: v for k, v in batch.items() if k != "decoder_input"})
        logits = model.decode(batch["decoder_input"], enc)
        for i in range(3):
            alone = row(batch, i)
            enc1 = model.encode(**{k: v for k, v in alone.items() if k != "decoder_input"})
            logits1 = model.decode(alone["decoder_input"][:, :d_len[i]], enc1)
            valid = ~enc.padding_mask[i]
            assert torch.equal(enc1.padding_mask[0], torch.zeros(int(valid.sum()), dtype=torch.bool))
            assert excess(enc.hidden[i][valid], enc1.hidden[0], model_tol(model, enc1.hidden[0])) <= 1
            assert excess(logits[i, :d_len[i]], logits1[0], model_tol(model, logits1[0])) <= 1
    # the batch went through the packed layers (row-wise work on unpadded positions only): padding left as zeros
    assert enc.padding_mask.float().mean() > 0.05 and bool((enc.hidden[enc.padding_mask] == 0).all())


def test_packed_layers_train_like_padded_ones():
    """Gradients through the packed encoder equal those of the same rows run one at a time (no padding)."""
    model = perturbed_tiny()
    batch, d_len = random_inputs()
    grads = []
    for i in (None, 0, 1, 2):                                   # the padded batch, then each row alone, unpadded
        model.zero_grad()
        b = batch if i is None else row(batch, i)
        logits = model.decode(b["decoder_input"], model.encode(**{k: v for k, v in b.items() if k != "decoder_input"}))
        rows = range(3) if i is None else [0]
        sum(logits[j, :d_len[j if i is None else i]].square().sum() for j in rows).backward()
        grads.append(model.encoder.layers[2].fc1.weight.grad.clone())
    rows_alone = grads[1] + grads[2] + grads[3]
    assert excess(grads[0], rows_alone, model_tol(model, rows_alone, backward=True)) <= 1


@pytest.mark.parametrize("modelscope_padding", [False, True])
def test_shared_pseudo_speech_equals_computing_every_row(modelscope_padding, monkeypatch):
    """Absent-speech rows with the same pseudo fbank are computed once: outputs and gradients equal the plain way."""
    model = perturbed_tiny(modelscope_padding=modelscope_padding)
    batch, d_len = random_inputs(batch=3, frames=(121, 70, 96))
    pseudo = torch.randn(61, 80)
    for i in (1, 2):                                           # rows 1 and 2: the same pseudo input, padded to 121
        batch["fbank"][i] = 0.0
        batch["fbank"][i, :61] = pseudo
        batch["fbank_lengths"][i] = 61
    batch["speech_present"] = torch.tensor([True, False, False])
    kept, inverse = image.Encoder._distinct_rows(batch["fbank"], batch["fbank_lengths"], batch["speech_present"])
    assert kept.tolist() == [0, 1] and inverse.tolist() == [0, 1, 1]
    other = {**batch, "fbank": batch["fbank"].clone()}
    other["fbank"][2, 5, 3] += 1.0                             # no longer the same input: nothing is shared
    assert image.Encoder._distinct_rows(other["fbank"], other["fbank_lengths"], other["speech_present"]) is None

    def loss_and_grads():
        model.zero_grad()
        logits = model(**batch)
        loss = sum(logits[j, :d_len[j]].square().sum() for j in range(3))
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared_logits, shared = loss_and_grads()
    monkeypatch.setattr(image.Encoder, "_distinct_rows", staticmethod(lambda *a: None))
    plain_logits, plain = loss_and_grads()
    assert excess(shared_logits, plain_logits, model_tol(model, plain_logits)) <= 1
    assert shared.keys() == plain.keys() and "encoder.subsample.conv2.weight" in shared
    assert max(excess(shared[n], plain[n], model_tol(model, plain[n], backward=True)) for n in plain) <= 1


class AccumulatingIndexPuts(TorchDispatchMode):
    """Counts index_put with accumulate=True: on CPU with > 1 thread (and 32768+ elements) it adds with unordered
    atomic adds, so repeated indices sum in a thread-timing-dependent order."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (torch.ops.aten.index_put, torch.ops.aten.index_put_, torch.ops.aten._index_put_impl_):
            self.count += bool(args[3] if len(args) > 3 else kwargs.get("accumulate", False))
        return func(*args, **kwargs)


def test_training_gradients_are_bit_identical_with_two_threads():
    """A training forward+backward repeated with 2 intra-op threads gives the same gradients to the bit: the rows
    sharing the pseudo-speech stream (Encoder.speech) sum their gradients with index_add_ in row order. Before, x[inverse]
    summed them with index_put_(accumulate=True): 3-6 of 10 repeats differed here (and 735 of 852 weights of the
    large model after 3 steps)."""
    model = perturbed_tiny().train()
    rows, frames = 12, 401                                     # speech stream 12 x 100 x 64: the parallel path
    g = torch.Generator().manual_seed(0)
    batch = dict(fbank=torch.randn(rows, frames, 80, generator=g), fbank_lengths=torch.full((rows,), frames),
                 decoder_input=torch.randint(4, 1000, (rows, 9), generator=g),
                 phones=torch.randint(4, 141, (rows, 20), generator=g),
                 phone_chars=torch.randint(4, 1000, (rows, 20), generator=g),
                 phone_lengths=torch.full((rows,), 20), text_present=torch.ones(rows, dtype=torch.bool))
    batch["speech_present"] = torch.arange(rows) % 2 == 0      # six text-only rows: one shared pseudo-speech input
    batch["fbank"][~batch["speech_present"]] = 0.0

    def grads():
        torch.manual_seed(0)                                   # the same dropout masks (dropout 0.1)
        model.zero_grad(set_to_none=True)
        model(**batch).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with AccumulatingIndexPuts() as census:
            first = grads()
        again = [grads() for _ in range(6)]
    finally:
        torch.set_num_threads(before)
    assert census.count == 0
    assert "encoder.subsample.conv1.weight" in first
    assert [n for other in again for n in first if not torch.equal(first[n], other[n])] == []


@pytest.mark.parametrize("width,layers", [(95, 5), (8, 2)])    # kernels 19 and 4 (even: one frame trimmed)
def test_positional_conv_native_backward_gives_autograd_gradients(width, layers, monkeypatch):
    torch.manual_seed(0)
    module = image.ConvPositions(64, layers, width, 16).double()
    x = torch.randn(3, 20, 64, dtype=torch.double, requires_grad=True)
    padding = torch.zeros(3, 20, dtype=torch.bool)
    padding[1, 15:] = True
    calls = []
    apply = image.NativeBackwardConv1d.apply
    monkeypatch.setattr(image.NativeBackwardConv1d, "apply", lambda *a: calls.append(1) or apply(*a))
    grads = []
    for native in (True, False):
        if not native:   # plain autograd through F.conv1d
            monkeypatch.setattr(image.NativeBackwardConv1d, "apply", lambda h, w, b, pad, groups: torch.nn.functional
                                .conv1d(h, w, b, padding=pad, groups=groups))
        module.zero_grad()
        x.grad = None
        module(x, padding, True).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    assert len(calls) == layers and torch.backends.mkldnn.enabled            # used, and the global flag restored
    # float64; n: a weight gradient sums batch x time x (channels per group x kernel) terms, in every layer
    n = 3 * 20 * (64 // 16) * module.convs[0].weight.shape[-1] * layers
    assert max(excess(a, b, fp32_tol(b, n, dtype=torch.float64)) for a, b in zip(*grads)) <= 1


def test_modelscope_padding_is_not_batch_invariant():
    model = perturbed_tiny(modelscope_padding=True)
    batch, d_len = random_inputs()
    with torch.no_grad():
        logits = model(**batch)
        alone = row(batch, 1)
        logits1 = model(**{**alone, "decoder_input": alone["decoder_input"][:, :d_len[1]]})
    assert excess(logits[1, :d_len[1]], logits1[0], model_tol(model, logits1[0])) >= 10


def step_all(model, cache, tokens):
    """Feed tokens (N, L) one position at a time -> (N, L, V)."""
    return torch.stack([model.decode_step(tokens[:, t], cache) for t in range(tokens.size(1))], 1)


def test_incremental_equals_full_forward():
    """fp32, batch of 3 with different speech, text and decoder lengths."""
    model = perturbed_tiny()
    batch, d_len = random_inputs()
    with torch.no_grad():
        enc = model.encode(**{k: v for k, v in batch.items() if k != "decoder_input"})
        full = model.decode(batch["decoder_input"], enc)
        cache = model.new_cache(enc, max_len=12)
        steps = step_all(model, cache, batch["decoder_input"])
    for i, n in enumerate(d_len.tolist()):
        assert excess(steps[i, :n], full[i, :n], model_tol(model, full[i, :n])) <= 1
    assert cache.length == batch["decoder_input"].size(1)


@pytest.mark.parametrize("entangle,scale", [(True, True), (False, False)])
def test_incremental_with_beam_reordering(entangle, scale):
    """Expand to beams, then reorder rows at random every step (within each source, and once dropping a source so
    the rows are no longer regular groups): every step equals the full forward of the rows' current prefixes."""
    model = perturbed_tiny(entangle_position_embedding=entangle, scale_embedding=scale)
    batch, _ = random_inputs()
    beam, g = 2, torch.Generator().manual_seed(5)
    with torch.no_grad():
        enc = model.encode(**{k: v for k, v in batch.items() if k != "decoder_input"})
        cache = model.new_cache(enc, max_len=9)
        cache.reorder(torch.arange(3).repeat_interleave(beam))
        assert cache.group == beam
        history = torch.zeros(3 * beam, 1, dtype=torch.long)               # BOS
        sources = torch.arange(3).repeat_interleave(beam)
        for t in range(8):
            logits = model.decode_step(history[:, -1], cache)
            full = model.decode(history, select_rows(enc, sources))[:, -1]
            assert excess(logits, full, model_tol(model, full)) <= 1, f"step {t}"
            if t == 4:                                                       # drop source 1; keep uneven rows
                index = torch.tensor([0, 1, 1, 4, 5])
            else:                                                            # shuffle within each source
                index = torch.cat([torch.nonzero(sources == s)[:, 0][torch.randperm(int((sources == s).sum()),
                                                                                    generator=g)]
                                   for s in sources.unique()])
            cache.reorder(index)
            history, sources = history[index], sources[index]
            new = torch.randint(4, 1000, (len(index), 1), generator=g)
            history = torch.cat([history, new], 1)
            if t == 4:
                assert cache.group is None and cache.memory_kv.size(2) == 2   # source dropped, rows gathered
        assert cache.length == 8


def test_subsample_per_row_equals_batched_on_valid_frames():
    """Rows convolved at their own length (the default's speed path) match the padded batch where frames are valid,
    are zero past them, and a row shorter than the conv's 7-frame window still gets T' frames."""
    torch.manual_seed(0)
    sub = image.Subsample(80, 32)
    fbank = torch.randn(4, 41, 80)
    lengths = torch.tensor([41, 30, 12, 5])
    with torch.no_grad():
        batched, per_row = sub(fbank), sub(fbank, lengths)
    assert per_row.shape == batched.shape == (4, 9, 32)
    valid = image.conv_output_lengths(lengths).clamp(min=0)
    assert valid.tolist() == [9, 6, 2, 0]
    # n: the sums of its three layers, conv1 (3x3), conv2 (channels x 3x3) and the projection (channels x 19)
    n_sums = sub.conv1.weight[0].numel() + sub.conv2.weight[0].numel() + sub.proj.in_features
    for i, n in enumerate(valid.tolist()):
        if n:
            assert excess(per_row[i, :n], batched[i, :n], fp32_tol(batched[i, :n], n_sums)) <= 1
        assert bool((per_row[i, max(n, 1):] == 0).all())      # a too-short row keeps its one (masked) frame


def test_without_gradients_a_batch_of_full_rows_is_convolved_row_by_row(monkeypatch):
    """Decoding a batch whose rows are all full length: one row at a time (the peak holds one row's convolution
    activations, not the batch's), the same values; with gradients (training) the whole batch in one call."""
    torch.manual_seed(0)
    sub = image.Subsample(80, 32)
    fbank, lengths = torch.randn(3, 41, 80), torch.tensor([41, 41, 41])
    calls = []
    run = sub._run
    monkeypatch.setattr(sub, "_run", lambda x: calls.append(x.size(0)) or run(x))
    with torch.no_grad():
        per_row = sub(fbank, lengths)
    assert calls == [1, 1, 1]
    calls.clear()
    batched = sub(fbank, lengths)
    assert calls == [3]
    n_sums = sub.conv1.weight[0].numel() + sub.conv2.weight[0].numel() + sub.proj.in_features
    assert excess(per_row, batched.detach(), fp32_tol(batched.detach(), n_sums)) <= 1


def test_vocab_limit_is_a_slice_of_the_full_logits():
    """The search's LM-head shortcut: logits over ids < limit are exactly the first columns of the full logits."""
    model = perturbed_tiny()
    batch, _ = random_inputs()
    with torch.no_grad():
        enc = model.encode(**{k: v for k, v in batch.items() if k != "decoder_input"})
        full_cache, cut_cache = model.new_cache(enc, max_len=4), model.new_cache(enc, max_len=4)
        for t in range(3):
            full = model.decode_step(batch["decoder_input"][:, t], full_cache)
            cut = model.decode_step(batch["decoder_input"][:, t], cut_cache, vocab_limit=321)
            assert cut.shape == (3, 321) and full.shape == (3, model.config.vocab_size)
            # only the LM head's matmul differs (another shape, maybe other blocking): one sum of d_model terms
            assert excess(cut, full[:, :321], fp32_tol(full, model.config.d_model)) <= 1


def test_cache_errors():
    model = perturbed_tiny()
    batch, _ = random_inputs()
    with torch.no_grad():
        enc = model.encode(batch["fbank"], batch["fbank_lengths"])
        cache = model.new_cache(enc, max_len=2)
        model.decode_step(torch.zeros(3, dtype=torch.long), cache)
        model.decode_step(torch.zeros(3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="full"):
            model.decode_step(torch.zeros(3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="rows"):
            model.decode_step(torch.zeros(2, dtype=torch.long), model.new_cache(enc, 4))
        with pytest.raises(ValueError, match="max_len"):       # 1026 learned positions, buckets cover 1024
            model.new_cache(enc, 1025)
        assert model.new_cache(enc, 1024).max_len == 1024


# ---------------------------------------------------------------------------------------------------------------------
# dtypes, masking, IMAGE additions

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model = perturbed_tiny()
    batch, d_len = random_inputs()
    with torch.no_grad():
        ref = model(**batch)
        half = model.to(dtype)
        batch_h = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        enc = half.encode(**{k: v for k, v in batch_h.items() if k != "decoder_input"})
        out = half.decode(batch_h["decoder_input"], enc)
        cache = half.new_cache(enc, 8)
        steps = step_all(half, cache, batch_h["decoder_input"])
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(steps).all()
    # the sums still accumulate in float32, but each layer's output is stored in `dtype`: its rounding once per
    # layer passed (the few roundings inside a layer are covered by k). Measured 0.07 of it for both dtypes.
    layers = model.config.encoder_layers + model.config.decoder_layers
    for i, n in enumerate(d_len.tolist()):
        tol = fp32_tol(ref[i, :n], layers, dtype=dtype)
        assert excess(out[i, :n].float(), ref[i, :n], tol) <= 1
        assert excess(steps[i, :n].float(), out[i, :n].float(), tol) <= 1


class BF16Copies(TorchDispatchMode):
    """Counts autocast's float32 -> bfloat16 copies (aten._to_copy) of tensors that require grad (activations and
    weights on the backward path: the matmul that reads a copy keeps it for the backward)."""

    def __init__(self):
        super().__init__()
        self.sources = []                     # the copied tensors, kept alive so that no address is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and x.dtype == torch.float32 and x.requires_grad):
            self.sources.append(x)
        return func(*args, **kwargs)

    def repeats(self) -> int:
        """Copies made of a tensor that had been copied already."""
        keys = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride()) for t in self.sources}
        return len(self.sources) - len(keys)


def bf16_run(fn):
    """fn() under CPU bf16 autocast -> (its result, BF16Copies.repeats())."""
    with torch.autocast("cpu", dtype=torch.bfloat16), BF16Copies() as copies:
        out = fn()
    return out, copies.repeats()


@pytest.mark.parametrize("packed", [False, True])
def test_encoder_layer_casts_its_attention_input_once(packed, monkeypatch):
    """Under autocast q, k and v share one bf16 copy of the normed input (autocast made three), with the same
    forward result; outside autocast nothing changes. The input is float32, as LayerNorm's output under CUDA
    autocast (on the CPU LayerNorm keeps bf16, so there a model's encoder layers get bf16 already)."""
    torch.manual_seed(0)
    layer = image.EncoderLayer(Config.tiny(dropout=0.0))
    x = torch.randn(2, 9, 64, requires_grad=True)
    padding = image.lengths_to_padding(torch.tensor([9, 4]), 9)
    pack = image.Packed(padding) if packed else None
    inputs = (pack.pack(x) if packed else x, image.padding_to_bias(padding, torch.float32), pack)
    new, repeats = bf16_run(lambda: layer(*inputs))
    fp32 = layer(*inputs)
    assert repeats == 0
    new.sum().backward()
    assert torch.isfinite(x.grad).all()
    monkeypatch.setattr(image, "autocast_input", lambda h: h)                 # as before: autocast casts per use
    old, old_repeats = bf16_run(lambda: layer(*inputs))
    assert old_repeats == 2 and torch.equal(new, old) and torch.equal(layer(*inputs), fp32)


def test_decoder_casts_each_shared_input_once(monkeypatch):
    """Teacher-forced decoding, a new cache and a step under autocast, from a float32 encoder output (as on CUDA):
    every tensor that feeds several projections or layers is copied to bf16 once. Autocast alone repeats, with
    D decoder layers: the self-attention input 2 per layer, the encoder output (keys and values of every layer)
    2D - 1, the cross-attention mask D - 1, the position features (self q and k) 1 -> 5D - 1 in the forward; in
    new_cache 2D - 1 + 1; a step 2D + D - 1 (the mask). The results are identical, and float32 outside autocast too."""
    model = perturbed_tiny(decoder_layers=3)
    layers = model.config.decoder_layers
    batch, _ = random_inputs()
    enc = model.encode(**{k: v for k, v in batch.items() if k != "decoder_input"})   # float32, requires grad
    tokens = batch["decoder_input"]

    def runs():
        logits, forward = bf16_run(lambda: model.decode(tokens, enc))
        cache, cached = bf16_run(lambda: model.new_cache(enc, 4))
        step, stepped = bf16_run(lambda: model.decode_step(tokens[:, 0], cache))
        return (logits, step, model.decode(tokens, enc)), (forward, cached, stepped)

    new, new_repeats = runs()
    monkeypatch.setattr(image, "autocast_input", lambda h: h)
    old, old_repeats = runs()
    assert new_repeats == (0, 0, 0) and old_repeats == (5 * layers - 1, 2 * layers, 3 * layers - 1)
    assert new[0].dtype == torch.bfloat16 and new[2].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(new, old))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows_give_no_nan(dtype):
    """mask_pseudo with both modalities absent in one row (every key masked), an empty text row in another."""
    model = perturbed_tiny(mask_pseudo=True).to(dtype)
    batch, _ = random_inputs()
    batch["speech_present"] = torch.tensor([True, True, False])
    batch["text_present"] = torch.tensor([True, False, False])
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        enc = model.encode(**{k: v for k, v in batch.items() if k != "decoder_input"})
        logits = model.decode(batch["decoder_input"], enc)
    assert enc.padding_mask[2].all()
    assert torch.isfinite(enc.hidden).all() and torch.isfinite(logits).all()


def test_modality_embedding():
    config = Config.tiny()
    model = IMAGE(config).eval()
    assert model.encoder.modality_embed.weight.shape == (2, config.d_model)
    assert not model.encoder.modality_embed.weight.any()                     # zero-initialised
    assert model.num_parameters() - model.num_parameters(mmspeech_only=True) == 2 * config.d_model
    assert IMAGE(Config.tiny(use_modality_embedding=False)).encoder.modality_embed is None
    model = perturbed_tiny()
    batch, _ = random_inputs()
    with torch.no_grad():
        base = model(**batch)
        none = model(**{**batch, "speech_present": None, "text_present": None})
        flipped = model(**{**batch, "speech_present": torch.tensor([True, False, True])})
    tol = model_tol(model, base)
    assert excess(base, none, tol) >= 10                                     # non-zero embedding is added
    assert excess(base[0], flipped[0], tol) <= 1 and excess(base[1], flipped[1], tol) >= 10   # only row 1 changes


def test_mask_pseudo_hides_absent_text():
    """With mask_pseudo an absent text stream cannot influence anything; without it, it is attended."""
    batch, _ = random_inputs()
    batch["text_present"] = torch.tensor([False, False, True])
    other = {**batch, "phones": batch["phones"].clone()}
    other["phones"][0, :3] = 7
    for mask_pseudo, changes in ((True, False), (False, True)):
        model = perturbed_tiny(mask_pseudo=mask_pseudo)
        with torch.no_grad():
            logits = model(**batch)[0]
            change = excess(model(**other)[0], logits, model_tol(model, logits))
        assert change >= 10 if changes else change <= 1


def test_char_embedding_is_the_decoder_embedding():
    model = perturbed_tiny()
    batch, _ = random_inputs()
    other = {**batch, "phone_chars": batch["phone_chars"].clone()}
    other["phone_chars"][0, 0] = 5
    with torch.no_grad():
        logits = model(**batch)
        tol = model_tol(model, logits)
        assert excess(model(**other)[0], logits[0], tol) >= 10
        without = model(**{**batch, "phone_chars": None})
        enc = model.encoder(batch["fbank"], batch["fbank_lengths"], batch["phones"],
                            model.decoder.embed_tokens(batch["phone_chars"]), batch["phone_lengths"],
                            batch["speech_present"], batch["text_present"])
    assert torch.equal(model.decode(batch["decoder_input"], enc), model(**batch))   # the same path: identical
    assert excess(without, logits, tol) >= 10
    names = [n for n, _ in model.named_parameters()]
    assert not any("char" in n for n in names)                               # no separate table


def test_empty_text_stream_is_plain_mmspeech():
    model = perturbed_tiny()
    batch, _ = random_inputs()
    empty = {**batch, "phones": batch["phones"][:, :0], "phone_chars": batch["phone_chars"][:, :0]}
    with torch.no_grad():
        a = model(**{**empty, "speech_present": None, "text_present": None})
        b = model(**{**batch, "phones": None, "phone_chars": None, "speech_present": None, "text_present": None})
    assert torch.equal(a, b)


def test_training_step_backpropagates():
    model = perturbed_tiny()
    model.train()
    batch, _ = random_inputs()
    logits = model(**batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["decoder_input"].flatten(), ignore_index=PAD)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.modality_embed.weight.grad.abs().sum() > 0
    assert model.encoder.subsample.conv1.weight.grad.abs().sum() > 0


def test_config_presets_and_validation():
    assert dataclasses.asdict(Config.large()) == dataclasses.asdict(Config())
    base = Config.base()
    assert (base.d_model, base.encoder_layers, base.decoder_layers, base.encoder_heads) == (768, 12, 6, 12)
    tiny = Config.tiny(vocab_size=321)
    assert tiny.vocab_size == 321 and tiny.encoder_layers > tiny.text_join_layer
    with pytest.raises(ValueError, match="encoder_heads"):
        Config.tiny(encoder_heads=5)
    with pytest.raises(ValueError, match="pos_conv_layers"):
        Config.tiny(pos_conv_layers=1)
    with pytest.raises(ValueError, match="text_join_layer"):
        Config.tiny(encoder_layers=6)
    with pytest.raises(ValueError, match="subsample_channels"):
        Config.tiny(subsample_channels=-1)
    # narrower conv subsampling (the demo's speed knob): conv channels change, the projection still gives d_model
    narrow = IMAGE(Config.tiny(subsample_channels=16)).encoder.subsample
    assert narrow.conv2.weight.shape == (16, 16, 3, 3) and narrow.proj.weight.shape == (64, 16 * 19)
    assert narrow(torch.randn(2, 30, 80), torch.tensor([30, 20])).shape == (2, 6, 64)
    assert IMAGE(Config.tiny()).encoder.subsample.conv2.weight.shape == (64, 64, 3, 3)   # 0 = d_model, as MMSpeech
    for preset, total in ((Config.base, 210_967_464), (Config.large, 608_949_696)):
        with torch.device("meta"):
            n = IMAGE(preset()).num_parameters(mmspeech_only=True)
        assert n < total                          # the rest are ModelScope's unused tables (exact: test_weights.py)
