"""
Speed benchmarks, ours against the reference, side by side in one run.

  python bench.py                                   # tiny on CPU: decode, train step, fbank
  python bench.py --preset base --json base.json    # the base preset, JSON report
  python bench.py --preset large --device cuda --dtype bf16 --train-batch 12   # GPU: MFU, peak memory, RTF
  python bench.py --skip-reference --sections fbank # our side only / one section
  python bench.py --memory                          # estimated peak memory, large, 12 x 20 s, bf16; --max-frames

Sections (--sections):
  decode  utterances/s and real-time factor of our batched KV-cached beam search against ModelScope's own
          SequenceGenerator (no cache) on the same wavs and weights, same beam/max_len/batch/threads. Only the
          search (encoder + beam search) is timed; model load and features are reported apart.
  train   one training step: ours = forward + backward + grad clip + AdamW step (as train.py: token-mean
          cross-entropy, fused AdamW); reference = ModelScope's MMSpeechModel forward + backward on the same batch
          (fbank + decoder ids). Step time, decoder tokens/s, peak memory, MFU against a measured matmul peak.
  timestamps  what entity times add to SNER/MNER decoding (recognize.Recognizer, --timestamps none vs entities).
  fbank   frames/s of audio.kaldi_fbank against kaldi-native-fbank, per utterance on CPU (ours at 1 thread and
          at --threads), and ours batched on --device.
  shards  decode.py as 1 process and under torchrun with --shards-procs processes (one thread each on a CPU; a
          GPU each with --device cuda): sentences/s of a trained checkpoint (--shards-ckpt) on a corpus split
          (default the demo test split), SNER and TNER, whole commands (process start and model load included).

Memory (--memory, no benchmark): cost.py's estimate of one training step's peak, part by part, from the config's shapes
(GB and GiB), and the train.py --max-frames that fits --card-gib with --margin-gib left. On CUDA the train section
prints the estimate for its own batch beside torch.cuda.max_memory_allocated and max_memory_reserved.

Same weights: with the reference venv (../shared/reference/setup.sh) bench.py writes a ModelScope directory with
../shared/reference/make_modelscope_dir.py (--size PRESET --seed 0, cached), converts it with weights.convert for
our side, and synthesises the wavs with make_wavs.py (same files for both); ModelScope runs in that venv as a
subprocess, reference/bench_modelscope.py. Without the venv, or with --skip-reference, our side runs alone on
seeded random weights (vocab 51134) and the test wavs.

Random weights never emit EOS (unless --eos-boost), so every hypothesis runs to --max-len on both sides; the report
gives the mean output length of each side and, for converted weights, how many best hypotheses are identical (our
model then runs with Config.modelscope_padding, ModelScope's padding, so a batch computes exactly what theirs does).

Figures are the best of --repeat passes (wall clock), with process CPU time beside it (on a shared machine the wall
clock also counts other processes). Both sides use --threads torch threads; the fbank ratio is taken at 1 thread
(kaldi-native-fbank is single-threaded). The JSON's top level holds decode_speedup_vs_reference (reference search
time / ours), train_step_time_ratio_vs_reference (our full step / their forward + backward) and
fbank_speed_ratio_vs_kaldi_native_fbank (our frames/s / theirs), null when not measured, beside the raw figures,
the load average and the busiest other processes.
"""
import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import audio
import cost
import recognize
import devices
import files
import search
from options import MIN_PIECE_SECONDS, DecodeOptions
import segment
import train
from measure import PeakMemory, Runs, Stopwatch, busy_processes, load_average, matmul_peak_flops, sync
from text import EOS, PAD
from workload import (CHARS_PER_SECOND, CONSTRAINT, asr_batch, bench_assets, build_model, long_recording,
                      modelscope_dir, our_features, prepare_wavs, run_reference, token_ids)

ROOT = Path(__file__).resolve().parent
DEFAULT_REFERENCE_DIR = ROOT.parent / "shared" / "reference"
DEFAULT_REFERENCE_PYTHON = Path.home() / ".cache" / "mmspeech-ref" / "venv" / "bin" / "python"
DEFAULT_CACHE = Path.home() / ".cache" / "image" / "bench"
SECTIONS = ("decode", "train", "fbank", "timestamps", "long", "entities", "shards")
# the paper recipe's optimizer settings (lr, weight decay, beta2); dataset and out are required fields, unused here
TRAIN_RECIPE = train.TrainConfig(**train.PAPER, dataset="cnerta", out="")
RATIO_KEYS = ("decode_speedup_vs_reference", "train_step_time_ratio_vs_reference",
              "fbank_speed_ratio_vs_kaldi_native_fbank")


# ----------------------------------------------------------------------------------------------------------
# the sections: ours timed, the reference's figures beside them (when it ran), the ratios


