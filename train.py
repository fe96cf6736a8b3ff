"""
Train IMAGE: one model for text (TNER), speech (SNER) and text+speech (MNER) Chinese NER.

  python train.py --dataset demo                       # first run: demo corpus, tiny model from scratch, CPU
  python train.py --dataset cnerta --data-dir DIR --audio-dir AISHELL1/wav --init mmspeech_large.pt --out runs/x
  torchrun --nproc_per_node 4 train.py ...             # DDP; same updates as 1 process with --grad-accum x4
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train.py ...   # CPU: one 1-thread process per core
  python train.py ... --resume                         # continue OUT/last.pt exactly (bit-identical on CPU)

Recipe (the paper's defaults, every one a flag): AdamW lr 1e-5, weight decay only on parameters with ndim >= 2
(weight matrices, embeddings, conv kernels; never biases or norm gains), linear warm-up over 10 % of the steps then
constant (or linear decay), global batch 12, 50 epochs, clipping at 1.0, teacher-forced cross-entropy on the
bracketed target, tasks MNER:SNER:TNER 1:1:1 redrawn every epoch (data.make_loader). The loss of one optimizer
step is the sum of token losses over the whole global batch (all micro-batches, all ranks) divided by its number
of target tokens, so gradient accumulation and DDP give the same update as one big batch. --batch-size is that
global batch; each rank's micro-batch is batch_size / (world_size * grad_accum).

--dataset demo applies the DEMO preset below (tiny model with narrow conv subsampling from scratch on CPU, lr 2e-3
with linear decay over 14 epochs, SNER dealt twice as often, CTC aid in training and in the SNER search, 13-minute
training budget (on the 2-core development machine all 14 epochs now fit in about 11 minutes), beam 5 on dev and test at the end); --official the official code's
settings. Explicit flags win.

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
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import decode
import demo
import files
import image
import search
import weights
from evaluate import format_table
from text import PAD

TASKS = ("TNER", "SNER", "MNER")

# Presets applied under explicit flags. Paper = fine-tuning MMSpeech; demo = tiny model from scratch on CPU.
PAPER = dict(tasks="TNER,SNER,MNER", lr=1e-5, epochs=50, batch_size=12, warmup=0.1, schedule="constant",
             mix="uniform", pseudo_len=40, beam=5, preset="large", ctc_weight=0.0, speeds="0.9,1.0,1.1",
             eval_every="1e", eval_limit=0, eval_test=False, max_minutes=0.0, dtype="auto")
OFFICIAL = dict(lr=2e-5, mix="coin", pseudo_len=50, beam=3)  # NingJinzhong/IMAGE4IMNER train.py
DEMO = dict(preset="tiny", model="subsample_channels=16", tasks="TNER,SNER,SNER,MNER", dropout=0.0, lr=2e-3,
            epochs=14, batch_size=16, warmup=200, schedule="linear", ctc_weight=0.5, speeds="1.0", beam=5,
            eval_every="0", eval_limit=100, eval_test=True, max_minutes=13.0, dtype="fp32")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data
    a("--dataset", required=True, choices=data.DATASETS, help="corpus format (data.load_split); demo = generated")
    a("--data-dir", default=None, help="folder with the corpus annotation files (demo: the generated cache folder)")
    a("--audio-dir", default=None, help="folder searched for <utterance id>.wav (AISHELL-1 wav/; default "
      "DATA_DIR/wav); no audio -> TNER only")
    a("--dev-dataset", choices=data.DATASETS, default=None, help="read dev/test from this corpus format instead "
      "(same --data-dir), e.g. train on image4imner's lossy text and score on cnerta's valid.json")
    a("--train-size", type=int, default=0, help="train on a random subset of N sentences (Figure 3, with --seed)")
    a("--tasks", default=None, help="training tasks, comma-separated: a subset is the Table 3 ablation; a task named "
      "twice is dealt twice as often (demo TNER,SNER,SNER,MNER = 1:2:1, speech is what a model from scratch "
      "learns slowest; default TNER,SNER,MNER)")
    a("--mix", choices=["uniform", "coin"], default=None, help="task mix: uniform = MNER:SNER:TNER 1:1:1 redrawn "
      "every epoch (default); coin = the official code's two coin flips (25 %% each, 25 %% neither)")
    a("--pseudo-len", type=int, default=None, help="pseudo phone input length for absent text (default 40)")
    a("--speeds", default=None, help="speed perturbation factors of real training speech, comma-separated "
      "(default 0.9,1.0,1.1; demo 1.0)")
    a("--entity-swap", type=float, default=0.0, help="probability that an entity of a text-only (TNER) training "
      "row is replaced by a training mention of the same type (data.EntitySwap; flat entities only; 0 = off)")
    a("--feature-cache", default=None, help="folder for a disk cache of fbank features, shared by workers and runs")
    a("--workers", type=int, default=0, help="DataLoader worker processes per rank (persistent; 0 = in the loop)")
    # model
    a("--init", default=None, help="start from this checkpoint in our format (e.g. a converted MMSpeech)")
    a("--preset", choices=["tiny", "base", "large"], default=None,
      help="model size when training from scratch (no --init): default large, demo tiny")
    a("--model", default=None, help="from scratch only: Config fields over the preset, comma-separated KEY=VALUE, "
      "e.g. 'd_model=256,encoder_layers=8,text_join_layer=2' (see image.Config; demo "
      "'subsample_channels=16')")
    a("--dropout", type=float, default=None, help="override the model config's dropout (demo 0)")
    a("--no-modality-embedding", action="store_true", help="ablation (Table 3): no modality-absence feature")
    a("--mask-pseudo", action="store_true", help="ablation (Table 3): key-pad pseudo inputs instead of attending")
    a("--ctc-weight", type=float, default=None, help="weight of an auxiliary CTC phone loss on the speech frames "
      "(default 0 = the paper; MMSpeech's own fine-tuning uses 1.0; demo 0.5: from scratch the decoder otherwise "
      "learns to ignore the speech)")
    a("--decode-ctc-weight", type=float, default=None, help="SNER search: joint CTC/attention weight of the phone "
      "CTC head (decode.py --ctc-weight), for evaluation and saved as the checkpoint's default (default 0.5 when "
      "--ctc-weight > 0, else 0 = decoder only)")
    a("--official", action="store_true", help="the official code's settings: lr 2e-5, coin mix, pseudo length 50, "
      "beam 3")
    # optimisation
    a("--epochs", type=int, default=None, help="training epochs (default 50; demo 14, cut by "
      "--max-minutes)")
    a("--batch-size", type=int, default=None, help="global batch of one optimizer step (default 12; demo 16)")
    a("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step and rank")
    a("--lr", type=float, default=None, help="peak learning rate (default 1e-5; --official 2e-5; demo 2e-3)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay, on parameters with ndim >= 2 only")
    a("--beta2", type=float, default=0.999, help="AdamW beta2")
    a("--warmup", type=float, default=None, help="linear warm-up: fraction of the steps if < 1, else steps "
      "(default 0.1; demo 200 steps)")
    a("--schedule", choices=["constant", "linear"], default=None, help="after warm-up: constant (default) or "
      "linear decay to 0 (demo)")
    a("--clip", type=float, default=1.0, help="gradient-norm clipping threshold; 0 disables")
    a("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: --epochs decides)")
    a("--max-minutes", type=float, default=None, help="stop training after this many minutes since start, then "
      "evaluate (0 = no limit; demo 13)")
    a("--max-bad-steps", type=int, default=20, help="stop after this many non-finite losses in a row")
    a("--seed", type=int, default=42, help="random seed: model init, data order, tasks, dropout, --train-size")
    # precision / speed
    a("--device", default=None, help="cpu | cuda | cuda:N (default: the LOCAL_RANK GPU if there is one, else cpu)")
    a("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=None, help="autocast dtype; auto = bf16 on GPUs "
      "that support it, fp16 with a gradient scaler on older GPUs, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the training forward (GPU; the first batches of each "
      "new shape recompile). Checkpoints never carry compile prefixes")
    # evaluation
    a("--eval-every", default=None, help="dev evaluation every N steps ('500') or N epochs ('1e', default); "
      "0 = only at the end (demo)")
    a("--eval-limit", type=int, default=None, help="evaluate on the first N dev sentences only (0 = all; demo 100)")
    a("--eval-batch-size", type=int, default=32, help="sentences per evaluation batch")
    a("--beam", type=int, default=None, help="beam size of the evaluation search (default 5; --official 3)")
    a("--greedy", action="store_true", help="evaluate with greedy search (= --beam 1)")
    a("--evaluator", choices=["ours", "official"], default="ours", help="entity scorer whose P/R/F1 select best.pt "
      "(decode.py); the other one's F1 is logged too")
    a("--eval-test", action="store_true", default=None, help="evaluate best.pt on the test split at the end "
      "(demo: on)")
    # output
    a("--out", default=None, help="output folder (default runs/<dataset>)")
    a("--resume", action="store_true", help="continue exactly from OUT/last.pt")
    a("--save-every", type=int, default=0, help="also write last.pt every N optimizer steps (0 = at evaluations)")
    a("--log-every", type=int, default=10, help="progress-bar loss/lr/throughput refresh, in steps")
    args = p.parse_args(argv)

    # resolve preset defaults: explicit flag > demo > official > paper (preset-controlled flags default to None)
    explicit = {key for key, value in vars(args).items() if value is not None}
    for preset in [PAPER] + ([OFFICIAL] if args.official else []) + ([DEMO] if args.dataset == "demo" else []):
        for key, value in preset.items():
            if key not in explicit:
                setattr(args, key, value)
    if args.greedy:
        args.beam = 1
    if not 0.0 <= args.entity_swap <= 1.0:
        p.error(f"--entity-swap must be a probability in [0, 1] (got {args.entity_swap})")
    if args.decode_ctc_weight is not None and args.decode_ctc_weight < 0:
        p.error(f"--decode-ctc-weight must be >= 0 (got {args.decode_ctc_weight})")
    # checks that argparse cannot do
    tasks = tuple(t.strip().upper() for t in args.tasks.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks {args.tasks!r}: " + (f"unknown task(s) {', '.join(bad)}" if bad else "no task named")
                + f"; choose from {','.join(TASKS)}")
    args.tasks = tasks
    if args.device is not None:
        try:
            args.device = decode.parse_device(args.device)
        except files.InputError as e:
            p.error(str(e))
    if args.dataset != "demo" and args.data_dir is None:
        p.error(f"--data-dir is required for --dataset {args.dataset}")
    try:
        args.model = parse_model_overrides(args.model or "")
    except ValueError as e:
        p.error(f"--model: {e}")
    if args.model and "model" in explicit and (args.init is not None or args.resume):
        p.error("--model changes the architecture, so it only applies to a model trained from scratch (no --init, "
                "no --resume: a resumed run keeps its checkpoint's config)")
    if args.init is not None:
        try:  # a folder, a missing file or not a torch.save file: said now, not after loading the corpus
            weights.check_checkpoint_path(args.init, "--init")
        except files.InputError as e:
            p.error(str(e))
    for name in ("epochs", "batch_size", "grad_accum", "beam", "pseudo_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (0 < args.lr < math.inf and 0 <= args.warmup < math.inf):  # NaN fails both comparisons
        p.error(f"--lr must be > 0 and --warmup >= 0, both finite (got {args.lr}, {args.warmup})")
    try:
        speeds = tuple(float(s) for s in args.speeds.split(","))
    except ValueError:
        speeds = ()
    if not speeds or not all(0.5 <= s <= 2.0 for s in speeds):
        p.error(f"--speeds: expected comma-separated factors in [0.5, 2], got {args.speeds!r}")
    args.speeds = speeds
    ev = str(args.eval_every).strip().lower()
    try:
        args.eval_unit, args.eval_n = ("epoch", int(ev[:-1])) if ev.endswith("e") else ("step", int(ev))
    except ValueError:
        p.error(f"--eval-every: expected N (steps) or Ne (epochs), got {args.eval_every!r}")
    args.out = args.out or f"runs/{args.dataset}"
    return args


# ----------------------------------------------------------------------------------------------------------
# small pieces


def lr_at(step, total_steps, warmup_steps, peak, schedule):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or linear decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "linear":
        return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return peak


def make_optimizer(model, args, device):
    """AdamW; weight decay on tensors with ndim >= 2 (matrices, embeddings, conv kernels), none on biases/gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=args.lr, betas=(0.9, args.beta2), eps=1e-8)
    try:  # fused kernel where this torch has it for the device (CUDA; CPU since 2.4)
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def resolve_precision(name, device):
    """-> (name, autocast context, GradScaler)."""
    if name == "auto":
        name = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return name, autocast, scaler


