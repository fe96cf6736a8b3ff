"""
Train IMAGE: one model for text (TNER), speech (SNER) and text+speech (MNER) Chinese NER.

  python train.py --dataset demo                       # first run: demo corpus, tiny model from scratch, CPU
  python train.py --dataset cnerta --data-dir DIR --audio-dir AISHELL1/wav --init mmspeech_large.pt --out runs/x
  torchrun --nproc_per_node 4 train.py ...             # DDP; same updates as 1 process with --grad-accum x4
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train.py ...   # CPU: one 1-thread process per core
  python train.py ... --resume                         # continue OUT/last.pt exactly (CPU: bit-identical, same threads)

Recipe (the paper's defaults, every one a flag): AdamW lr 1e-5, weight decay only on parameters with ndim >= 2
(weight matrices, embeddings, conv kernels; never biases or norm gains), linear warm-up over 10 % of the steps then
constant (or linear decay), global batch 12, 50 epochs, clipping at 1.0, teacher-forced cross-entropy on the
bracketed target, tasks MNER:SNER:TNER 1:1:1 redrawn every epoch (data.Loader). The loss of one optimizer
step is the sum of token losses over the whole global batch (all micro-batches, all ranks) divided by its number
of target tokens, so gradient accumulation and DDP give the same update as one big batch (train_step).
--batch-size is that global batch, the same rows on any number of ranks: each rank takes a near-equal contiguous part
of each step, split into --grad-accum micro-batches and further by --max-frames (data.Loader).

Named recipes (RECIPES) apply under explicit flags: explicit flag > demo > official > paper. --dataset demo
applies the demo recipe (tiny model with narrow conv subsampling from scratch on CPU, lr 2e-3 with linear decay
over 14 epochs, SNER dealt twice as often, CTC aid in training and in the SNER search, noise (with margins in the
last 3 epochs), a 13-minute budget, beam 5 on dev and test at the end); --official the official code's settings;
--recipe NAME selects one. The run prints the recipe it applied and every setting it changed from the paper's.

Files in --out: last.pt (everything --resume needs), best.pt (best mean dev F1 over the evaluated tasks; model,
config and assets only), metrics.jsonl (one JSON object per evaluation, the last one the final evaluation,
F1 in percent). Only rank 0 writes; every file is written to a temp file and renamed.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import augment
import cost
import data
import decode
import demo
import devices
import files
import image
from options import DecodeOptions
import trainlog
import weights
from data import TASKS
from scoring import format_table
from text import PAD


# Named recipes, in flag form, applied under explicit flags. Paper = fine-tuning MMSpeech; demo = tiny model
# from scratch on CPU.
PAPER = dict(tasks="TNER,SNER,MNER", lr=1e-5, epochs=50, batch_size=12, warmup=0.1, schedule="constant",
             mix="uniform", pseudo_len=40, beam=5, preset="large", ctc_weight=0.0, speeds="0.9,1.0,1.1",
             eval_every="1e", eval_limit=0, eval_test=False, max_minutes=0.0, dtype="auto")
OFFICIAL = dict(lr=2e-5, mix="coin", pseudo_len=50, beam=3)  # NingJinzhong/IMAGE4IMNER train.py
DEMO = dict(preset="tiny", model="subsample_channels=16", tasks="TNER,SNER,SNER,MNER", dropout=0.0, lr=2e-3,
            epochs=14, batch_size=16, warmup=200, schedule="linear", ctc_weight=0.5, speeds="1.0", beam=5,
            eval_every="0", eval_limit=100, eval_test=True, max_minutes=13.0, dtype="fp32", entity_gap=0.2,
            noise=0.5, noise_margin=0.2, noise_margin_epochs=3)
RECIPES = {"paper": PAPER, "official": OFFICIAL, "demo": DEMO}


def setting(default=dataclasses.MISSING, factory=dataclasses.MISSING, **flag):
    """A TrainConfig field and its command-line flag: flag = argparse keywords (help, type, choices, action)."""
    return dataclasses.field(default=default, default_factory=factory, metadata=flag)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Every training setting, as get_args resolves it from the flags given and the recipes (the fields without a
    default are PAPER's keys, --dataset and --out). Each field's help is its flag's help."""
    # data
    dataset: str = setting(required=True, choices=data.DATASETS, help="corpus format (data.load_split); demo = "
        "generated")
    data_dir: str | None = setting(None, help="folder with the corpus annotation files (demo: the generated cache "
        "folder)")
    audio_dir: str | None = setting(None, help="folder searched for <utterance id>.wav (AISHELL-1 wav/; default "
        "DATA_DIR/wav); no audio -> TNER only")
    dev_dataset: str | None = setting(None, choices=data.DATASETS, help="read dev/test from this corpus format "
        "instead (same --data-dir), e.g. train on image4imner's lossy text and score on cnerta's valid.json")
    train_size: int = setting(0, type=int, help="train on a random subset of N sentences (Figure 3, with --seed)")
    tasks: tuple = setting(help="training tasks, comma-separated: a subset is the Table 3 ablation; a task named "
        "twice is dealt twice as often (demo TNER,SNER,SNER,MNER = 1:2:1, speech is what a model from scratch "
        "learns slowest; default TNER,SNER,MNER)")
    mix: str = setting(choices=["uniform", "coin"], help="task mix: uniform = MNER:SNER:TNER 1:1:1 redrawn every "
        "epoch (default); coin = the official code's two coin flips (25 %% each, 25 %% neither)")
    pseudo_len: int = setting(type=int, help="pseudo phone input length for absent text (default 40)")
    speeds: tuple = setting(help="speed perturbation factors of real training speech, comma-separated (default "
        "0.9,1.0,1.1; demo 1.0)")
    entity_swap: float = setting(0.0, type=float, help="probability that an entity of a text-only (TNER) training "
        "row is replaced by a training mention of the same type (augment.EntitySwap; flat entities only; 0 = off)")
    entity_gap: float = setting(0.0, type=float, help="probability that a speech-only (SNER) training row of a corpus "
        "with gold entity times has entities bleeped or silenced in its audio and dropped from its target, so that "
        "redacted recordings decode cleanly (augment.EntityGap; 0 = off; demo 0.2)")
    noise: float = setting(0.0, type=float, help="probability that a speech training row (SNER, MNER) gets white, "
        "pink or brown background noise at an SNR drawn from --noise-snr-db, so that noisy recordings do not derail "
        "the model (augment.NoiseMix; 0 = off; demo 0.5)")
    noise_snr_db: tuple = setting((0.0, 30.0), type=augment.snr_range, help="SNR range of --noise in dB, LOW,HIGH "
        "(finite, LOW <= HIGH; default 0,30; a negative LOW as --noise-snr-db=-5,20)")
    noise_margin: float = setting(0.0, type=float, help="noisy rows also get a lead and a tail of noise alone, each "
        "0 to this many seconds, like the pieces of a long recording (0 = none; at most 10; demo 0.2)")
    noise_margin_epochs: int = setting(0, type=int, help="--noise-margin in the last N epochs only (0 = all; demo 3)")
    feature_cache: str = setting("auto", help="folder for a disk cache of fbank features, shared by workers and "
        "runs; auto = $XDG_CACHE_HOME/image/fbank (~/.cache/image/fbank) on a GPU (features are not recomputed "
        "every epoch), none on a CPU; 'none' = off")
    workers: int | None = setting(None, type=int, help="DataLoader worker processes per rank (persistent; 0 = in "
        "the loop; default: on a GPU up to 4 per rank as the CPU cores allow, on a CPU 0)")
    # model
    init: str | None = setting(None, help="start from this checkpoint in our format (e.g. a converted MMSpeech)")
    preset: str = setting(choices=["tiny", "base", "large"], help="model size when training from scratch (no "
        "--init): default large, demo tiny")
    model: dict = setting(factory=dict, help="from scratch only: Config fields over the preset, comma-separated "
        "KEY=VALUE, e.g. 'd_model=256,encoder_layers=8,text_join_layer=2' (see image.Config; demo "
        "'subsample_channels=16')")
    dropout: float | None = setting(None, type=float, help="override the model config's dropout (demo 0)")
    no_modality_embedding: bool = setting(False, action="store_true", help="ablation (Table 3): no modality-absence "
        "feature")
    mask_pseudo: bool = setting(False, action="store_true", help="ablation (Table 3): key-pad pseudo inputs instead "
        "of attending")
    ctc_weight: float = setting(type=float, help="weight of an auxiliary CTC phone loss on the speech frames "
        "(default 0 = the paper; MMSpeech's own fine-tuning uses 1.0; demo 0.5: from scratch the decoder otherwise "
        "learns to ignore the speech)")
    decode_ctc_weight: float | None = setting(None, type=float, help="SNER search: joint CTC/attention weight of "
        "the phone CTC head (decode.py --ctc-weight), for evaluation and saved as the checkpoint's default (default "
        "0.5 when --ctc-weight > 0, else 0 = decoder only)")
    official: bool = setting(False, action="store_true", help="the official code's settings: lr 2e-5, coin mix, "
        "pseudo length 50, beam 3 (--recipe official)")
    recipe: str = setting("paper", choices=list(RECIPES), help="named settings applied under explicit flags "
        "(default: demo for --dataset demo, official for --official, else paper); the run prints what the recipe "
        "changed")
    # optimisation
    epochs: int = setting(type=int, help="training epochs (default 50; demo 14, cut by --max-minutes)")
    batch_size: int = setting(type=int, help="global batch of one optimizer step (default 12; demo 16)")
    grad_accum: int = setting(1, type=int, help="micro-batches accumulated per optimizer step and rank (at least: "
        "--max-frames may split further)")
    max_frames: int | str = setting("auto", help="memory budget of one micro-batch in padded fbank frames (rows x the "
        "longest row's frames; 100 frames = 1 s): a step's rows are split into more accumulated micro-batches where "
        "they exceed it; the step, its task mix and its loss are unchanged. auto = on a GPU the budget cost.py "
        "estimates to leave 3 GiB of its memory free (bench.py --memory shows the estimate), on a CPU none; 0 = none")
    lr: float = setting(type=float, help="peak learning rate (default 1e-5; --official 2e-5; demo 2e-3)")
    weight_decay: float = setting(0.01, type=float, help="AdamW weight decay, on parameters with ndim >= 2 only")
    beta2: float = setting(0.999, type=float, help="AdamW beta2")
    warmup: float = setting(type=float, help="linear warm-up: fraction of the steps if < 1, else steps (default "
        "0.1; demo 200 steps)")
    schedule: str = setting(choices=["constant", "linear"], help="after warm-up: constant (default) or linear decay "
        "to 0 (demo)")
    clip: float = setting(1.0, type=float, help="gradient-norm clipping threshold; 0 disables")
    max_steps: int = setting(0, type=int, help="stop after this many optimizer steps (0: --epochs decides)")
    max_minutes: float = setting(type=float, help="stop training after this many minutes since start, then evaluate "
        "(0 = no limit; demo 13)")
    max_bad_steps: int = setting(20, type=int, help="stop after this many skipped steps in a row (non-finite loss or "
        "gradients)")
    seed: int = setting(42, type=int, help="random seed: model init, data order, tasks, dropout, --train-size")
    # precision / speed
    device: torch.device | None = setting(None, help="cpu | cuda | cuda:N (default: the LOCAL_RANK GPU if there is "
        "one, else cpu)")
    dtype: str = setting(choices=["auto", "fp32", "bf16", "fp16"], help="autocast dtype; auto = bf16 on GPUs that "
        "support it, fp16 with a gradient scaler on older GPUs, fp32 on CPU")
    compile: bool = setting(False, action="store_true", help="torch.compile the training forward (GPU; the first "
        "batches of each new shape recompile). Checkpoints never carry compile prefixes")
    # evaluation
    eval_every: str = setting(help="dev evaluation every N steps ('500') or N epochs ('1e', default); 0 = only at "
        "the end (demo)")
    eval_limit: int = setting(type=int, help="evaluate on the first N dev sentences only (0 = all; demo 100)")
    eval_batch_size: int = setting(32, type=int, help="sentences per evaluation batch")
    beam: int = setting(type=int, help="beam size of the evaluation search (default 5; --official 3)")
    greedy: bool = setting(False, action="store_true", help="evaluate with greedy search (= --beam 1)")
    evaluator: str = setting("ours", choices=["ours", "official"], help="entity scorer whose P/R/F1 select best.pt "
        "(decode.py); the other one's F1 is logged too")
    eval_test: bool = setting(action="store_true", help="evaluate best.pt on the test split at the end (demo: on)")
    # output
    out: str = setting(help="output folder (default runs/<dataset>)")
    resume: bool = setting(False, action="store_true", help="continue exactly from OUT/last.pt")
    save_every: int = setting(0, type=int, help="also write last.pt every N optimizer steps (0 = at evaluations)")
    log_every: int = setting(10, type=int, help="progress-bar loss/lr/throughput refresh, in steps (and a point of "
        "the --tensorboard curves)")
    tensorboard: str | None = setting(None, help="also write TensorBoard curves to this folder: loss, learning rate, "
        "throughput, gradient norm every --log-every steps, every dev/test evaluation (needs pip install "
        "tensorboard; metrics.jsonl is written either way)")
    # resolved by get_args
    recipe_changes: dict = dataclasses.field(default_factory=dict)  # key -> (recipe value, paper value) applied
    eval_unit: str = "epoch"            # eval_every parsed: "step" or "epoch" ...
    eval_n: int = 1                     # ... and N (0 = only at the end)