def bench_decode(report, args, model, feats, feat_s, ref, forced, device, dtype):
    """Encoder + beam search over all utterances in batches of --batch, in the given order (as the reference), beside
    ModelScope's figures (ref["decode"]) when it ran. The batches are padded and moved to the device before the clock
    starts, as the reference collates its own. forced: min_len = max_len (random weights may stop anywhere)."""
    print("bench: decoding (ours) ...", flush=True)
    cfg = DecodeOptions(beam=args.beam, max_len=args.max_len, min_len=args.max_len if forced else 1,
                               no_repeat_ngram_size=5, constraint_range=CONSTRAINT)
    # decoding runs in --dtype (as recognize.Recognizer casts the model); training keeps fp32 weights + autocast
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    batches = [asr_batch(feats[i: i + args.batch]) for i in range(0, len(feats), args.batch)]
    batches = [(b["fbank"].to(device, dtype), b["fbank_lengths"].to(device)) for b in batches]

    def run(options):
        hyps = []
        with torch.no_grad():
            for fbank, lengths in batches:
                hyps += search.beam_search(model, model.encode(fbank, lengths), options)
        sync(device)
        return hyps

    run(dataclasses.replace(cfg, max_len=2, min_len=min(cfg.min_len, 2)))   # warm-up, short
    runs = Runs()
    with PeakMemory(device) as mem:
        for _ in range(args.repeat):
            with runs.timed():
                hyps = run(cfg)
    tokens = [h[0].tokens + [EOS] for h in hyps]
    audio_s, best_s = report["audio_seconds"], min(runs.wall)
    d = {"ours": {**runs.report(), "memory": mem.report(), "mean_output_tokens": statistics.mean(map(len, tokens)),
                  "utterances_per_s": len(feats) / best_s, "rtf": best_s / audio_s},
         "features_s_ours": feat_s, "length_forced_with_min_len": forced}
    if "decode" in ref:
        r = ref["decode"]
        d["reference"] = {k: v for k, v in r.items() if k != "tokens"}
        d["reference"].update(utterances_per_s=len(feats) / r["best_s"], rtf=r["best_s"] / audio_s)
        d["features_s_reference"] = ref["features_s"]
        d["identical_best_hypotheses"] = sum(a == b for a, b in zip(tokens, r["tokens"]))
        report["decode_speedup_vs_reference"] = r["best_s"] / best_s
        d["speedup_in_cpu_time"] = r["cpu_best_s"] / d["ours"]["cpu_best_s"]
    report["decode"] = d


def bench_train(report, args, model, batch, ref, device, dtype):
    """train.py's step: autocast forward, token-mean cross-entropy, backward, clip 1.0, AdamW (train.py's optimizer
    and precision settings); also forward + backward alone (what the reference side runs), beside ModelScope's
    figures (ref["train"]) when it ran. MFU: the analytic FLOPs (cost.forward_flops) against a measured matmul peak."""
    print("bench: training step (ours) ...", flush=True)
    batch = {k: batch[k].to(device) for k in ("fbank", "fbank_lengths", "decoder_input", "target")}
    # train.py's padding (the default): each row's subsampling runs at its own length. The decode section's
    # modelscope_padding is for identical tokens; the same weights compute the same valid frames either way.
    model.config.modelscope_padding = False
    model.train()
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    _, autocast, scaler = devices.resolve_precision(precision, device)
    run_model = torch.compile(model) if args.compile else model
    optimizer = train.make_optimizer(model, TRAIN_RECIPE, device)
    tokens = (batch["target"] != PAD).sum()

    def forward_backward():
        with autocast:
            logits = run_model(batch["fbank"], batch["fbank_lengths"], batch["decoder_input"])     # (B, L, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["target"].flatten(),
                                   ignore_index=PAD, reduction="sum")
            del logits                                    # as train.py's Objective: not held through backward
        scaler.scale(loss / tokens).backward()

    def full_step():
        forward_backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem:
        full_step()                                       # warm-up (allocates grads and optimizer state)
        sync(device)
        step_runs = Runs()
        for _ in range(args.train_steps):
            with step_runs.timed():
                full_step()
                sync(device)
    fb_runs = Runs()
    for _ in range(args.train_steps):
        with fb_runs.timed():
            forward_backward()
            sync(device)
        optimizer.zero_grad(set_to_none=True)
    model.eval()

    step_s = min(step_runs.wall)
    n_tokens = int(tokens)
    flops = 3 * cost.forward_flops(model.config, batch["fbank_lengths"].tolist(),
                              (batch["target"] != PAD).sum(1).tolist())
    # the roof in the compute dtype; on CPU fp32 (bf16 matmuls there are emulated on most CPUs, ~1 GFLOP/s)
    peak = matmul_peak_flops(device, dtype if device.type == "cuda" else torch.float32)
    ours = {"step": step_runs.report(), "forward_backward": fb_runs.report(),
            "autocast": None if dtype == torch.float32 else str(dtype).replace("torch.", ""), "compiled": args.compile,
            "memory": mem.report(), "padding": "train.py default (per-row subsampling)", "tokens": n_tokens,
            "tokens_per_s": n_tokens / step_s, "model_flops_per_step": flops, "matmul_peak_flops_measured": peak,
            "mfu": flops / step_s / peak}
    if device.type == "cuda":       # the estimate for this batch's padded shapes, beside the measured peak
        ours["memory_estimate"] = cost.memory_estimate(
            batch=batch["fbank"].size(0), frames=batch["fbank"].size(1), target_tokens=batch["decoder_input"].size(1),
            phones=0, precision=precision, device="cuda", config=model.config)
    t = {"ours": ours, "fbank_frames": batch["fbank_lengths"].tolist(),
         "flops_note": "exact per-layer count of matmuls/convolutions at true lengths (cost.forward_flops), "
                       "x3 for forward + backward; peak = measured square matmul in the compute dtype"}
    if "train" in ref:
        r, fb_s = ref["train"], min(fb_runs.wall)
        r["tokens_per_s"] = r["tokens"] / r["forward_backward"]["best_s"]
        t["reference"] = r
        report["train_step_time_ratio_vs_reference"] = step_s / r["forward_backward"]["best_s"]
        t["forward_backward_ratio_vs_reference"] = fb_s / r["forward_backward"]["best_s"]
        t["step_ratio_in_cpu_time"] = ours["step"]["cpu_best_s"] / r["forward_backward"]["cpu_best_s"]
    report["train"] = t


def knf_options():
    """kaldi-native-fbank options equal to torchaudio.compliance.kaldi.fbank's defaults with 80 bins, dither 0."""
    import kaldi_native_fbank as knf
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    return opts


def knf_fbank(x, opts):
    """One utterance through kaldi-native-fbank, all frames collected (what a user of it does)."""
    import kaldi_native_fbank as knf
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(audio.SAMPLE_RATE, x)
    fb.input_finished()
    return [fb.get_frame(i) for i in range(fb.num_frames_ready)]