def rng_state():
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def append_jsonl(record, path):
    """Append one JSON line, rewriting the (small) file atomically."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    files.write_atomic(path, old + json.dumps(record, ensure_ascii=False) + "\n")


# what --resume needs beyond the model: best.pt has none of it
RESUME_KEYS = ("optimizer", "step", "epoch", "batch_in_epoch", "best_f1", "rng", "world_size", "micro_batch")


def load_last(path):
    """OUT/last.pt for --resume; a missing, unreadable or wrong kind of file is an InputError naming it."""
    if not path.is_file():
        raise files.InputError(f"--resume: no checkpoint {path}" + (" (a folder)" if path.is_dir() else ""))
    ckpt = weights.load_torch_file(str(path), "--resume checkpoint")
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise files.InputError(f"{path}: not a last.pt written by train.py (no {', '.join(missing)}; best.pt keeps "
                               "only the model, --resume needs the run's last.pt)")
    return weights.migrate(ckpt, str(path))


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
            rows = batch["ctc_lengths"] > 0
            if rows.any():
                logp, frames = self.model.speech_phone_log_probs(enc, batch["fbank"].size(1))  # (B, T', C), (B,)
                ctc = F.ctc_loss(logp[rows].transpose(0, 1), batch["ctc_phones"][rows], frames[rows],
                                 batch["ctc_lengths"][rows], blank=0, reduction="sum", zero_infinity=True)
                loss = loss + self.ctc_weight * ctc
        return loss


# ----------------------------------------------------------------------------------------------------------
# adapters to the other files (data.py, image.py, weights.py, decode.py, demo.py)


def load_corpus(args, master, barrier):
    """-> train, dev, test sample lists (test None unless --eval-test). The demo corpus is built once (rank 0)."""
    data_dir = args.data_dir
    if args.dataset == "demo" and data_dir is None:
        if master:
            demo.ensure_demo_corpus(progress=True)
        barrier()
        data_dir = demo.ensure_demo_corpus(progress=False)
    load = lambda split, dataset=args.dataset: data.load_split(dataset, data_dir, split, audio_dir=args.audio_dir,
                                                               verbose=master)
    train, dev = load("train"), load("dev", args.dev_dataset or args.dataset)
    test = load("test", args.dev_dataset or args.dataset) if args.eval_test else None
    for split, samples in (("train", train), ("dev", dev), ("test", test)):
        if samples is not None and not samples:  # would train nothing, or choose best.pt on 0 sentences
            raise files.InputError(f"{samples.report['file']}: no sentences in the {split} split")
    if args.train_size:
        if args.train_size > len(train):
            raise files.InputError(f"--train-size {args.train_size} > {len(train)} training sentences in "
                                   f"{train.report['file']}")
        keep = sorted(random.Random(args.seed).sample(range(len(train)), args.train_size))
        train = [train[i] for i in keep]
    return train, dev, test


def corpus_tasks(train, dev, requested, log):
    """-> (training tasks or None, evaluation tasks). Without audio: TNER only (said once). With audio for part of
    the corpus, SNER/MNER train and score on those sentences only (data.make_loader, decode.evaluate_split)."""
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


def parse_model_overrides(text: str) -> dict:
    """'d_model=256,encoder_layers=8' -> {'d_model': 256, 'encoder_layers': 8}, typed by image.Config's fields."""
    fields = {f.name: f.type for f in dataclasses.fields(image.Config)}
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = fields[key] if isinstance(fields[key], str) else fields[key].__name__
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