def get_args(argv=None) -> TrainConfig:
    # every default lives in TrainConfig or a recipe: parse_args returns only the flags given
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for field in dataclasses.fields(TrainConfig):
        if field.metadata:
            p.add_argument("--" + field.name.replace("_", "-"), **field.metadata)
    given = vars(p.parse_args(argv))

    # recipes under explicit flags: explicit flag > demo > official > paper
    recipe = given.get("recipe") or ("demo" if given["dataset"] == "demo" else
                                      "official" if given.get("official") else "paper")
    layers = [name for name in ("official", "demo") if name == recipe or (name == "official" and "official" in given)]
    applied = {key: value for name in ["paper", *layers] for key, value in RECIPES[name].items()}
    s = {**applied, **given}
    s["recipe"] = "+".join(layers) or "paper"
    s["recipe_changes"] = {key: (value, PAPER.get(key)) for key, value in applied.items()
                           if key not in given and value != PAPER.get(key)}
    if s.get("greedy"):
        s["beam"] = 1
    for name in ("entity_swap", "entity_gap", "noise"):
        if not 0.0 <= s.get(name, 0.0) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be a probability in [0, 1] (got {s[name]})")
    if not 0.0 <= s.get("noise_margin", 0.0) <= 10.0 or s.get("noise_margin_epochs", 0) < 0:
        p.error("--noise-margin must be 0 to 10 seconds, --noise-margin-epochs at least 0")
    if s.get("decode_ctc_weight") is not None and s["decode_ctc_weight"] < 0:
        p.error(f"--decode-ctc-weight must be >= 0 (got {s['decode_ctc_weight']})")
    # checks that argparse cannot do
    tasks = tuple(t.strip().upper() for t in s["tasks"].split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks {s['tasks']!r}: " + (f"unknown task(s) {', '.join(bad)}" if bad else "no task named")
                + f"; choose from {','.join(TASKS)}")
    s["tasks"] = tasks
    if s.get("device") is not None:
        try:
            s["device"] = devices.parse_device(s["device"])
        except files.InputError as e:
            p.error(str(e))
    if s["dataset"] != "demo" and s.get("data_dir") is None:
        p.error(f"--data-dir is required for --dataset {s['dataset']}")
    try:
        s["model"] = image.parse_config_overrides(s.get("model") or "")
    except ValueError as e:
        p.error(f"--model: {e}")
    if s["model"] and "model" in given and (s.get("init") is not None or s.get("resume")):
        p.error("--model changes the architecture, so it only applies to a model trained from scratch (no --init, "
                "no --resume: a resumed run keeps its checkpoint's config)")
    if s.get("init") is not None:
        try:  # a folder, a missing file or not a torch.save file: said now, not after loading the corpus
            weights.check_checkpoint_path(s["init"], "--init")
        except files.InputError as e:
            p.error(str(e))
    for name in ("epochs", "batch_size", "grad_accum", "beam", "pseudo_len", "eval_batch_size", "log_every"):
        if s.get(name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    if (s.get("workers") or 0) < 0:
        p.error(f"--workers must be >= 0, got {s['workers']}")
    if s.get("max_frames", "auto") != "auto":
        try:
            s["max_frames"] = int(s["max_frames"])
        except ValueError:
            s["max_frames"] = -1
        if s["max_frames"] < 0:
            p.error(f"--max-frames: expected auto or a number of frames >= 0, got {given['max_frames']!r}")
    if not 0 <= s.get("beta2", 0.999) < 1:   # NaN fails it too
        p.error(f"--beta2 must be in [0, 1), got {s['beta2']}")
    if not (0 < s["lr"] < math.inf and 0 <= s["warmup"] < math.inf):  # NaN fails both comparisons
        p.error(f"--lr must be > 0 and --warmup >= 0, both finite (got {s['lr']}, {s['warmup']})")
    try:
        speeds = tuple(float(x) for x in s["speeds"].split(","))
    except ValueError:
        speeds = ()
    if not speeds or not all(0.5 <= x <= 2.0 for x in speeds):
        p.error(f"--speeds: expected comma-separated factors in [0.5, 2], got {s['speeds']!r}")
    s["speeds"] = speeds
    ev = str(s["eval_every"]).strip().lower()
    try:
        s["eval_unit"], s["eval_n"] = ("epoch", int(ev[:-1])) if ev.endswith("e") else ("step", int(ev))
    except ValueError:
        p.error(f"--eval-every: expected N (steps) or Ne (epochs), got {s['eval_every']!r}")
    s["out"] = s.get("out") or f"runs/{s['dataset']}"
    return TrainConfig(**s)


def recipe_line(cfg):
    """'recipe demo: lr 0.002 (paper 1e-05), epochs 14 (50), ...': what the applied recipe changed."""
    shown = lambda v: "unset" if v is None else v
    changes = [f"{key} {shown(value)} ({'paper ' if i == 0 else ''}{shown(paper)})"
               for i, (key, (value, paper)) in enumerate(cfg.recipe_changes.items())]
    return f"recipe {cfg.recipe}: " + (", ".join(changes) or "no setting changed from the paper's")


# ----------------------------------------------------------------------------------------------------------
# small pieces


def lr_at(step, total_steps, warmup_steps, peak, schedule):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or linear decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "linear":
        return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return peak


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on tensors with ndim >= 2 (matrices, embeddings, conv kernels), none on biases/gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)
    try:  # fused kernel where this torch has it for the device (CUDA; CPU since 2.4)
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