def bench_fbank(report, args, wavs, device):
    """Frames/s on the same int16-scale audio (what the MMSpeech chain feeds to the fbank), ours against
    kaldi-native-fbank (when installed)."""
    print("bench: fbank ...", flush=True)
    repeat, threads = max(args.repeat, 3), args.threads
    signals = [audio.normalize_volume(audio.load_audio(p)) * 2**15 for p in wavs]   # (N,) each
    frames = sum(int(audio.kaldi_fbank(x)[1]) for x in signals)

    def timed(fn):
        fn()                                              # warm-up (filter bank constants, allocator)
        runs = Runs()
        for _ in range(repeat):
            with runs.timed():
                fn()
        return {**runs.report(), "frames_per_s": frames / min(runs.wall)}

    out = {"utterances": len(signals), "frames": frames}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out["ours_per_utterance_1_thread"] = timed(lambda: [audio.kaldi_fbank(x) for x in signals])
        torch.set_num_threads(threads)
        out[f"ours_per_utterance_{threads}_threads"] = timed(lambda: [audio.kaldi_fbank(x) for x in signals])
        padded = torch.nn.utils.rnn.pad_sequence(signals, batch_first=True).to(device)     # (B, N) zero-padded
        lengths = torch.tensor([x.numel() for x in signals], device=device)

        def batched():
            audio.kaldi_fbank(padded, lengths)
            sync(device)
        out[f"ours_batched_{device.type}"] = timed(batched)
    finally:
        torch.set_num_threads(before)
    try:
        opts, numpy_signals = knf_options(), [x.numpy() for x in signals]
        out["kaldi_native_fbank_per_utterance"] = timed(lambda: [knf_fbank(x, opts) for x in numpy_signals])
    except ImportError:
        out["kaldi_native_fbank_per_utterance"] = None
    knf = out["kaldi_native_fbank_per_utterance"]
    if knf is not None:
        report["fbank_speed_ratio_vs_kaldi_native_fbank"] = (out["ours_per_utterance_1_thread"]["frames_per_s"]
                                                             / knf["frames_per_s"])
        out[f"ratio_at_{threads}_threads"] = (out[f"ours_per_utterance_{threads}_threads"]["frames_per_s"]
                                              / knf["frames_per_s"])
    report["fbank"] = out


def bench_timestamps(report, args, model, assets, wavs, texts, device, dtype):
    """What entity times cost (#17: <= 10 % of SNER/MNER decoding, base preset, beam 5, batch 8): recognize.Recognizer
    over the wavs (reading, features, search, results) with --timestamps none against entities (the forced
    alignment and the alignment confidence). SNER output is forced to CHARS_PER_SECOND x the mean duration (random
    weights would run to --max-len, far more text than the audio holds); MNER copies each wav's own text."""
    print("bench: timestamps (ours) ...", flush=True)
    assets = assets or bench_assets(model)
    seconds = [audio.wav_info(w).seconds for w in wavs]
    forced = max(1, round(CHARS_PER_SECOND * statistics.mean(seconds)))
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    d = {"sner_forced_chars": forced, "chars_per_second": CHARS_PER_SECOND}
    for task in ("SNER", "MNER"):
        given = task == "MNER" and all(texts)
        if task == "MNER" and not given:
            d[task] = "not measured: the wavs have no texts (a make_wavs.py index.jsonl gives them)"
            continue
        runs, warned = {}, {}
        for stamps in ("none", "entities"):
            options = DecodeOptions(beam=args.beam, max_len=forced if task == "SNER" else args.max_len,
                                           min_len=forced if task == "SNER" else 1, constraint_range=CONSTRAINT,
                                           no_repeat_ngram_size=5, timestamps=stamps)
            runs[stamps] = (Runs(), recognize.Recognizer((model, assets), options, device=device))
        for _ in range(args.repeat + 1):                    # the first pass warms up; alternated, so load is shared
            for stamps, (timer, rec) in runs.items():
                with timer.timed():
                    results = rec.recognize(texts=texts if given else None, wavs=wavs, batch_size=args.batch)
                warned[stamps] = sum(any("no times" in w for w in r.get("warnings", [])) for r in results)
        none, entities = (min(timer.wall[1:]) for timer, _ in runs.values())
        d[task] = {"none_s": none, "entities_s": entities, "added": entities / none - 1,
                   "runs_none_s": runs["none"][0].wall[1:], "runs_entities_s": runs["entities"][0].wall[1:],
                   "results_without_times": warned["entities"]}
    report["timestamps"] = d
    added = [d[t]["added"] for t in ("SNER", "MNER") if isinstance(d.get(t), dict)]
    report["timestamp_cost"] = max(added) if added else None


