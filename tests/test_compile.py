"""torch.compile of the training forward (train.py --compile): one graph, no graph breaks, no recompiles for new
bucketed lengths, and the eager loss. CPU, backend "eager" (Dynamo's tracing only, no code generation): what makes a
graph break or a recompile is decided there, the same on CUDA."""
import os
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import image  # noqa: E402
import train  # noqa: E402
from image import BOS, PAD  # noqa: E402
from numerics import excess, fp32_tol, model_terms  # noqa: E402

COMPILE_OPTIONS = train.COMPILE_OPTIONS   # what train.py passes: every length symbolic from the first batch
GRAPH_BREAKS = 0                       # per traced forward: the per-row, shared-row and packed paths are eager-only
# (B, fbank frames T, phones P, decoder tokens L): warm-up first, then buckets that change every size
SHAPES = [(3, 48, 6, 5), (4, 64, 9, 7), (2, 80, 5, 9), (5, 40, 11, 4)]


def bucketed_batch(b, t, p, n_tokens, seed):
    """A training batch as data.collate makes it: rows of different lengths (row 0 fills the bucket), rows 1 and 2
    without speech (the same pseudo fbank: the eager path computes it once), decoder targets shifted by one."""
    g = torch.Generator().manual_seed(seed)
    fbank_lengths = torch.tensor([t] + [max(7, t - 11 * i) for i in range(1, b)])
    fbank = torch.randn(b, t, 80, generator=g)
    speech = torch.ones(b, dtype=torch.bool)
    speech[1:3], fbank_lengths[1:3] = False, 23
    fbank[1:3, :23] = torch.randn(23, 80, generator=torch.Generator().manual_seed(0))   # the pseudo speech
    fbank = fbank.masked_fill(image.lengths_to_padding(fbank_lengths, t)[..., None], 0.0)
    phone_lengths = torch.tensor([p] + [max(1, p - 2 * i) for i in range(1, b)])
    phone_pad = image.lengths_to_padding(phone_lengths, p)
    phones = torch.randint(4, 141, (b, p), generator=g).masked_fill(phone_pad, PAD)
    chars = torch.randint(4, 1000, (b, p), generator=g).masked_fill(phone_pad, PAD)
    tokens = torch.randint(4, 1000, (b, n_tokens + 1), generator=g)
    tokens[:, 0] = BOS
    token_lengths = torch.tensor([n_tokens] + [max(2, n_tokens - i) for i in range(1, b)])
    token_pad = image.lengths_to_padding(token_lengths, n_tokens)
    return dict(fbank=fbank, fbank_lengths=fbank_lengths, speech_present=speech, phones=phones, phone_chars=chars,
                phone_lengths=phone_lengths, text_present=torch.ones(b, dtype=torch.bool),
                decoder_input=tokens[:, :-1].masked_fill(token_pad, PAD),
                target=tokens[:, 1:].masked_fill(token_pad, PAD))