def build_model(args, train, resume_ckpt, log):
    """-> (model on CPU, assets). Order: --resume state > --init checkpoint > --preset from scratch."""
    overrides = {}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.no_modality_embedding:
        overrides["use_modality_embedding"] = False
    if args.mask_pseudo:
        overrides["mask_pseudo"] = True
    if resume_ckpt is not None:
        model, assets = weights.model_from_checkpoint(resume_ckpt, "cpu", "last.pt"), resume_ckpt["assets"]
    elif args.init is not None:
        ckpt = weights.read_checkpoint(args.init, "--init checkpoint")
        model, assets = weights.model_from_checkpoint(ckpt, "cpu", args.init, **overrides), ckpt["assets"]
        log(f"initialised from {args.init}")
    else:
        assets = data.assets_for_scratch(train)
        try:
            config = getattr(image.Config, args.preset)(**{**args.model, "vocab_size": len(assets["vocab"]),
                                                           "phone_vocab_size": len(assets["phones"]), **overrides})
        except ValueError as e:
            raise files.InputError(f"--model {args.model}: {e}") from None
        model = image.IMAGE(config)
        changed = f" with {args.model}" if args.model else ""
        log(f"training a {args.preset} model{changed} from scratch (vocabulary {len(assets['vocab'])} from the "
            "training text)")
    model = model.float().train()  # float32 master weights whatever the file stores
    return model, assets