# --compile: every length symbolic from the first batch, so bucketed lengths trace once (tests/test_compile.py)
COMPILE_OPTIONS = dict(dynamic=True)

# the settings that decide an epoch's steps (data.Loader.batch_plan): a resumed run must have the same
PLAN_KEYS = ("batch_size", "seed", "tasks", "mix", "speeds", "train_size")


def plan_settings(cfg):
    """PLAN_KEYS of a run, as last.pt stores them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items() if k in PLAN_KEYS}


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Objective(nn.Module):
    """Training loss of one micro-batch as a module, so DDP and torch.compile wrap one forward.

    Sum over non-PAD target tokens of the teacher-forced cross-entropy on the bracketed target, plus, with
    ctc_weight > 0, ctc_weight x the CTC loss (summed over rows) of MMSpeech's phone head on the speech frames of
    rows with real speech (as MMSpeech's own fine-tuning recipe; off in the paper's recipe). The caller divides by
    the global number of target tokens."""

    def __init__(self, model, ctc_weight=0.0):
        super().__init__()
        self.model, self.ctc_weight = model, ctc_weight

    def forward(self, batch):
        enc = self.model.encode(batch["fbank"], batch["fbank_lengths"], batch["phones"], batch["phone_chars"],
                                batch["phone_lengths"], batch["speech_present"], batch["text_present"])
        logits = self.model.decode(batch["decoder_input"], enc)  # (B, L, V)
        target = batch["target"]  # (B, L)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD, reduction="sum")
        if self.ctc_weight and "ctc_phones" in batch:
            # every row, then the rows without real speech (no CTC target) zeroed: shapes that do not depend on the
            # data, so torch.compile keeps one graph
            logp, frames = self.model.speech_phone_log_probs(enc, batch["fbank"].size(1))  # (B, T', C), (B,)
            per_row = F.ctc_loss(logp.transpose(0, 1), batch["ctc_phones"], frames, batch["ctc_lengths"], blank=0,
                                 reduction="none", zero_infinity=True)                     # (B,)
            loss = loss + self.ctc_weight * torch.where(batch["ctc_lengths"] > 0, per_row, 0.0).sum()
        return loss


# ----------------------------------------------------------------------------------------------------------
# adapters to the other files (data.py, image.py, weights.py, decode.py, demo.py)


def load_corpus(cfg, master, barrier):
    """-> train, dev, test sample lists (test None unless --eval-test). The demo corpus is built once (rank 0)."""
    data_dir = cfg.data_dir
    if cfg.dataset == "demo" and data_dir is None:
        if master:
            demo.ensure_demo_corpus(progress=True)
        barrier()
        data_dir = demo.ensure_demo_corpus(progress=False)
    load = lambda split, dataset=cfg.dataset: data.load_split(dataset, data_dir, split, audio_dir=cfg.audio_dir,
                                                              verbose=master)
    train, dev = load("train"), load("dev", cfg.dev_dataset or cfg.dataset)
    test = load("test", cfg.dev_dataset or cfg.dataset) if cfg.eval_test else None
    for split, samples in (("train", train), ("dev", dev), ("test", test)):
        if samples is not None and not samples:  # would train nothing, or choose best.pt on 0 sentences
            raise files.InputError(f"{samples.report['file']}: no sentences in the {split} split")
    if cfg.train_size:
        if cfg.train_size > len(train):
            raise files.InputError(f"--train-size {cfg.train_size} > {len(train)} training sentences in "
                                   f"{train.report['file']}")
        keep = sorted(random.Random(cfg.seed).sample(range(len(train)), cfg.train_size))
        train = [train[i] for i in keep]
    return train, dev, test


def corpus_tasks(train, dev, requested, log):
    """-> (training tasks or None, evaluation tasks). Without audio: TNER only (said once). With audio for part of
    the corpus, SNER/MNER train and score on those sentences only (data.Loader, decode.evaluate_split)."""
    with_audio = sum(s.audio is not None for s in train)
    if with_audio == 0:
        log("note: this corpus has no audio -> training and evaluating TNER only")
        return tuple(t for t in requested if t == "TNER") or None, ("TNER",)
    if with_audio < len(train):
        log(f"note: {with_audio}/{len(train)} training sentences have audio; SNER/MNER use only those")
    if not any(s.audio is not None for s in dev):
        log("note: no dev sentence has audio -> evaluating TNER only")
        return tuple(requested), ("TNER",)
    return tuple(requested), TASKS


def build_model(cfg, train, resume_ckpt, log):
    """-> (model on CPU, assets). Order: --resume state > --init checkpoint > --preset from scratch."""
    overrides = {}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    if cfg.no_modality_embedding:
        overrides["use_modality_embedding"] = False
    if cfg.mask_pseudo:
        overrides["mask_pseudo"] = True
    if resume_ckpt is not None:
        model, assets = weights.model_from_checkpoint(resume_ckpt, "cpu", "last.pt"), resume_ckpt["assets"]
    elif cfg.init is not None:
        ckpt = weights.read_checkpoint(cfg.init, "--init checkpoint")
        model, assets = weights.model_from_checkpoint(ckpt, "cpu", cfg.init, **overrides), ckpt["assets"]
        log(f"initialised from {cfg.init}")
    else:
        assets = weights.assets_for_scratch(train)
        try:
            config = getattr(image.Config, cfg.preset)(**{**cfg.model, "vocab_size": len(assets["vocab"]),
                                                           "phone_vocab_size": len(assets["phones"]), **overrides})
        except ValueError as e:
            raise files.InputError(f"--model {cfg.model}: {e}") from None
        model = image.IMAGE(config)
        changed = f" with {cfg.model}" if cfg.model else ""
        log(f"training a {cfg.preset} model{changed} from scratch (vocabulary {len(assets['vocab'])} from the "
            "training text)")
    model = model.float().train()  # float32 master weights whatever the file stores
    return model, assets


# ----------------------------------------------------------------------------------------------------------
# one optimizer step, the run's state, the loop


def train_step(objective, model, optimizer, scaler, micro, lr, clip, autocast=nullcontext(), world=1):
    """One optimizer step over this rank's micro-batches (on the device) -> (loss, skipped, gradient norm before
    clipping; NaN when the loss was not finite). loss: token losses
    summed over the global batch (every micro-batch, every rank; DDP when world > 1) / its number of target tokens,
    so accumulation and DDP give the update of one big batch. skipped: no update, because the loss or the gradient
    norm is not finite (the same on every rank: gradients are all-reduced). With fp16's GradScaler an overflow is
    the scaler's business (it skips the step and lowers its scale), so it does not count as skipped."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    ddp = world > 1
    tokens = sum((b["target"] != PAD).sum() for b in micro).float()
    if ddp:
        dist.all_reduce(tokens)
    step_loss = torch.zeros((), device=tokens.device)
    for i, b in enumerate(micro):
        sync = i == len(micro) - 1
        with (objective.no_sync() if ddp and not sync else nullcontext()):
            with autocast:
                loss_sum = objective(b)
            scaler.scale(loss_sum * world / tokens).backward()  # DDP averages over ranks
        step_loss += loss_sum.detach()
    if ddp:
        dist.all_reduce(step_loss)
    step_loss = (step_loss / tokens).item()
    skipped, norm = not math.isfinite(step_loss), float("nan")
    if not skipped:
        scaler.unscale_(optimizer)                               # a no-op without fp16's scaler
        # the norm is needed anyway: a finite loss can still give inf/NaN gradients (bf16/fp32), and clipping would
        # then scale every gradient by NaN; clip 0 measures without clipping (x * 1.0 leaves the gradients as they are)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf))
        skipped = not scaler.is_enabled() and not math.isfinite(norm)
        if not skipped:
            scaler.step(optimizer)
            scaler.update()
    # under DDP the gradients stay views of its all-reduce buckets (set to None, the next micro-batches would
    # accumulate into fresh tensors beside the buckets: a second copy of every gradient)
    optimizer.zero_grad(set_to_none=not ddp)
    return step_loss, skipped, norm