def loss_tol(model, loss, batch):
    """The loss sums one cross-entropy per target token; each moves with its logits (a model output: n =
    model_terms), and the tokens' roundings add like a random walk: n = model_terms x tokens."""
    tokens = int((batch["target"] != PAD).sum())
    return fp32_tol(loss / tokens, model_terms(model.config) * tokens) * tokens ** 0.5


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def perturbed_tiny(**overrides):
    """A tiny model in training mode without dropout (deterministic) whose every parameter is non-trivial (a fresh
    model's near-zero logits would hide differences)."""
    torch.manual_seed(0)
    model = image.IMAGE(image.Config.tiny(dropout=0.0, **overrides)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_bucketed_lengths_compile_once_without_graph_breaks_to_the_eager_loss(fresh_dynamo):
    model = perturbed_tiny()
    objective = train.Objective(model)
    graphs = CompileCounter()
    compiled = torch.compile(objective, backend=graphs, **COMPILE_OPTIONS)
    for i, shape in enumerate(SHAPES):
        batch = bucketed_batch(*shape, seed=i)
        loss = compiled(batch)
        assert graphs.frame_count == 1 + GRAPH_BREAKS, f"batch {i} {shape}: graph breaks or a recompile"
        eager = objective(batch)                                      # packed layers, per-row subsampling, shared row
        assert excess(loss.detach(), eager.detach(), loss_tol(model, eager.detach(), batch)) <= 1
    assert sum(counters["graph_break"].values()) <= GRAPH_BREAKS


def test_loss_tolerance_catches_a_padding_leak():
    """ModelScope's padding lets 1-2 frames computed from padding into the encoder: a bug the compiled path could
    make (its subsampling runs over the padded batch). It moves the loss by >= 10x the tolerance."""
    model, leaky = perturbed_tiny(), perturbed_tiny(modelscope_padding=True)
    batch = bucketed_batch(*SHAPES[1], seed=1)
    with torch.no_grad():
        loss, leaked = train.Objective(model)(batch), train.Objective(leaky)(batch)
    assert excess(leaked, loss, loss_tol(model, loss, batch)) >= 10


def test_ctc_log_probs_trace_in_one_graph(fresh_dynamo):
    """The CTC head (train.py --ctc-weight) reads the padded frame count as an int, not through a tensor (.item())."""
    model = perturbed_tiny()

    def log_probs(batch):
        enc = model.encode(*(batch[k] for k in ("fbank", "fbank_lengths", "phones", "phone_chars", "phone_lengths",
                                                 "speech_present", "text_present")))
        return model.speech_phone_log_probs(enc, batch["fbank"].size(1))

    batch = bucketed_batch(*SHAPES[0], seed=0)
    graphs = CompileCounter()
    compiled = torch.compile(log_probs, backend=graphs, **COMPILE_OPTIONS)
    (logp, frames), (eager_logp, eager_frames) = compiled(batch), log_probs(batch)
    assert graphs.frame_count == 1 and not counters["graph_break"]
    assert torch.equal(frames, eager_frames)
    valid = ~image.lengths_to_padding(frames, logp.size(1))              # (B, T'): CTC reads these frames only
    got, want = logp.detach()[valid], eager_logp.detach()[valid]
    assert excess(got, want, fp32_tol(want, model_terms(model.config))) <= 1


def with_ctc_targets(batch, seed):
    """CTC phone targets (classes >= 1) for the rows with real speech, none (length 0) for the pseudo-speech rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.where(batch["speech_present"], 3, 0)                     # (B,)
    return {**batch, "ctc_lengths": lengths, "ctc_phones": torch.randint(1, 100, (len(lengths), 3), generator=g)}


CTC_GRAPHS = 3   # the CTC loss's output shape depends on the data (aten._ctc_loss): a break, by design


def test_ctc_objective_compiles_to_a_bounded_number_of_graphs_and_the_subset_loss(fresh_dynamo):
    """--ctc-weight: the loss over every row with the rows without targets zeroed equals the CTC loss of those rows
    alone (the earlier formulation, boolean-indexed), and compiles to CTC_GRAPHS graphs over every bucket."""
    model = perturbed_tiny()
    objective = train.Objective(model, ctc_weight=0.5)
    graphs = CompileCounter()
    compiled = torch.compile(objective, backend=graphs, **COMPILE_OPTIONS)
    for i, shape in enumerate(SHAPES):
        batch = with_ctc_targets(bucketed_batch(*shape, seed=i), seed=i)
        loss = compiled(batch).detach()
        with torch.no_grad():
            ce = train.Objective(model)(batch)
            enc = model.encode(*(batch[k] for k in ("fbank", "fbank_lengths", "phones", "phone_chars",
                                                     "phone_lengths", "speech_present", "text_present")))
            logp, frames = model.speech_phone_log_probs(enc, batch["fbank"].size(1))
            rows = batch["ctc_lengths"] > 0
            subset = torch.nn.functional.ctc_loss(logp[rows].transpose(0, 1), batch["ctc_phones"][rows], frames[rows],
                                                  batch["ctc_lengths"][rows], blank=0, reduction="sum",
                                                  zero_infinity=True)
        assert subset > 0 and excess(loss, ce + 0.5 * subset, loss_tol(model, ce + 0.5 * subset, batch)) <= 1, i
    assert graphs.frame_count <= CTC_GRAPHS