def evaluate(model, samples, featurizer, assets, tasks, args, device, autocast):
    """Dev/test scores -> {task: {"p", "r", "f1"}} (percent), decode.py's batched search and evaluator."""
    options = search.DecodeOptions(beam=args.beam)   # the other settings: assets["decoding"] (ctc_weight, ...)
    model.eval()
    with torch.no_grad(), autocast:
        scores = decode.evaluate_split(model, samples, featurizer, tasks=tasks, options=options,
                                       batch_size=args.eval_batch_size, evaluator=args.evaluator,
                                       device=device, assets=assets)
    model.train()
    other = "official" if args.evaluator == "ours" else "ours"
    return {t: {"p": s["p"], "r": s["r"], "f1": s["f1"], f"f1_{other}": s[other]["f1"], "cer": s["cer"]}
            for t, s in scores.items()}


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    with files.cli_errors("train.py"):  # bad inputs: one line; bugs keep their traceback
        train(args)


def train(args):
    t_start = time.time()

    # --- distributed setup (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK) ---
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:  # plain "cuda": this rank's GPU
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ddp = world > 1
    if ddp:  # long timeout: rank 0 evaluates alone while the others wait at a barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.batch_size % (world * args.grad_accum):
        raise files.InputError(f"--batch-size {args.batch_size} must be divisible by world size {world} x "
                               f"--grad-accum {args.grad_accum}")
    micro_batch = args.batch_size // (world * args.grad_accum)
    out = Path(args.out)
    if master:  # before any work: a run must not train for hours and then fail at its first write
        files.check_output_dir(out, "--out")
        for name in ("last.pt", "best.pt", "metrics.jsonl"):
            files.check_output_file(out / name, "--out")
            files.remove_stale_temps(out / name)  # of a killed run

    resume_ckpt = load_last(out / "last.pt") if args.resume else None

    # --- data and model ---
    seed_everything(args.seed)  # model init identical on every rank
    barrier = dist.barrier if ddp else (lambda: None)
    train_samples, dev_samples, test_samples = load_corpus(args, master, barrier)
    train_tasks, eval_tasks = corpus_tasks(train_samples, dev_samples, args.tasks, log)
    if train_tasks is None:
        raise files.InputError(f"--tasks {','.join(args.tasks)}: none of them can be trained without audio")
    if not args.resume and master and (out / "last.pt").exists():  # only now that the inputs are known good
        log(f"note: starting fresh in {out}; its last.pt/best.pt/metrics.jsonl are replaced (--resume continues)")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if args.mix == "coin" and set(train_tasks) != set(TASKS):
        log(f"note: the coin mix needs all three tasks; training {','.join(train_tasks)} with the uniform mix")
        args.mix = "uniform"
    if args.eval_limit:
        dev_samples = dev_samples[:args.eval_limit]
    model, assets = build_model(args, train_samples, resume_ckpt, log)
    if args.decode_ctc_weight is None:
        args.decode_ctc_weight = 0.5 if args.ctc_weight else 0.0
    assets["decoding"] = {**assets.get("decoding", {}), "ctc_weight": args.decode_ctc_weight}
    assets["pseudo_text_len"] = args.pseudo_len  # part of the checkpoint: decoding needs the same pseudo text
    featurizer = data.Featurizer(assets, pseudo_text_len=args.pseudo_len, cache_dir=args.feature_cache)
    loader = data.make_loader(
        train_samples, featurizer, micro_batch, train=True, task_mix=args.mix, tasks=train_tasks, seed=args.seed,
        num_workers=args.workers, rank=rank, world_size=world, speeds=args.speeds,
        ctc_classes=model.config.phone_dict_size - 3 if args.ctc_weight else 0,
        entity_swap=data.EntitySwap(train_samples, args.entity_swap, args.seed) if args.entity_swap else None)
    steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = round(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)

    raw_model = model.to(device)  # the un-wrapped model: checkpoints come from here (no _orig_mod./module.)
    optimizer = make_optimizer(raw_model, args, device)
    dtype_name, autocast, scaler = resolve_precision(args.dtype, device)
    objective = Objective(raw_model, args.ctc_weight)
    if args.compile:
        objective = torch.compile(objective)
    if ddp:
        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)

    step, epoch, batch_in_epoch, best_f1, bad_steps, last_loss = 0, 0, 0, -1.0, 0, float("nan")
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        step, epoch, batch_in_epoch = resume_ckpt["step"], resume_ckpt["epoch"], resume_ckpt["batch_in_epoch"]
        best_f1 = resume_ckpt["best_f1"]
        if resume_ckpt["world_size"] != world or resume_ckpt["micro_batch"] != micro_batch:
            log("warning: world size or micro-batch changed since the checkpoint: the run continues, not exactly")
        log(f"resumed from {out / 'last.pt'} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    n_params = sum(p.numel() for p in raw_model.parameters())
    log("config:", json.dumps({**{k: v for k, v in vars(args).items()}, "world_size": world, "device": str(device),
                                "dtype": dtype_name, "micro_batch": micro_batch, "train_tasks": train_tasks,
                                "eval_tasks": eval_tasks, "train_sentences": len(train_samples),
                                "dev_sentences": len(dev_samples), "steps_per_epoch": steps_per_epoch,
                                "total_steps": total_steps, "warmup_steps": warmup_steps,
                                "parameters": n_params}, ensure_ascii=False, default=str))

    def checkpoint(kind):
        """last.pt: everything --resume needs; best.pt: model + assets only. RNG states of every rank."""
        states = [rng_state()]
        if ddp and kind == "last":  # collective: every rank calls checkpoint("last")
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if not master:
            return
        source = {"trainer": "train.py", "step": step,
                  "args": {k: v if isinstance(v, (int, float, bool, str, type(None))) else str(v)
                           for k, v in vars(args).items()}}
        if kind == "best":
            ckpt = weights.make_checkpoint(raw_model.config, raw_model.state_dict(), assets, source, best_f1=best_f1)
            weights.save_checkpoint(ckpt, str(out / "best.pt"))
            return
        ckpt = weights.make_checkpoint(
            raw_model.config, raw_model.state_dict(), assets, source, optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else {},
            scheduler={"kind": args.schedule, "warmup_steps": warmup_steps, "total_steps": total_steps},
            step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, best_f1=best_f1, rng=states, world_size=world,
            micro_batch=micro_batch, seed=args.seed, loss=last_loss)
        weights.save_checkpoint(ckpt, str(out / "last.pt"))

    def run_eval(split, samples, tag):
        scores = {}
        if master:
            scores = evaluate(raw_model, samples, featurizer, assets, eval_tasks, args, device, autocast)
            record = {"split": split, **scores, "mean_f1": sum(s["f1"] for s in scores.values()) / len(scores),
                      "step": step, "epoch": round(epoch + batch_in_epoch / max(1, len(loader)), 3),
                      "checkpoint": tag, "minutes": round((time.time() - t_start) / 60, 2)}
            append_jsonl(record, out / "metrics.jsonl")
            tqdm.write(f"[{split} @ step {step}] " + "  ".join(f"{t} F1 {s['f1']:.2f}" for t, s in scores.items()))
        return scores

    def stop_everywhere(flag):  # every rank must leave the loop at the same step
        if not ddp:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # --- training loop ---
    # redirected to a file: a line every 30 s, not every 0.1 s
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    raw_model.train()
    epoch_seed = lambda e: args.seed * 1_000_003 + e * 1_009 + rank  # dropout/data streams: f(seed, epoch, rank)
    evaluated_at, loss_window, t_window, n_window = -1, [], time.time(), 0
    budget_s = args.max_minutes * 60 if args.max_minutes else float("inf")
    stop = step >= total_steps
    while not stop:
        # Data order and dropout of an epoch derive from (seed, epoch, rank). On resume the epoch's iterator is
        # rebuilt from the same seed, the finished batches are skipped, then the RNG states saved at that step
        # are restored: the continuation is bit-identical to an uninterrupted run.
        seed_everything(epoch_seed(epoch))
        loader.set_epoch(epoch)
        batches = loader.batches(start=batch_in_epoch)
        if resume_ckpt is not None:
            set_rng_state(resume_ckpt["rng"][rank] if len(resume_ckpt["rng"]) == world else resume_ckpt["rng"][0])
            resume_ckpt = None
        while True:
            micro = [b for _, b in zip(range(args.grad_accum), batches)]
            if not micro:
                break
            micro = [to_device(b, device) for b in micro]
            lr = lr_at(step, total_steps, warmup_steps, args.lr, args.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            tokens = sum((b["target"] != PAD).sum() for b in micro).float()
            if ddp:  # normalise by the global token count: DDP then equals one big batch
                dist.all_reduce(tokens)
            step_loss = torch.zeros((), device=device)
            for i, b in enumerate(micro):
                sync = i == len(micro) - 1
                with (objective.no_sync() if ddp and not sync else nullcontext()):
                    with autocast:
                        loss_sum = objective(b)
                    scaler.scale(loss_sum * world / tokens).backward()  # DDP averages over ranks
                step_loss += loss_sum.detach()
            if ddp:
                dist.all_reduce(step_loss)
            step_loss = last_loss = (step_loss / tokens).item()
            if math.isfinite(step_loss):
                bad_steps = 0
                if args.clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
                scaler.step(optimizer)
                scaler.update()
            else:  # skip the update; all ranks see the same all-reduced loss
                bad_steps += 1
                if master:
                    warnings.warn(f"step {step}: non-finite loss {step_loss}, update skipped "
                                  f"({bad_steps}/{args.max_bad_steps} in a row)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch += len(micro)
            if bad_steps >= args.max_bad_steps:
                raise SystemExit(f"stopping: {bad_steps} consecutive non-finite losses (lower --lr, try --dtype fp32)")

            # progress
            loss_window.append(step_loss)
            n_window += sum(len(b["target"]) for b in micro) * world
            if master and (step % args.log_every == 0 or step == total_steps):
                dt = time.time() - t_window
                bar.set_postfix(loss=f"{sum(loss_window) / len(loss_window):.4f}", lr=f"{lr:.2e}",
                                samples_s=f"{n_window / max(dt, 1e-9):.1f}")
                loss_window, t_window, n_window = [], time.time(), 0
            bar.update(1)

            end_of_epoch = batch_in_epoch >= len(loader)
            stop = step >= total_steps or stop_everywhere(time.time() - t_start > budget_s)
            due = (args.eval_unit == "step" and args.eval_n and step % args.eval_n == 0) or \
                  (args.eval_unit == "epoch" and args.eval_n and end_of_epoch and (epoch + 1) % args.eval_n == 0)
            if due or stop:
                scores = run_eval("dev", dev_samples, "current")
                evaluated_at = step
                improved = master and scores and sum(s["f1"] for s in scores.values()) / len(scores) > best_f1
                if improved:
                    best_f1 = sum(s["f1"] for s in scores.values()) / len(scores)
                if master and (improved or not (out / "best.pt").exists()):
                    checkpoint("best")
                checkpoint("last")
                if ddp:
                    dist.barrier()
            elif args.save_every and step % args.save_every == 0:
                checkpoint("last")
            if stop:
                break
        if not stop:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()

    # --- final evaluation: best.pt on the test split ---
    if evaluated_at != step and step > 0:  # resumed after the end: make sure the final dev scores exist
        run_eval("dev", dev_samples, "current")
    if args.eval_test and master:
        best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
        raw_model.load_state_dict(best["model"])
        scores = run_eval("test", test_samples, "best.pt")
        search = "greedy" if args.beam == 1 else f"beam {args.beam}"
        log(f"\ntest split, best.pt (step {best['source']['step']}, best mean dev F1), {search}:")
        log(format_table(scores, eval_tasks))
    log(f"done in {(time.time() - t_start) / 60:.1f} min; outputs in {out}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