def bench_entities(report, args, model, assets, wavs, texts, device, dtype):
    """What a user's entity list costs (#19: <= 10 % with 10,000 entries, beam 5): recognize.Recognizer over the
    wavs with no list against --entity-list-size random names (2-4 characters of the vocabulary, a type each, plus
    every 2- and 3-character stretch of the wavs' texts, so that MNER finds occurrences everywhere). The weight is
    too small to change an output (1e-3) and SNER output is forced to CHARS_PER_SECOND x the mean duration, as in
    bench_timestamps: both runs write the same tokens, and the difference is the list's own cost."""
    print("bench: entity list (ours) ...", flush=True)
    assets = assets or bench_assets(model)
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    rng = random.Random(0)
    chars = [t for t in assets["vocab"][CONSTRAINT[0]:CONSTRAINT[1]] if len(t) == 1 and t not in "[]()<>"]
    names = {"".join(rng.choice(chars) for _ in range(rng.randint(2, 4))) for _ in range(args.entity_list_size)}
    names |= {t[i:i + n] for t in texts if t for n in (2, 3) for i in range(len(t) - n + 1)}
    listed = Path(tempfile.mkdtemp(prefix="entities_", dir=args.cache_dir)) / "list.txt"
    listed.write_text("".join(f"{n} {rng.choice(('PER', 'LOC', 'ORG'))}\n" for n in sorted(names)), encoding="utf-8")
    forced = max(1, round(CHARS_PER_SECOND * statistics.mean(audio.wav_info(w).seconds for w in wavs)))
    d = {"entries": len(names)}
    try:
        for task in ("SNER", "MNER"):
            if task == "MNER" and not all(texts):
                d[task] = "not measured: the wavs have no texts (a make_wavs.py index.jsonl gives them)"
                continue
            runs = {}
            for kind, entities in (("none", None), ("list", str(listed))):
                options = DecodeOptions(beam=args.beam, max_len=forced if task == "SNER" else args.max_len,
                                               min_len=forced if task == "SNER" else 1, constraint_range=CONSTRAINT,
                                               no_repeat_ngram_size=5, timestamps="none", entities=entities,
                                               entity_weight=1e-3)
                runs[kind] = (Runs(), recognize.Recognizer((model, assets), options, device=device))
            for _ in range(args.repeat + 1):                # the first pass warms up; alternated, so load is shared
                for timer, rec in runs.values():
                    with timer.timed():
                        rec.recognize(texts=texts if task == "MNER" else None, wavs=wavs, batch_size=args.batch)
            none, with_list = (min(timer.wall[1:]) for timer, _ in runs.values())
            d[task] = {"none_s": none, "list_s": with_list, "added": with_list / none - 1}
    finally:
        shutil.rmtree(listed.parent, ignore_errors=True)
    report["entities"] = d
    added = [d[t]["added"] for t in ("SNER", "MNER") if isinstance(d.get(t), dict)]
    report["entity_list_cost"] = max(added) if added else None