@dataclasses.dataclass
class Run:
    """What the loop, the evaluations and the checkpoints share: settings, the un-wrapped model (checkpoints come
    from it: no _orig_mod./module. prefixes), its optimizer, and how far training is."""
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    assets: dict
    featurizer: data.Featurizer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    eval_tasks: tuple
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    t_start: float
    master: bool = dataclasses.field(init=False)
    step: int = 0
    epoch: int = 0
    plan: dict = dataclasses.field(default_factory=dict)   # PLAN_KEYS as asked for (before any fallback)
    step_in_epoch: int = 0
    best_f1: float = -1.0
    last_loss: float = float("nan")
    curves: trainlog.Curves | None = None    # --tensorboard (rank 0)

    def __post_init__(self):
        self.master = self.rank == 0

    def step_split(self):
        """How this run splits a step: on other values a resumed run sums the same gradients in another order."""
        return {"world_size": self.world, "grad_accum": self.cfg.grad_accum, "max_frames": self.cfg.max_frames}

    def schedule(self):
        return {"kind": self.cfg.schedule, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def resume(self, ckpt):
        """Optimizer, scaler and counters of a last.pt (the RNG states are restored at the loop's first step) ->
        a note when the continuation is not the uninterrupted run's, else None."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        self.best_f1 = ckpt["best_f1"]
        notes = []
        if ckpt.get("plan") is None:
            notes.append("note: last.pt was written by an older train.py whose batches differ: the run continues at "
                         "the same step of the epoch, on other data than the interrupted run would have seen")
        elif ckpt["split"] != self.step_split():
            notes.append(f"note: the step is split otherwise than at saving ({ckpt['split']} -> {self.step_split()}): "
                         "the same steps in the same order, but gradients summed in another order and, with dropout, "
                         "other dropout masks, so not bit-identical to the uninterrupted run")
        now = self.schedule()
        saved = ckpt.get("scheduler") or now
        if (saved["kind"], saved["warmup_steps"]) != (now["kind"], now["warmup_steps"]) or (
                now["kind"] == "linear" and saved["total_steps"] != now["total_steps"]):
            notes.append(f"note: the learning-rate schedule differs from the interrupted run's ({saved} -> {now}: "
                         "--epochs, --max-steps, --warmup or --schedule changed): the next steps get other rates")
        return "\n".join(notes) or None

    def checkpoint(self, kind):
        """last.pt: everything --resume needs; best.pt: model + assets only. RNG states of every rank, so every
        rank calls checkpoint("last") (a collective under DDP)."""
        states = [devices.rng_state(self.device)]
        if self.world > 1 and kind == "last":
            states = [None] * self.world
            dist.all_gather_object(states, devices.rng_state(self.device))
        if not self.master:
            return
        source = {"trainer": "train.py", "step": self.step,
                  "args": {k: v if isinstance(v, (int, float, bool, str, type(None))) else str(v)
                           for k, v in vars(self.cfg).items()}}
        if kind == "best":
            ckpt = weights.make_checkpoint(self.model.config, self.model.state_dict(), self.assets, source,
                                           best_f1=self.best_f1)
            weights.save_checkpoint(ckpt, str(self.out / "best.pt"))
            return
        ckpt = weights.make_checkpoint(
            self.model.config, self.model.state_dict(), self.assets, source, optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            scheduler=self.schedule(),
            step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch, best_f1=self.best_f1, rng=states,
            world_size=self.world, split=self.step_split(), plan=self.plan, seed=self.cfg.seed,
            loss=self.last_loss)
        weights.save_checkpoint(ckpt, str(self.out / "last.pt"))

    def evaluate(self, split, samples, tag):
        """Rank 0: scores of the current model on a split -> {task: {"p", "r", "f1", "f1_<other>", "cer"}}
        (percent), appended to metrics.jsonl; other ranks: {}."""
        if not self.master:
            return {}
        cfg = self.cfg
        options = DecodeOptions(beam=cfg.beam)   # the other settings: assets["decoding"] (ctc_weight, ...)
        self.model.eval()
        with torch.no_grad(), self.autocast:
            found = decode.evaluate_split(self.model, samples, self.featurizer, tasks=self.eval_tasks,
                                          options=options, batch_size=cfg.eval_batch_size, evaluator=cfg.evaluator,
                                          device=self.device, assets=self.assets, head_check=True)
        self.model.train()
        if self.device.type == "cuda":  # the search's caches go back to the allocator before training resumes
            torch.cuda.empty_cache()
        other = "official" if cfg.evaluator == "ours" else "ours"
        scores = {t: {"p": s["p"], "r": s["r"], "f1": s["f1"], f"f1_{other}": s[other]["f1"], "cer": s["cer"],
                      **{k: s[k] for k in ("head_per",) if k in s}} for t, s in found.items()}
        record = {"split": split, **scores, "mean_f1": mean_f1(scores), "step": self.step,
                  "epoch": round(self.epoch + self.step_in_epoch / max(1, self.steps_per_epoch), 3),
                  "checkpoint": tag, "minutes": round((time.time() - self.t_start) / 60, 2)}
        files.append_atomic(self.out / "metrics.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
        if self.curves is not None:
            self.curves.evaluation(split, self.step, scores, record["mean_f1"])
        tqdm.write(f"[{split} @ step {self.step}] " + "  ".join(f"{t} F1 {s['f1']:.2f}" for t, s in scores.items()))
        return scores

    def validate(self, dev_samples):
        """Dev evaluation; best.pt when the mean F1 improved (or there is none yet); last.pt; ranks meet."""
        scores = self.evaluate("dev", dev_samples, "current")
        improved = self.master and scores and mean_f1(scores) > self.best_f1
        if improved:
            self.best_f1 = mean_f1(scores)
        if self.master and (improved or not (self.out / "best.pt").exists()):
            self.checkpoint("best")
        self.checkpoint("last")
        if self.world > 1:
            dist.barrier()

    def stop_everywhere(self, flag):
        """Every rank leaves the loop at the same step: True if any rank says so."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def mean_f1(scores):
    return sum(s["f1"] for s in scores.values()) / len(scores)


def check_outputs(out):
    """Before any work: a run must not train for hours and then fail at its first write."""
    files.check_output_dir(out, "--out")
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        files.check_output_file(out / name, "--out")
        files.remove_stale_temps(out / name)  # of a killed run


def eval_due(cfg, step, epoch, end_of_epoch):
    """Dev evaluation after this step? Every N steps, or at the end of every N-th epoch (N = 0: only at the end)."""
    if cfg.eval_unit == "step":
        return cfg.eval_n and step % cfg.eval_n == 0
    return cfg.eval_n and end_of_epoch and (epoch + 1) % cfg.eval_n == 0


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = get_args(argv)
    with files.cli_errors("train.py"):  # bad inputs: one line; bugs keep their traceback
        train(cfg)


def train(cfg):
    t_start = time.time()
    device, rank, world = devices.start_distributed(cfg.device)
    ddp, master = world > 1, rank == 0
    log = print if master else (lambda *a, **k: None)
    log(recipe_line(cfg))
    if cfg.batch_size < world:
        raise files.InputError(f"--batch-size {cfg.batch_size} is the global batch: it needs a row for each of the "
                               f"{world} ranks")
    out = Path(cfg.out)
    feature_cache = devices.feature_cache_dir(cfg.feature_cache, device)
    if master:
        check_outputs(out)
        if feature_cache is not None:
            files.check_output_dir(feature_cache, "--feature-cache")
        if cfg.tensorboard:
            trainlog.require_tensorboard()
            files.check_output_dir(cfg.tensorboard, "--tensorboard")
    plan = plan_settings(cfg)  # as asked for: a run whose --mix falls back to uniform resumes with the same flags
    resume_ckpt = weights.read_last_checkpoint(out / "last.pt", plan) if cfg.resume else None

    # --- data and model ---
    devices.seed_everything(cfg.seed)  # model init identical on every rank
    train_samples, dev_samples, test_samples = load_corpus(cfg, master, dist.barrier if ddp else (lambda: None))
    train_tasks, eval_tasks = corpus_tasks(train_samples, dev_samples, cfg.tasks, log)
    if train_tasks is None:
        raise files.InputError(f"--tasks {','.join(cfg.tasks)}: none of them can be trained without audio")
    if not cfg.resume and master and (out / "last.pt").exists():  # only now that the inputs are known good
        log(f"note: starting fresh in {out}; its last.pt/best.pt/metrics.jsonl are replaced (--resume continues)")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if cfg.mix == "coin" and set(train_tasks) != set(TASKS):
        log(f"note: the coin mix needs all three tasks; training {','.join(train_tasks)} with the uniform mix")
        cfg.mix = "uniform"
    dev_samples = dev_samples[:cfg.eval_limit] if cfg.eval_limit else dev_samples
    model, assets = build_model(cfg, train_samples, resume_ckpt, log)
    cfg.decode_ctc_weight = (0.5 if cfg.ctc_weight else 0.0) if cfg.decode_ctc_weight is None else cfg.decode_ctc_weight
    assets["decoding"] = {**assets.get("decoding", {}), "ctc_weight": cfg.decode_ctc_weight}
    assets["pseudo_text_len"] = cfg.pseudo_len  # part of the checkpoint: decoding needs the same pseudo text
    featurizer = data.Featurizer(assets, pseudo_text_len=cfg.pseudo_len, cache_dir=feature_cache)
    workers = cfg.workers if cfg.workers is not None else devices.default_workers(device, int(os.environ.get(
        "LOCAL_WORLD_SIZE", "1")))
    dtype_name, autocast, scaler = devices.resolve_precision(cfg.dtype, device)
    warning = devices.precision_warning(dtype_name, device.type, devices.native_bf16(device))
    if warning:
        log(warning)
    devices.set_tf32(device)  # fp32 matmuls on a GPU in TF32 (training needs no IEEE-exact fp32)
    loader = data.Loader(
        train_samples, featurizer, cfg.batch_size, train=True, task_mix=cfg.mix, tasks=train_tasks, seed=cfg.seed,
        num_workers=workers, rank=rank, world_size=world, speeds=cfg.speeds, grad_accum=cfg.grad_accum,
        pin_memory=device.type == "cuda", ctc_classes=model.config.phone_dict_size - 3 if cfg.ctc_weight else 0,
        entity_swap=augment.EntitySwap(train_samples, cfg.entity_swap, cfg.seed) if cfg.entity_swap else None,
        entity_gap=augment.EntityGap(cfg.entity_gap, cfg.seed) if cfg.entity_gap else None,
        noise=augment.NoiseMix(cfg.noise, cfg.seed, cfg.noise_snr_db, cfg.noise_margin, cfg.epochs - (
            cfg.noise_margin_epochs or cfg.epochs)) if cfg.noise else None)
    if cfg.max_frames == "auto":
        rows = math.ceil(math.ceil(cfg.batch_size / world) / cfg.grad_accum)   # the largest micro-batch
        cfg.max_frames, note = cost.auto_max_frames(devices.gpu_bytes(device), model.config, dtype_name,
                                                    loader.longest_frames(), rows)
        if note:
            log(note)
    loader.max_frames = cfg.max_frames
    steps_per_epoch = len(loader)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    model = model.to(device)
    run = Run(cfg=cfg, out=out, rank=rank, world=world, device=device, model=model, assets=assets,
              featurizer=featurizer, optimizer=make_optimizer(model, cfg, device), scaler=scaler, autocast=autocast,
              eval_tasks=eval_tasks, steps_per_epoch=steps_per_epoch, total_steps=total_steps, plan=plan,
              warmup_steps=round(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup), t_start=t_start)
    objective = Objective(model, cfg.ctc_weight)
    if ddp:  # gradients live in DDP's buckets: no second copy of every gradient (2.4 GB on large)
        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                        gradient_as_bucket_view=True, broadcast_buffers=False)   # the one buffer is a constant
    if cfg.compile:  # after DDP, so that DDP's hooks stay outside the graph and its buckets overlap the backward
        objective = torch.compile(objective, **COMPILE_OPTIONS)
    if resume_ckpt is not None:
        note = run.resume(resume_ckpt)
        if note:
            log(note)
        log(f"resumed from {out / 'last.pt'} at step {run.step} (epoch {run.epoch}, step {run.step_in_epoch} of "
            f"{steps_per_epoch})")
    if cfg.tensorboard and master:   # a resumed run drops the killed run's events after its last checkpoint
        run.curves = trainlog.Curves(cfg.tensorboard, purge_step=run.step + 1 if cfg.resume else None)
    log("config:", json.dumps({**vars(cfg), "world_size": world, "device": str(device), "dtype": dtype_name,
                               "workers": workers, "feature_cache": feature_cache and str(feature_cache),
                               "train_tasks": train_tasks, "eval_tasks": eval_tasks,
                               "train_sentences": len(train_samples), "dev_sentences": len(dev_samples),
                               "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                               "warmup_steps": run.warmup_steps,
                               "parameters": sum(p.numel() for p in model.parameters())},
                              ensure_ascii=False, default=str))

    # --- training loop ---
    progress = trainlog.Progress(total_steps, run.step, master, cfg.log_every, run.curves)
    model.train()
    evaluated_at, bad_steps = -1, 0
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    stop = run.step >= total_steps
    while not stop:
        # Data order and dropout of an epoch derive from (seed, epoch, rank). On resume the epoch's iterator is
        # rebuilt from the same seed, the finished batches are skipped, then the RNG states saved at that step
        # are restored: the continuation is bit-identical to an uninterrupted run.
        devices.seed_everything(cfg.seed * 1_000_003 + run.epoch * 1_009 + rank)
        loader.set_epoch(run.epoch)
        assets["decoding"]["onset_lead_seconds"] = demo.onset_lead(cfg.dataset, loader.margin_at(run.epoch))
        steps = loader.batches(start=run.step_in_epoch)
        if resume_ckpt is not None:
            saved = resume_ckpt["rng"]
            devices.set_rng_state(saved[rank] if len(saved) == world else saved[0], device)
            resume_ckpt = None
        for micro in steps:
            micro = [to_device(b, device) for b in micro]
            lr = lr_at(run.step, total_steps, run.warmup_steps, cfg.lr, cfg.schedule)
            loss, skipped, norm = train_step(objective, model, run.optimizer, scaler, micro, lr, cfg.clip, autocast,
                                             world)
            run.last_loss = loss
            bad_steps = bad_steps + 1 if skipped else 0
            if bad_steps and master:
                warnings.warn(f"step {run.step}: non-finite loss ({loss}) or gradients, update skipped "
                              f"({bad_steps}/{cfg.max_bad_steps} in a row)")
            run.step += 1
            run.step_in_epoch += 1
            if bad_steps >= cfg.max_bad_steps:
                raise SystemExit(f"stopping: {bad_steps} consecutive non-finite losses or gradients (lower --lr, try "
                                 "--dtype fp32)")
            progress.update(run.step, loss, lr, cfg.batch_size, norm)

            stop = run.step >= total_steps or run.stop_everywhere(time.time() - t_start > budget_s)
            if eval_due(cfg, run.step, run.epoch, end_of_epoch=run.step_in_epoch >= steps_per_epoch) or stop:
                run.validate(dev_samples)
                evaluated_at = run.step
            elif cfg.save_every and run.step % cfg.save_every == 0:
                run.checkpoint("last")
            if stop:
                break
        if not stop:
            run.epoch, run.step_in_epoch = run.epoch + 1, 0
    progress.bar.close()

    # --- final evaluation: best.pt on the test split ---
    if evaluated_at != run.step and run.step > 0:  # resumed after the end: make sure the final dev scores exist
        run.evaluate("dev", dev_samples, "current")
    if cfg.eval_test and master:
        best = weights.load_torch_file(str(out / "best.pt"), "best.pt")   # mapped: no second copy in RAM
        model.load_state_dict(best["model"])
        scores = run.evaluate("test", test_samples, "best.pt")
        search = "greedy" if cfg.beam == 1 else f"beam {cfg.beam}"
        log(f"\ntest split, best.pt (step {best['source']['step']}, best mean dev F1), {search}:")
        log(format_table(scores, eval_tasks))
    log(f"done in {(time.time() - t_start) / 60:.1f} min; outputs in {out}")
    if run.curves is not None:
        run.curves.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
