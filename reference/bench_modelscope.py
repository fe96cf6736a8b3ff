#!/usr/bin/env python3
"""bench.py's reference side: ModelScope's own MMSpeech (OfaForAllTasks, OfaASRPreprocessor, collate_fn,
SequenceGenerator) timed on the wavs, weights and settings bench.py uses for our side.

    reference/bench_modelscope.py SPEC.json

bench.py writes SPEC.json and runs this script with the reference venv's python (../shared/reference/setup.sh; run
with another python it re-execs itself there). The reference tools (_refenv.py) are found through
$MMSPEECH_REFERENCE_DIR, else ../../shared/reference beside this repository. SPEC keys:
  model_dir, wavs                        the ModelScope directory and the wav paths (decoded in this order)
  threads, batch, beam, max_len, repeat  as bench.py's flags of the same names
  sections                               a subset of ["decode", "train"]
  train_rows, train_ids, train_steps     the training batch: wav indices, decoder ids per row (no BOS/EOS), steps
  out                                    where the results JSON goes (read back by bench.run_reference)
"""
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.environ.get("MMSPEECH_REFERENCE_DIR") or os.path.normpath(
    os.path.join(HERE, "..", "..", "shared", "reference"))
sys.dont_write_bytecode = True
sys.path.insert(0, REFERENCE)
import _refenv  # noqa: E402

_refenv.ensure_venv()
ofa = _refenv.import_ofa()          # first: registers ModelScope's OFA package without its image preprocessors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from modelscope.models.multi_modal.ofa.generate import sequence_generator as sg  # noqa: E402
from modelscope.utils.config import Config  # noqa: E402
from modelscope.utils.constant import ModeKeys  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# measuring (the same figures as bench.Runs and bench.PeakMemory on CPU)


def status_mb(field):
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) / 1024


def reset_peak():
    """Reset the peak resident set to the current one; -> the current one in MB (None where Linux does not allow)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_mb("VmRSS")
    except OSError:
        return None


def memory(start_mb):
    return {"peak_mb": status_mb("VmHWM"), "start_mb": start_mb, "kind": "process peak RSS"}


def stats(walls, cpus):
    return {"best_s": min(walls), "median_s": statistics.median(walls), "runs_s": [round(t, 4) for t in walls],
            "cpu_best_s": min(cpus)}


# ----------------------------------------------------------------------------------------------------------
# ModelScope's inputs and search


def preprocess(model_dir, wavs):
    """OfaASRPreprocessor on each wav (fbank features and the rest of ModelScope's sample dict)."""
    cfg = Config.from_file(os.path.join(model_dir, "configuration.json"))
    prep = ofa.OfaASRPreprocessor(cfg=cfg, model_dir=model_dir, mode=ModeKeys.INFERENCE)
    samples = []
    for wav in wavs:
        sample = prep({"wav": wav})
        sample["sample"] = {"wav": wav}
        samples.append(sample)
    return samples


def generator(task_model, model, beam, max_len):
    """OfaForAllTasks' generator with beam and max_len overridden (as reference_decode.py does)."""
    kw = {"tokenizer": task_model.tokenizer, "beam_size": 5, "max_len_b": 16, "min_len": 1,
          "no_repeat_ngram_size": 3, "constraint_range": None}
    if hasattr(task_model.cfg.model, "beam_search"):
        kw.update(task_model.cfg.model.beam_search)
    kw.update(beam_size=beam, max_len_b=max_len)
    gen = sg.SequenceGenerator(**kw)
    if gen.vocab_size != model.config.vocab_size:     # reduced-vocab directories only (see reference_decode.py)
        gen.vocab_size = gen.search.vocab_size = model.config.vocab_size
    return gen


def teacher_ids(ids, bos, eos, pad):
    """ModelScope's collate_fn builds no training targets for ASR inference samples, so the decoder input
    (BOS + ids) and the target (ids + EOS) are padded here, (B, L) each, as bench.py's batch for our side."""
    longest = max(len(r) for r in ids) + 1
    dec = torch.full((len(ids), longest), pad, dtype=torch.long)
    tgt = torch.full((len(ids), longest), pad, dtype=torch.long)
    for i, r in enumerate(ids):
        dec[i, : len(r) + 1] = torch.tensor([bos] + r)
        tgt[i, : len(r) + 1] = torch.tensor(r + [eos])
    return dec, tgt


# ----------------------------------------------------------------------------------------------------------
# the sections


def bench_decode(spec, task_model, model, batches):
    """Every batch through SequenceGenerator, spec["repeat"] times; -> timings, best tokens, memory."""
    gen = generator(task_model, model, spec["beam"], spec["max_len"])
    with torch.no_grad():
        generator(task_model, model, spec["beam"], 2).generate([model], batches[0])     # warm-up, short
        walls, cpus = [], []
        start_mb = reset_peak()
        for _ in range(spec["repeat"]):
            tokens = []
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                hyps = gen.generate([model], b, prefix_tokens=b.get("prefix_tokens"))
                tokens += [h[0]["tokens"].tolist() for h in hyps]
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return {**stats(walls, cpus), "tokens": tokens, "mean_output_tokens": statistics.mean(len(t) for t in tokens),
            "memory": memory(start_mb)}


def bench_train(spec, model, batch, tokenizer):
    """MMSpeechModel forward + backward (token-mean cross-entropy), one warm-up then spec["train_steps"] timed."""
    pad = tokenizer.pad_token_id
    dec, tgt = teacher_ids(spec["train_ids"], tokenizer.bos_token_id, tokenizer.eos_token_id, pad)
    n_tokens = int((tgt != pad).sum())
    model.train()

    def forward_backward():
        logits = model(**batch["net_input"], decoder_input_ids=dec).logits           # (B, L, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=pad, reduction="sum")
        (loss / n_tokens).backward()
        model.zero_grad(set_to_none=True)

    start_mb = reset_peak()
    forward_backward()                                                   # warm-up
    walls, cpus = [], []
    for _ in range(spec["train_steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        forward_backward()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"forward_backward": stats(walls, cpus), "tokens": n_tokens,
            "fbank_lengths": batch["net_input"]["fbank_length"].tolist(), "memory": memory(start_mb)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} SPEC.json   (written by bench.py)")
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    t0 = time.perf_counter()
    task_model = ofa.OfaForAllTasks(spec["model_dir"])
    model = task_model.model.eval()
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = preprocess(spec["model_dir"], spec["wavs"])
    out["features_s"] = time.perf_counter() - t0
    tokenizer = task_model.tokenizer

    def collate(rows):
        return ofa.collate_fn([samples[i] for i in rows], pad_idx=tokenizer.pad_token_id,
                              eos_idx=tokenizer.eos_token_id)

    if "decode" in spec["sections"]:
        bs = spec["batch"]
        batches = [collate(range(i, min(i + bs, len(samples)))) for i in range(0, len(samples), bs)]
        out["decode"] = bench_decode(spec, task_model, model, batches)
    if "train" in spec["sections"]:
        out["train"] = bench_train(spec, model, collate(spec["train_rows"]), tokenizer)
    with open(spec["out"], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