def bench_shards(report, args):
    """decode.py on 1 process and on --shards-procs under torchrun (#21), whole commands, best of --repeat: the
    same output file each time (checked), so the ratio is the sharding's own gain."""
    ckpt = os.path.abspath(args.shards_ckpt or "")       # the commands run in the repository's folder
    if not args.shards_ckpt or not os.path.isfile(ckpt):
        report["shards"] = {"not measured": f"--shards-ckpt {args.shards_ckpt!r}: no such checkpoint (a trained "
                                             "one, e.g. runs/demo/best.pt from python train.py --dataset demo)"}
        return
    print("bench: decode.py on 1 and on several processes ...", flush=True)
    gpu = args.device.startswith("cuda")
    procs = args.shards_procs or (torch.cuda.device_count() if gpu else 2)
    if procs < 2:
        report["shards"] = {"not measured": f"{procs} process(es): nothing to compare one process with"}
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if gpu else {"OMP_NUM_THREADS": "1"})}
    work = Path(tempfile.mkdtemp(prefix="shards_", dir=os.path.abspath(args.cache_dir)))
    d = {"ckpt": ckpt, "dataset": args.shards_dataset, "split": args.shards_split, "processes": procs,
         "device": args.device, "batch": args.batch, "beam": args.beam}
    try:
        for task in ("SNER", "TNER"):
            d[task], outputs = {}, {}
            for n in (1, procs):
                head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", "--nproc_per_node", str(n)]
                out = work / f"{task}_{n}.jsonl"
                where = ["--data-dir", os.path.abspath(args.shards_data_dir)] if args.shards_data_dir else []
                cmd = head + ["decode.py", "--ckpt", ckpt, "--dataset", args.shards_dataset, *where,
                              "--split", args.shards_split, "--task", task, "--out", str(out), "--batch-size",
                              str(args.batch), "--beam", str(args.beam), "--timestamps", "none",
                              "--device", "cuda" if gpu else "cpu"] + ([] if gpu else ["--threads", "1"])
                walls = []
                for _ in range(args.repeat):
                    out.unlink(missing_ok=True)
                    t0 = time.perf_counter()
                    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, env=env, capture_output=True,
                                          text=True)
                    walls.append(time.perf_counter() - t0)
                    if done.returncode != 0:
                        raise RuntimeError(f"bench shards: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                outputs[n] = out.read_bytes()
                sentences = outputs[n].count(b"\n")
                d[task][n] = {"wall_s": min(walls), "sentences": sentences, "sentences_per_s": sentences / min(walls)}
            d[task]["speedup"] = d[task][1]["wall_s"] / d[task][procs]["wall_s"]
            d[task]["same_output"] = outputs[1] == outputs[procs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["shards"] = d


def bench_long(report, args, model, assets, wavs, device, dtype):
    """Long recordings (#18): SNER over recordings of --long-minutes, cut into pieces of --long-piece seconds,
    beam --beam: decoding time per audio second (flat from the shortest to the longest is linear time), peak
    memory, and where the time goes (voice activity, reading + features, encoder, search, alignment). Random
    weights: every piece's output forced to CHARS_PER_SECOND x its length (the wavs' pauses make pieces alike)."""
    print("bench: long recordings (ours) ...", flush=True)
    assets = assets or bench_assets(model)
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    folder = Path(tempfile.mkdtemp(prefix="long_", dir=args.cache_dir))
    vad = "silero" if segment.SileroVAD is not None else "energy"      # the default detector where it installs
    rows = []
    try:
        warm = [max(args.long_minutes)] if args.long_warmup == "longest" else []
        for k, minutes in enumerate(warm + list(args.long_minutes)):    # a warm-up first: every piece shape seen
            warmup = k < len(warm)
            path = long_recording(folder / f"{minutes:g}.wav", wavs, minutes)
            options = DecodeOptions(beam=args.beam, max_piece_seconds=args.long_piece, vad=vad,
                                           constraint_range=CONSTRAINT, no_repeat_ngram_size=5,
                                           onset_lead_seconds=args.long_onset_lead)
            rec = recognize.Recognizer((model, assets), options, device=device)
            pieces = rec._pieces(recognize.Request(wav=str(path)), "SNER")
            forced = round(CHARS_PER_SECOND * statistics.mean(p.end_s - p.start_s for p in pieces))
            rec.options = dataclasses.replace(rec.options, min_len=forced, max_len=forced)
            watch = Stopwatch()
            for owner, name, label in ((rec, "_pieces", "voice activity"), (rec, "_speech", "reading + features"),
                                       (rec, "_encode", "encoder"), (recognize, "beam_search", "search"),
                                       (rec, "_add_times", "alignment")):
                watch.wrap(owner, name, label)
            seconds = audio.wav_info(path).seconds
            walls, memory = [], []
            try:
                for _ in range(1 if warmup else args.repeat):   # the best of --repeat passes; the peak of all
                    with PeakMemory(device) as mem:
                        t0 = time.perf_counter()
                        (res,) = rec.run([recognize.Request(wav=str(path))], batch_size=args.batch)
                        walls.append(time.perf_counter() - t0)
                    memory.append(mem.report())
            finally:
                recognize.beam_search = search.beam_search      # unwrap the module-level function
            if warmup:
                continue
            wall = min(walls)
            peak = max((m["peak_mb"] for m in memory if m["peak_mb"] is not None), default=None)
            rows.append({"minutes": minutes, "audio_s": round(seconds, 1), "pieces": len(res["pieces"]),
                         "forced_chars": forced, "decode_s": round(wall, 2), "rtf": wall / seconds,
                         "passes": len(walls), "peak_mb": peak,
                         "growth_mb": max((m["growth_mb"] for m in memory if m.get("growth_mb") is not None),
                                          default=None),
                         "time_shares": {k: round(v / sum(walls), 3) for k, v in watch.spent.items()}})
            print(f"bench: {minutes:g} min: {wall:.1f} s, RTF {wall / seconds:.3f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_s = [r["rtf"] for r in rows]
    report["long"] = {"piece_s": args.long_piece, "vad": vad, "rows": rows, "rtf_spread": max(per_s) / min(per_s) - 1}
    report["long_rtf_spread"] = report["long"]["rtf_spread"]
    peaks = [r["peak_mb"] for r in rows if r["peak_mb"] is not None]
    report["long_peak_memory_spread"] = max(peaks) / min(peaks) - 1 if peaks else None


# ----------------------------------------------------------------------------------------------------------
# the report: targets and the table


def targets(report, args):
    """The issue's targets, each with the value measured here and whether it was met (None: not measured here or
    not under the target's conditions)."""
    def target(value, conditions, met, key="value"):
        return {key: value, "met": None if value is None or not conditions else met(value)}

    on_cpu, on_gpu = report["device"] == "cpu", report["device"].startswith("cuda")
    gpu_run = on_gpu and args.preset == "large" and args.dtype == "bf16" and args.train_batch == 12
    train_ours = report["train"]["ours"] if "train" in report else None
    mfu = train_ours["mfu"] if on_gpu and train_ours else None
    mem_gb = train_ours["memory"]["peak_mb"] * 2**20 / 1e9 if on_gpu and train_ours else None
    return {
        "decode >= 5x ModelScope (CPU, beam 5, batch 8)": target(
            report["decode_speedup_vs_reference"], on_cpu and args.beam == 5 and args.batch == 8, lambda v: v >= 5),
        "train step <= 0.8x reference fwd+bwd (base, CPU)": target(
            report["train_step_time_ratio_vs_reference"], on_cpu and args.preset == "base", lambda v: v <= 0.8),
        "fbank >= kaldi-native-fbank per utterance (CPU, 1 thread)": target(
            report["fbank_speed_ratio_vs_kaldi_native_fbank"], True, lambda v: v >= 1),
        "long recordings: time per audio second flat within 15% (1-10 min)": target(
            report.get("long_rtf_spread"), "long" in report and max(args.long_minutes) >= 10 * min(args.long_minutes),
            lambda v: v <= 0.15),
        "long recordings: peak memory flat within 10% (1-10 min)": target(
            report.get("long_peak_memory_spread"), "long" in report and max(args.long_minutes) >= 10 * min(
                args.long_minutes) and args.long_warmup == "longest", lambda v: v <= 0.10),
        "timestamps add <= 10% to SNER/MNER decoding (base, beam 5, batch 8)": target(
            report.get("timestamp_cost"), args.preset == "base" and args.beam == 5 and args.batch == 8,
            lambda v: v <= 0.10),
        "an entity list of 10,000 adds <= 10% to SNER/MNER decoding (beam 5)": target(
            report.get("entity_list_cost"), args.beam == 5 and args.entity_list_size >= 10000, lambda v: v <= 0.10),
        "GPU MFU >= 35% (large, batch 12, bf16)": target(mfu, gpu_run, lambda v: v >= 0.35),
        "GPU peak memory <= 20 GB (large, batch 12, bf16)": target(mem_gb, gpu_run, lambda v: v <= 20, "value_gb"),
    }


def _fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}{unit}" if abs(x) < 1000 else f"{x:,.0f}{unit}"
    return f"{x}{unit}"


def format_table(r, args):
    lines = [f"bench: preset {r['preset']}, {r['device']} {r['dtype']}, threads {r['threads']}, batch {r['batch']}, "
             f"beam {r['beam']}, max_len {r['max_len']}, {r['n_wavs']} wavs ({r['wavs']}"
             + (f", {r['audio_seconds']:.1f} s audio" if "audio_seconds" in r else "") + ")",
             f"weights: {r.get('weights', '-')}; load average {r['load_average_start']} -> {r['load_average_end']}",
             f"{'section':8s} {'metric':34s} {'ours':>12s} {'reference':>12s} {'ratio':>8s}"]

    def row(section, metric, ours, ref=None, ratio_=None):
        lines.append(f"{section:8s} {metric:34s} {_fmt(ours):>12s} {_fmt(ref):>12s} "
                     f"{_fmt(ratio_, 'x') if ratio_ is not None else '':>8s}")

    if "decode" in r:
        d, o = r["decode"], r["decode"]["ours"]
        ref = d.get("reference", {})
        row("decode", "search s (best of repeats)", o["best_s"], ref.get("best_s"))
        row("decode", "search CPU s (process time)", o["cpu_best_s"], ref.get("cpu_best_s"),
            d.get("speedup_in_cpu_time"))
        row("decode", "utterances/s", o["utterances_per_s"], ref.get("utterances_per_s"),
            r["decode_speedup_vs_reference"])
        row("decode", "real-time factor", o["rtf"], ref.get("rtf"))
        row("decode", "mean output tokens (incl. EOS)", o["mean_output_tokens"], ref.get("mean_output_tokens"))
        row("decode", "features s (not in search)", d["features_s_ours"], d.get("features_s_reference"))
        if "identical_best_hypotheses" in d:
            row("decode", "identical best hypotheses", f"{d['identical_best_hypotheses']}/{r['n_wavs']}")
    if "train" in r:
        t, o = r["train"], r["train"]["ours"]
        ref = t.get("reference", {})
        ref_fb = ref.get("forward_backward", {}).get("best_s")
        row("train", "step s (ours fwd+bwd+AdamW)", o["step"]["best_s"], ref_fb,
            r["train_step_time_ratio_vs_reference"])
        row("train", "fwd+bwd s", o["forward_backward"]["best_s"], ref_fb, t.get("forward_backward_ratio_vs_reference"))
        row("train", "step CPU s (process time)", o["step"]["cpu_best_s"],
            ref.get("forward_backward", {}).get("cpu_best_s"), t.get("step_ratio_in_cpu_time"))
        row("train", "decoder tokens/s", o["tokens_per_s"], ref.get("tokens_per_s"))
        row("train", f"MFU vs matmul peak ({o['matmul_peak_flops_measured'] / 1e9:.0f} GFLOP/s)", o["mfu"])
        mem = o["memory"]
        row("train", f"peak memory MB ({'RSS' if 'RSS' in mem['kind'] else 'CUDA'})", mem["peak_mb"],
            ref.get("memory", {}).get("peak_mb"))
        row("train", "memory growth in steps MB", mem.get("growth_mb"),
            None if not ref else ref["memory"]["peak_mb"] - (ref["memory"]["start_mb"] or 0))
        if "memory_estimate" in o:
            est = o["memory_estimate"]
            row("train", "peak reserved MB (CUDA)", mem["reserved_peak_mb"])
            row("train", "estimate MB (x = / allocated peak)", est["total_allocated"] / 2**20, None,
                est["total_allocated"] / 2**20 / mem["peak_mb"])
    if "fbank" in r:
        f = r["fbank"]
        knf = (f["kaldi_native_fbank_per_utterance"] or {}).get("frames_per_s")
        row("fbank", "frames/s per utt, 1 thread", f["ours_per_utterance_1_thread"]["frames_per_s"], knf,
            r["fbank_speed_ratio_vs_kaldi_native_fbank"])
        key = f"ours_per_utterance_{args.threads}_threads"
        if args.threads != 1:
            row("fbank", f"frames/s per utt, {args.threads} threads", f[key]["frames_per_s"], knf,
                f.get(f"ratio_at_{args.threads}_threads"))
        row("fbank", f"frames/s batched on {r['device']}", f[f"ours_batched_{torch.device(r['device']).type}"]
            ["frames_per_s"])
    for row_ in r.get("long", {}).get("rows", []):
        row("long", f"{row_['minutes']:g} min: RTF ({row_['pieces']} pieces)", row_["rtf"])
        row("long", f"{row_['minutes']:g} min: peak memory MB", row_["peak_mb"])
        row("long", f"{row_['minutes']:g} min: memory growth in the run MB", row_.get("growth_mb"))
    for task in ("SNER", "MNER"):
        t = r.get("timestamps", {}).get(task)
        if isinstance(t, dict):
            row("stamps", f"{task} decode s, no times", t["none_s"])
            row("stamps", f"{task} decode s, entity times", t["entities_s"], None, t["entities_s"] / t["none_s"])
    for task in ("SNER", "MNER"):
        t = r.get("entities", {}).get(task)
        if isinstance(t, dict):
            row("list", f"{task} decode s, no list", t["none_s"])
            row("list", f"{task} decode s, {r['entities']['entries']} entries", t["list_s"], None,
                t["list_s"] / t["none_s"])
    for task in ("SNER", "TNER"):
        t = r.get("shards", {}).get(task)
        if isinstance(t, dict):
            n = r["shards"]["processes"]
            row("shards", f"{task} sentences/s, 1 process", t[1]["sentences_per_s"])
            row("shards", f"{task} sentences/s, {n} processes (x = speed-up)", t[n]["sentences_per_s"], None,
                t["speedup"])
    for name, t in r["targets"].items():
        value = t.get("value", t.get("value_gb"))
        lines.append(f"target   {name:58s} {_fmt(value):>10s}  "
                     f"{ {True: 'met', False: 'MISSED', None: 'not measured here'}[t['met']]}")
    return "\n".join(lines)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--preset", choices=("tiny", "base", "large"), default=None,
      help="model size (MMSpeech dimensions, vocab 51134); default tiny on CPU, large on CUDA")
    a("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu; the reference always runs on CPU)")
    a("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
      help="decode: model dtype; train: autocast dtype over fp32 weights (default fp32 on CPU, bf16 on CUDA)")
    a("--batch", type=int, default=8, help="utterances per decoding batch, both sides (default 8)")
    a("--train-batch", type=int, default=None, help="utterances in the training batch (default 8; 12 on CUDA)")
    a("--beam", type=int, default=5, help="beam size, both sides (default 5)")
    a("--max-len", type=int, default=32,
      help="max output tokens (max_len_b), both sides; random weights run to it (default 32)")
    a("--n-wavs", type=int, default=None, help="number of utterances to decode (default: --batch, at least 8)")
    a("--threads", type=int, default=None, help="torch threads for both sides (default: torch's default here)")
    a("--repeat", type=int, default=None, help="timed passes over the wavs (best is reported; default 3 for tiny, "
                                               "1 otherwise); fbank uses max(repeat, 3); long: passes per recording")
    a("--train-steps", type=int, default=3, help="timed training steps after one warm-up step (default 3)")
    a("--sections", default="decode,train,fbank", help=f"comma-separated subset of {','.join(SECTIONS)} (default "
      "decode,train,fbank)")
    a("--long-minutes", default="1,2,5", help="long section: recording lengths in minutes (default 1,2,5)")
    a("--long-piece", type=float, default=15.0, help="long section: --max-piece-seconds (default 15)")
    a("--entity-list-size", type=int, default=10000, help="entities section: random names in the list (default "
      "10000; the texts' 2- and 3-character stretches come on top)")
    a("--shards-ckpt", default="runs/demo/best.pt", help="shards section: the checkpoint decoded (default "
      "runs/demo/best.pt, the README's demo run)")
    a("--shards-procs", type=int, default=0, help="shards section: processes against 1 (default 2 on a CPU, every "
      "GPU with --device cuda)")
    a("--shards-dataset", default="demo", help="shards section: corpus (default demo)")
    a("--shards-data-dir", default=None, help="shards section: the corpus folder (default: the demo's own)")
    a("--shards-split", default="test", help="shards section: split (default test)")
    a("--long-onset-lead", type=files.number_or_none, default=None, metavar="SECONDS|none", help="long section: "
      "decode.py --onset-lead-seconds, 0 to 0.5 (default none; 0: the extra CTC pass that SNER pieces of a demo "
      "model trained without noise margins take)")
    a("--long-warmup", choices=("longest", "none"), default="longest", help="long section: decode the longest "
      "recording once, untimed, before the measured ones (default: time and memory in the steady state of a "
      "process that has seen every piece shape), or none (a fresh process's first recording: run one length "
      "per process to see what a single long file costs, allocator growth included)")
    a("--reference-python", default=None,
      help=f"python of the ModelScope reference venv (default {DEFAULT_REFERENCE_PYTHON} if it exists)")
    a("--reference-dir", default=str(DEFAULT_REFERENCE_DIR),
      help="folder of the reference tools (make_modelscope_dir.py, make_wavs.py, _refenv.py)")
    a("--skip-reference", action="store_true", help="run our side only (random weights, the test wavs)")
    a("--eos-boost", type=float, default=0.0,
      help="make_modelscope_dir.py --eos-boost: hypotheses end early instead of at --max-len (default 0)")
    a("--wav-dir", default=None, help="use these wavs (a make_wavs.py folder or *.wav) instead of generated ones")
    a("--cache-dir", default=str(DEFAULT_CACHE), help=f"where ModelScope directories and wavs are kept "
                                                      f"(default {DEFAULT_CACHE})")
    a("--compile", action="store_true", help="torch.compile our model for the training step")
    a("--json", default=None, help="write the full report (raw figures + the three ratios) to this JSON file")
    a("--memory", action="store_true", help="print cost.py's peak-memory estimate of a training step for "
      "--preset/--train-batch/--seconds/--dtype (default large, 12, 20 s, bf16) and the --max-frames that fits "
      "--card-gib; no benchmark runs")
    a("--seconds", type=float, default=20.0, help="--memory: utterance length, every row (default 20)")
    a("--max-frames", type=int, default=None, help="--memory: estimate a micro-batch of this many padded fbank "
      "frames (rows x longest row's frames, train.py --max-frames) of --seconds rows instead of --train-batch rows")
    a("--phones", type=int, default=None, help="--memory: text-stream positions per row (default: an MNER row's "
      "phones at 4 characters/s; 0 = speech only)")
    a("--card-gib", type=float, default=24.0, help="--memory: GiB of the GPU the --max-frames suggested (default 24)")
    a("--margin-gib", type=float, default=3.0, help="--memory: GiB of --card-gib left for fragmentation (default 3)")
    args = p.parse_args(argv)

    try:  # a bad name or an absent GPU: said now
        device = devices.parse_device(args.device)
    except files.InputError as e:
        p.error(str(e))
    on_gpu = device.type == "cuda"
    gpu_defaults = on_gpu or args.memory                  # --memory estimates a GPU training step
    args.preset = args.preset or ("large" if gpu_defaults else "tiny")
    args.dtype = args.dtype or ("bf16" if gpu_defaults else "fp32")
    args.train_batch = args.train_batch or (12 if gpu_defaults else 8)
    if args.seconds <= 0 or (args.max_frames is not None and args.max_frames < 7) or (args.phones or 0) < 0:
        p.error("--seconds must be > 0, --max-frames >= 7 (one row of two 3x3 stride-2 convolutions), --phones >= 0")
    if not 0 <= args.margin_gib < args.card_gib:
        p.error(f"--margin-gib {args.margin_gib} must be in [0, --card-gib {args.card_gib})")
    args.n_wavs = args.n_wavs or max(args.batch, 8)
    args.threads = args.threads or torch.get_num_threads()
    args.repeat = args.repeat or (3 if args.preset == "tiny" else 1)
    for name in ("batch", "train_batch", "beam", "max_len", "n_wavs", "threads", "repeat", "train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_len > 1000:
        p.error("--max-len must be <= 1000 (decoder positions)")
    if args.long_onset_lead is not None and not 0 <= args.long_onset_lead <= 0.5:
        p.error(f"--long-onset-lead must be in [0, 0.5] or none, got {args.long_onset_lead}")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        args.long_minutes = [float(m) for m in args.long_minutes.split(",")]
        assert all(0 < m <= 120 for m in args.long_minutes) and args.long_piece >= MIN_PIECE_SECONDS
    except (ValueError, AssertionError):
        p.error(f"--long-minutes {args.long_minutes!r} (minutes in (0, 120]) or --long-piece {args.long_piece} "
                f"(at least {MIN_PIECE_SECONDS:g})")
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        p.error(f"--sections: unknown {bad or args.sections}; choose from {','.join(SECTIONS)}")
    if args.wav_dir and not Path(args.wav_dir).is_dir():
        p.error(f"--wav-dir: no such folder: {args.wav_dir}")
    if not args.skip_reference and not args.memory:
        if args.reference_python is None:
            args.reference_python = DEFAULT_REFERENCE_PYTHON if DEFAULT_REFERENCE_PYTHON.exists() else None
            if args.reference_python is None:
                print(f"bench: no reference venv at {DEFAULT_REFERENCE_PYTHON}: our side only "
                      "(build it with ../shared/reference/setup.sh)", file=sys.stderr)
        elif not Path(args.reference_python).exists():
            p.error(f"--reference-python: not found: {args.reference_python}")
        if args.reference_python is not None and on_gpu:
            print("bench: the ModelScope comparison runs on CPU only (same CPU for both sides): our side only on "
                  f"{args.device}", file=sys.stderr)
            args.reference_python = None
        if args.reference_python is not None and not (Path(args.reference_dir) / "_refenv.py").is_file():
            p.error(f"--reference-dir: {args.reference_dir} has no _refenv.py (the MMSpeech reference tools)")
        args.skip_reference = args.reference_python is None
    return args


# ----------------------------------------------------------------------------------------------------------
# the run


def print_memory(args):
    """--memory: the estimate's table (GB and GiB) and the --max-frames suggested for --card-gib."""
    frames_per_row = audio.num_fbank_frames(round(args.seconds * audio.SAMPLE_RATE))
    rows = args.train_batch if args.max_frames is None else args.max_frames / frames_per_row
    estimate = cost.memory_estimate(args.preset, rows, args.seconds, args.dtype, phones=args.phones)
    what = f"{rows:g} rows" if args.max_frames is None else f"--max-frames {args.max_frames} ({rows:.2f} rows)"
    print(cost.format_memory(estimate, f"bench: peak memory estimate of one training step, {args.preset}, {what} of "
                                       f"{args.seconds:g} s, {args.dtype} (GB = 1e9 bytes, GiB = 2**30 bytes)"))
    frames, fit_rows = cost.suggest_max_frames(args.preset, args.dtype, args.seconds, args.card_gib, args.margin_gib,
                                               phones=args.phones)
    print(f"suggested --max-frames for a {args.card_gib:g} GiB card with {args.margin_gib:g} GiB margin: {frames} "
          f"({fit_rows:.1f} rows of {args.seconds:g} s)")
    return {"estimate": estimate, "suggested_max_frames": frames, "card_gib": args.card_gib,
            "margin_gib": args.margin_gib}


def main(argv=None):
    args = get_args(argv)
    if args.memory:
        return print_memory(args)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.set_num_threads(args.threads)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    ref_python = None if args.skip_reference else args.reference_python
    sections = args.sections
    report = {"preset": args.preset, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "batch": args.batch, "train_batch": args.train_batch, "beam": args.beam, "max_len": args.max_len,
              "n_wavs": args.n_wavs, "repeat": args.repeat, "train_steps": args.train_steps,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "python": platform.python_version(),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "load_average_start": load_average(), "busy_processes_start": busy_processes(),
              "reference_python": str(ref_python) if ref_python else None, **dict.fromkeys(RATIO_KEYS)}

    wav_rows, report["wavs"] = prepare_wavs(args, ref_python)
    wavs, texts = [p for p, _ in wav_rows], [t for _, t in wav_rows]
    if {"decode", "train", "timestamps", "long", "entities"} & set(sections):
        ms_dir = modelscope_dir(args, ref_python) if ref_python else None
        model, assets, report["weights"], report["model_build_s"] = build_model(args, ms_dir, device)
        report["parameters"] = model.num_parameters()
        cmvn = (assets or {}).get("fbank", {}).get("cmvn", "utterance")
        feats, feat_s, report["audio_seconds"] = our_features(wavs, cmvn)
        train_rows = [i % len(wavs) for i in range(args.train_batch)]
        train_ids = token_ids([texts[i] for i in train_rows], assets)
        ref = {}
        if ref_python:
            ref = run_reference(args, ref_python, ms_dir, wavs, train_rows, train_ids,
                                [s for s in sections if s in ("decode", "train")])
            report["reference"] = {k: ref.get(k) for k in ("threads", "torch", "load_s", "features_s", "wall_s")}
        if "decode" in sections:
            bench_decode(report, args, model, feats, feat_s, ref, ms_dir is None, device, dtype)
        if "train" in sections:
            bench_train(report, args, model, asr_batch([feats[i] for i in train_rows], train_ids), ref, device, dtype)
        if "timestamps" in sections:
            bench_timestamps(report, args, model, assets, wavs, texts, device, dtype)
        if "long" in sections:
            bench_long(report, args, model, assets, wavs, device, dtype)
        if "entities" in sections:
            bench_entities(report, args, model, assets, wavs, texts, device, dtype)
    if "fbank" in sections:
        bench_fbank(report, args, wavs, device)
    if "shards" in sections:
        bench_shards(report, args)

    report["load_average_end"] = load_average()
    report["targets"] = targets(report, args)
    print(format_table(report, args))
    if args.json:
        files.write_atomic(args.json, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"bench: wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
