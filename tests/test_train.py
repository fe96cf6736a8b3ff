"""train.py on CPU: tiny model, a tiny corpus written by the tests (CNERTA JSON + short noise wavs)."""
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import shutil
import sys
import time
import wave
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import devices  # noqa: E402
import train  # noqa: E402
import weights  # noqa: E402
from numerics import EPS, K, excess, fp32_tol, model_terms  # noqa: E402

PER = ["张伟", "李娜", "王芳", "刘洋", "陈静", "赵磊"]
LOC = ["北京", "上海", "广州", "杭州", "成都"]
ORG = ["新华社", "清华大学", "人民医院", "华为公司"]
TEMPLATES = ["{PER}在{LOC}工作", "{PER}去了{ORG}", "{ORG}位于{LOC}", "今天{LOC}下雨了", "{PER}和{PER}见面"]


def sentence(rng):
    text, entities = "", []
    for piece in rng.choice(TEMPLATES).replace("}", "{").split("{"):
        if piece in ("PER", "LOC", "ORG"):
            name = rng.choice(globals()[piece])
            entities.append([len(text), len(text) + len(name), name, piece])
            text += name
        else:
            text += piece
    return text, entities


def write_corpus(root, n_train=24, n_dev=3, n_test=3, audio=True, seed=0):
    """CNERTA-layout corpus; with audio every utterance gets a 1-1.5 s noise wav under root/wav."""
    rng, gen, root = random.Random(seed), torch.Generator().manual_seed(seed), Path(root)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    for split, name, n in (("train", "train.json", n_train), ("dev", "valid.json", n_dev), ("test", "test.json", n_test)):
        lines = []
        for i in range(n):
            text, entities = sentence(rng)
            utt = f"T{split}{i:04d}"
            lines.append(json.dumps({"sentence": text, "audio": utt, "entity": entities}, ensure_ascii=False))
            if audio:
                with wave.open(str(root / "wav" / f"{utt}.wav"), "wb") as w:
                    w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
                    noise = torch.randint(-800, 800, (rng.randint(16000, 24000),), generator=gen, dtype=torch.int16)
                    w.writeframes(noise.numpy().tobytes())
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def base_args(corpus, out, *extra):
    return ["--dataset", "cnerta", "--data-dir", str(corpus), "--preset", "tiny", "--lr", "2e-3", "--dtype", "fp32",
            "--device", "cpu", "--greedy", "--out", str(out), "--log-every", "1", *map(str, extra)]


def run(argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------
# recipe pieces


def test_lr_schedule_warmup_then_constant_or_linear():
    lrs = [train.lr_at(s, 100, 10, 1e-3, "constant") for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(lr == 1e-3 for lr in lrs[10:])
    lin = [train.lr_at(s, 100, 10, 1e-3, "linear") for s in range(100)]
    assert lin[10] == pytest.approx(1e-3) and lin[99] == pytest.approx(1e-3 / 90)
    assert all(a > b for a, b in zip(lin[10:], lin[11:]))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    args = train.get_args(["--dataset", "demo", "--weight-decay", "0.05"])
    opt = train.make_optimizer(model, args, torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {p.dim() for p in decayed["params"]} == {2} and {p.dim() for p in plain["params"]} == {1}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def paper_model_is_plain():
    return train.get_args(["--dataset", "cnerta", "--data-dir", "x"]).model == {}


def test_presets_and_explicit_flags():
    demo = train.get_args(["--dataset", "demo"])
    assert (demo.preset, demo.lr, demo.eval_test, demo.dtype) == ("tiny", train.DEMO["lr"], True, "fp32")
    assert demo.model == {"subsample_channels": 16} and paper_model_is_plain()
    assert (demo.noise, demo.noise_snr_db, demo.noise_margin, demo.noise_margin_epochs) == (0.5, (0.0, 30.0), 0.2, 3)
    assert train.get_args(["--dataset", "demo", "--noise-snr-db=-5,20"]).noise_snr_db == (-5.0, 20.0)
    # demo utterances start on their first syllable: a model trained without noise before them snaps long
    # recordings' pieces to it; the demo recipe's (margins in its last 3 epochs) need not
    assert train.demo.onset_lead(demo.dataset, demo.noise_margin) is None
    bare = train.get_args(["--dataset", "demo", "--noise-margin", "0"])
    assert train.demo.onset_lead(bare.dataset, bare.noise_margin) == 0.0
    assert train.demo.onset_lead("cnerta", 0.0) is None
    with pytest.raises(SystemExit):
        train.get_args(["--dataset", "demo", "--noise-margin-epochs", "-1"])
    wide = train.get_args(["--dataset", "demo", "--model", "d_model=96"])   # an explicit --model replaces the demo's
    assert wide.model == {"d_model": 96}
    paper = train.get_args(["--dataset", "cnerta", "--data-dir", "x"])
    assert demo.tasks == ("TNER", "SNER", "SNER", "MNER") and paper.tasks == train.TASKS
    assert (paper.lr, paper.batch_size, paper.epochs, paper.mix, paper.pseudo_len, paper.beam) == \
        (1e-5, 12, 50, "uniform", 40, 5)
    assert (paper.warmup, paper.schedule, paper.eval_test) == (0.1, "constant", False)
    official = train.get_args(["--dataset", "cnerta", "--data-dir", "x", "--official"])
    assert (official.lr, official.mix, official.pseudo_len, official.beam) == (2e-5, "coin", 50, 3)
    mine = train.get_args(["--dataset", "demo", "--official", "--lr", "3e-4", "--beam", "2"])
    assert (mine.lr, mine.beam, mine.mix) == (3e-4, 2, "coin")  # explicit flags beat every preset


def test_the_recipe_and_every_setting_it_changed_are_said():
    line = train.recipe_line(train.get_args(["--dataset", "demo", "--lr", "1e-3"]))
    assert line.startswith("recipe demo: tasks TNER,SNER,SNER,MNER (paper TNER,SNER,MNER), epochs 14 (50), ")
    assert "dtype fp32 (auto)" in line and " lr " not in line   # an explicit flag is not the recipe's doing
    chosen = train.get_args(["--dataset", "cnerta", "--data-dir", "x", "--recipe", "demo"])
    implied = train.get_args(["--dataset", "demo", "--data-dir", "x"])
    assert vars(chosen) == {**vars(implied), "dataset": "cnerta", "out": "runs/cnerta", "recipe": "demo"}
    assert train.recipe_line(train.get_args(["--dataset", "demo", "--recipe", "paper"])) == \
        "recipe paper: no setting changed from the paper's"
    assert train.get_args(["--dataset", "cnerta", "--data-dir", "x", "--official"]).recipe_changes == \
        {"lr": (2e-5, 1e-5), "mix": ("coin", "uniform"), "pseudo_len": (50, 40), "beam": (3, 5)}


@pytest.mark.parametrize("argv", [["--dataset", "cnerta"],                      # no --data-dir
                                  ["--dataset", "demo", "--tasks", "TNER,XNER"],
                                  ["--dataset", "demo", "--batch-size", "0"],
                                  ["--dataset", "demo", "--eval-every", "e3"],
                                  ["--dataset", "demo", "--speeds", "0.9,fast"],
                                  ["--dataset", "demo", "--init", "/nonexistent.pt"],
                                  ["--dataset", "demo", "--model", "d_model=abc"],
                                  ["--dataset", "demo", "--model", "width=128"],
                                  ["--dataset", "demo", "--model", "d_model=128", "--resume"],
                                  ["--dataset", "demo", "--decode-ctc-weight", "-1"],
                                  ["--dataset", "demo", "--entity-swap", "1.5"],
                                  ["--dataset", "demo", "--noise", "-0.1"],
                                  ["--dataset", "demo", "--noise-snr-db", "5"],
                                  ["--dataset", "demo", "--noise-margin", "-0.5"],
                                  ["--dataset", "demo", "--noise-snr-db", "30,5"],
                                  ["--dataset", "demo", "--noise-snr-db=-inf,20"],
                                  ["--dataset", "demo", "--max-frames", "-300"],
                                  ["--dataset", "demo", "--max-frames", "lots"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        train.get_args(argv)
    assert "error" in capsys.readouterr().err


def test_max_frames_is_auto_or_a_number():
    assert train.get_args(["--dataset", "demo"]).max_frames == "auto"
    assert train.get_args(["--dataset", "demo", "--max-frames", "0"]).max_frames == 0


def test_every_flag_has_help():
    import argparse
    seen = []
    orig = argparse.ArgumentParser.add_argument

    def spy(self, *a, **k):
        seen.append((a, k.get("help")))
        return orig(self, *a, **k)
    argparse.ArgumentParser.add_argument = spy
    try:
        train.get_args(["--dataset", "demo"])
    finally:
        argparse.ArgumentParser.add_argument = orig
    assert len(seen) > 40 and all(h for a, h in seen if a != ("-h", "--help")), [a for a, h in seen if not h]


def test_mix_ratio_uniform_is_one_third_each_and_redrawn_per_epoch(corpus):
    samples = data.load_split("cnerta", corpus, "train", verbose=False)
    assert len(samples) % 3 == 0 and all(s.audio for s in samples)
    featurizer = data.Featurizer(weights.assets_for_scratch(samples))
    loader = data.Loader(samples, featurizer, 4, train=True, task_mix="uniform", seed=1)
    tasks_by_epoch = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = {}  # sample index -> task, from the batches the model gets (presence flags)
        for plan, (batch,) in zip(loader.batch_plan(), loader, strict=True):   # one micro-batch a step
            for (i, _, _), s, t in zip(plan, batch["speech_present"].tolist(), batch["text_present"].tolist()):
                seen[i] = {(False, True): "TNER", (True, False): "SNER", (True, True): "MNER"}[(s, t)]
        assert sorted(seen) == list(range(len(samples)))  # every sample once per epoch
        counts = [list(seen.values()).count(t) for t in data.TASKS]
        assert counts == [len(samples) // 3] * 3, counts
        tasks_by_epoch.append([seen[i] for i in range(len(samples))])
    assert tasks_by_epoch[0] != tasks_by_epoch[1] != tasks_by_epoch[2]


def test_a_task_named_twice_is_dealt_twice_as_often(corpus):
    """The demo's --tasks TNER,SNER,SNER,MNER: every sample once per epoch, tasks 1:2:1 (up to one of rounding)."""
    samples = data.load_split("cnerta", corpus, "train", verbose=False)
    loader = data.Loader(samples, data.Featurizer(weights.assets_for_scratch(samples)), 4, train=True,
                              task_mix="uniform", tasks=train.get_args(["--dataset", "demo"]).tasks, seed=3)
    loader.set_epoch(0)
    tasks = [task for batch in loader.batch_plan() for _, task, _ in batch]
    assert len(tasks) == len(samples)
    n = len(samples) / 4
    assert all(abs(tasks.count(t) - k * n) <= 1 for t, k in (("TNER", 1), ("SNER", 2), ("MNER", 1))), tasks


def test_mix_ratio_coin_is_a_quarter_each():
    wav = str(ROOT / "tests" / "fixtures" / "wavs" / "utt000.wav")
    samples = [data.Sample(f"u{i}", "张伟在北京", [], wav) for i in range(3000)]
    featurizer = data.Featurizer(weights.assets_for_scratch(samples))
    loader = data.Loader(samples, featurizer, 10, train=True, task_mix="coin", seed=0)
    tasks = [t for b in loader.batch_plan() for _, t, _ in b]
    for task in data.TASKS + (data.NEITHER,):
        assert abs(tasks.count(task) / len(tasks) - 0.25) < 0.04, (task, tasks.count(task))


def test_a_few_steps_lower_the_loss(corpus):
    args = train.get_args(base_args(corpus, "unused", "--dropout", "0"))
    samples = data.load_split("cnerta", corpus, "train", verbose=False)
    torch.manual_seed(0)
    model, assets = train.build_model(args, samples, None, lambda *a: None)
    loader = data.Loader(samples, data.Featurizer(assets), 8, train=True, seed=0)
    batches = [b for (b,), _ in zip(loader, range(2))]                    # one micro-batch a step
    optimizer = train.make_optimizer(model, args, torch.device("cpu"))
    objective = train.Objective(model)

    def mean_loss():
        with torch.no_grad():
            return sum(objective(b).item() / (b["target"] != 1).sum().item() for b in batches)
    before = mean_loss()
    for _ in range(6):
        for b in batches:
            (objective(b) / (b["target"] != 1).sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
    after = mean_loss()
    assert after < 0.8 * before, (before, after)


# ----------------------------------------------------------------------------------------------------------
# whole runs (subprocesses)


def test_resume_after_sigkill_reaches_the_same_weights(corpus, tmp_path):
    # dropout on (RNG must be restored), grad accumulation, speed perturbation, entity swaps, 6 steps per epoch,
    # 3 epochs
    argv = ["train.py", *base_args(corpus, "", "--epochs", "3", "--batch-size", "4", "--grad-accum", "2",
                                   "--save-every", "1", "--eval-every", "0", "--ctc-weight", "0.5",
                                   "--entity-swap", "0.5")]
    argv_for = lambda out: [a if a else str(out) for a in argv]  # "" marks --out's value
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    uninterrupted = subprocess.Popen([sys.executable, *argv_for(straight)], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # runs alongside
    proc = subprocess.Popen([sys.executable, *argv_for(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step, deadline = 0, time.time() + 240
    while step < 8 and time.time() < deadline and proc.poll() is None:  # kill inside epoch 1 (steps 6..11)
        time.sleep(0.01)
        if (killed / "last.pt").exists():
            step = load(killed / "last.pt")["step"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = load(killed / "last.pt")
    assert 8 <= at_kill["step"] < 18 and at_kill["step_in_epoch"] > 0, (at_kill["step"], at_kill["step_in_epoch"])
    r = run(argv_for(killed) + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    assert "resumed from" in r.stdout
    a, b = load(straight / "last.pt"), load(killed / "last.pt")
    assert a["assets"]["decoding"]["ctc_weight"] == 0.5       # trained with CTC: SNER decodes jointly by default
    assert a["assets"]["decoding"]["onset_lead_seconds"] is None   # CNERTA: long recordings' pieces as planned
    assert a["step"] == b["step"] == 18
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # our checkpoint format, loadable by decode.py, no compile/DDP prefixes
    assert a["format"] == "image-checkpoint" and not any(k.startswith(("_orig_mod.", "module.")) for k in a["model"])
    model, assets, _ = weights.load_checkpoint(str(straight / "best.pt"))
    assert assets["vocab"] == a["assets"]["vocab"]
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["split"] == "dev" and set(data.TASKS) <= set(metrics[-1])
    assert all(0 <= metrics[-1][t]["f1"] <= 100 for t in data.TASKS)


def test_resume_with_another_split_continues_on_the_same_steps(corpus, tmp_path, capsys, monkeypatch):
    """2 steps, then --resume with --grad-accum 2 and a frame budget for step 3 = 3 steps straight: step 3 takes the
    same rows (split into other micro-batches), and its loss, computed on the same weights (bit-identical after step
    2), agrees within float32 rounding. Another --batch-size is refused before any data is read."""
    steps, real_step = [], train.train_step

    def recording_step(objective, model, optimizer, scaler, micro, *args):
        steps.append((len(micro), sorted(tuple(row[row != 1].tolist()) for b in micro for row in b["target"])))
        return real_step(objective, model, optimizer, scaler, micro, *args)
    monkeypatch.setattr(train, "train_step", recording_step)
    common = ("--batch-size", "4", "--dropout", "0", "--warmup", "0", "--eval-every", "0", "--eval-limit", "1",
              "--tasks", "TNER,SNER,MNER")
    train.main(base_args(corpus, tmp_path / "straight", *common, "--max-steps", "3"))
    train.main(base_args(corpus, tmp_path / "split", *common, "--max-steps", "2"))
    capsys.readouterr()
    train.main(base_args(corpus, tmp_path / "split", *common, "--max-steps", "3", "--resume", "--grad-accum", "2",
                         "--max-frames", "300"))
    assert "the same steps in the same order" in capsys.readouterr().out
    assert steps[:3] == steps[3:5] + [(steps[2][0], steps[5][1])]    # the same rows at every step ...
    assert steps[2][0] == 1 and steps[5][0] >= 2                        # ... step 3 in more micro-batches
    a, b = load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 3 and b["split"] == {"world_size": 1, "grad_accum": 2, "max_frames": 300}
    assert excess(a["loss"], b["loss"], fp32_tol(a["loss"], model_terms(a["config"]))) <= 1
    with pytest.raises(SystemExit):
        train.main(base_args(corpus, tmp_path / "split", *common, "--resume", "--batch-size", "8"))
    assert "trained with --batch-size 4 (now 8)" in capsys.readouterr().err


def test_resume_after_a_fallback_mix_and_with_another_schedule(corpus, tmp_path, capsys):
    """--mix coin with two tasks falls back to uniform; --resume with the same flags continues (the checkpoint keeps
    the flags as asked for). A longer linear schedule on resume is said: the next steps get other rates."""
    args = ("--mix", "coin", "--tasks", "TNER,SNER", "--batch-size", "4", "--eval-limit", "1", "--schedule", "linear",
            "--warmup", "0")
    train.main(base_args(corpus, tmp_path / "run", *args, "--max-steps", "1"))
    capsys.readouterr()
    train.main(base_args(corpus, tmp_path / "run", *args, "--max-steps", "2", "--resume"))
    out = capsys.readouterr().out
    assert "coin mix needs all three tasks" in out and "resumed from" in out
    assert "the learning-rate schedule differs" in out and load(tmp_path / "run" / "last.pt")["step"] == 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_equal_one_process(corpus, tmp_path):
    """2 ranks x micro-batch 2 vs 1 process x 2 accumulated micro-batches of 2: the same global batches."""
    common = base_args(corpus, "", "--batch-size", "4", "--max-steps", "2", "--dropout", "0", "--eval-every", "0",
                       "--eval-limit", "1", "--tasks", "TNER,SNER,MNER")
    with_out = lambda out: [a if a else str(out) for a in common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.Popen([sys.executable, "train.py", *with_out(tmp_path / "one"), "--grad-accum", "2"], cwd=ROOT,
                           env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # runs alongside
    two = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "train.py", *with_out(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-3000:]
    assert '"world_size": 2' in two.stdout
    a, b = load(tmp_path / "one" / "last.pt"), load(tmp_path / "two" / "last.pt")
    assert b["split"] == {"world_size": 2, "grad_accum": 1, "max_frames": 0} and a["split"]["grad_accum"] == 2
    # Other code paths (gradients all-reduced across ranks vs accumulated), so float32 rounding, not equality.
    # The loss is a model output: n = model_terms. An AdamW step moves a parameter by lr x a ratio of gradients
    # (m / sqrt(v)), whose rounding is relative: k * EPS * sqrt(2 n) for a backward pass; over the 2 steps at
    # lr <= 2e-3, plus one rounding of the parameter itself.
    n = model_terms(a["config"])
    assert math.isfinite(a["loss"]) and excess(a["loss"], b["loss"], fp32_tol(a["loss"], n)) <= 1
    step_tol = 2 * 2e-3 * K * EPS * math.sqrt(2 * n)
    for name in a["model"]:
        assert excess(a["model"][name], b["model"][name], fp32_tol(b["model"][name], 1) + step_tol) <= 1, name


# ----------------------------------------------------------------------------------------------------------
# in-process runs: text-only corpora, non-finite losses


def test_text_only_corpus_trains_and_reports_tner_only(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "text", n_train=8, audio=False)
    train.main(base_args(corpus, tmp_path / "out", "--max-steps", "2", "--batch-size", "4", "--eval-test"))
    out = capsys.readouterr().out
    assert out.count("no audio") == 1
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["split"] for m in metrics] == ["dev", "test"]
    assert all("TNER" in m and "SNER" not in m and "MNER" not in m for m in metrics)
    # --init from our checkpoint, with the Table 3 ablation switches (the modality embedding goes away)
    train.main(base_args(corpus, tmp_path / "ablation", "--max-steps", "1", "--batch-size", "4", "--eval-limit", "1",
                         "--init", tmp_path / "out" / "best.pt", "--no-modality-embedding", "--mask-pseudo"))
    ckpt = load(tmp_path / "ablation" / "last.pt")
    assert ckpt["config"]["use_modality_embedding"] is False and ckpt["config"]["mask_pseudo"] is True
    assert not any("modality" in k for k in ckpt["model"])
    assert ckpt["assets"]["vocab"] == load(tmp_path / "out" / "best.pt")["assets"]["vocab"]


def test_model_overrides_and_a_dev_split_from_another_format(tmp_path, capsys):
    """--model reshapes a from-scratch model; --dev-dataset scores on another format's dev file (the #7 setup:
    train on the official repo's lossy text, score on CNERTA's valid.json, which keeps a nesting the text loses)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.txt").write_text("u1 <(末阳市)文联>主席[张三]\nu2 [李四]在(北京)\nu3 <搜狐>科技>报道\n", encoding="utf-8")
    (d / "valid.txt").write_text("v1 [张三]在(北京)\n", encoding="utf-8")
    valid = [{"sentence": "末阳市文联主席张三", "entity": [[0, 5, "末阳市文联", "ORG"], [0, 3, "末阳市", "LOC"],
                                                      [7, 9, "张三", "PER"]]},
             {"sentence": "李四在北京", "entity": [[0, 2, "李四", "PER"], [3, 5, "北京", "LOC"]]}]
    (d / "valid.json").write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in valid), encoding="utf-8")
    out = tmp_path / "out"
    train.main(["--dataset", "image4imner", "--dev-dataset", "cnerta", "--data-dir", str(d), "--preset", "tiny",
                "--model", "d_model=32,encoder_layers=3,text_join_layer=1,decoder_layers=1,encoder_heads=2",
                "--max-steps", "1", "--batch-size", "3", "--greedy", "--out", str(out), "--dtype", "fp32"])
    log = capsys.readouterr().out
    config = json.loads(log.split("config: ", 1)[1].splitlines()[0])
    assert config["dev_sentences"] == 2 and config["train_sentences"] == 3   # valid.json, not valid.txt
    ckpt = load(out / "last.pt")
    assert (ckpt["config"]["d_model"], ckpt["config"]["encoder_layers"], ckpt["config"]["text_join_layer"]) == (32, 3, 1)
    assert ckpt["model"]["encoder.phone_embed.weight"].shape[1] == 32
    assert list(json.loads(line)["split"] for line in (out / "metrics.jsonl").read_text().splitlines()) == ["dev"]
    with pytest.raises(SystemExit):      # a shape the Config refuses: said, with the flag
        train.main(["--dataset", "image4imner", "--data-dir", str(d), "--preset", "tiny", "--model", "d_model=30",
                    "--max-steps", "1", "--out", str(tmp_path / "bad"), "--dtype", "fp32"])
    assert re.match(r"train.py: --model .*encoder_heads", capsys.readouterr().err.splitlines()[-1])


def test_non_finite_losses_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch):
    def nan_loss(objective, batch):
        return real(objective, batch) * float("nan")
    real = train.Objective.forward
    monkeypatch.setattr(train.Objective, "forward", nan_loss)
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(SystemExit, match="non-finite"):
        train.main(base_args(corpus, tmp_path / "out", "--max-bad-steps", "3", "--batch-size", "4"))


def test_train_step_is_one_token_mean_update_and_skips_non_finite_losses(corpus, monkeypatch):
    """train_step on its own: two micro-batches give the loss summed over both / their target tokens and one AdamW
    update at the given lr; a non-finite loss leaves the weights and the optimizer untouched."""
    args = train.get_args(base_args(corpus, "unused", "--dropout", "0"))
    samples = data.load_split("cnerta", corpus, "train", verbose=False)[:4]
    model, assets = train.build_model(args, samples, None, lambda *a: None)
    featurizer = data.Featurizer(assets)
    micro = [data.collate([featurizer.inputs(s, "TNER") for s in samples[i:i + 2]]) for i in (0, 2)]
    optimizer = train.make_optimizer(model, args, torch.device("cpu"))
    _, _, scaler = devices.resolve_precision("fp32", torch.device("cpu"))
    objective = train.Objective(model)
    with torch.no_grad():
        expected = (sum(objective(b) for b in micro) / sum((b["target"] != 1).sum() for b in micro)).item()
    before = [p.detach().clone() for p in model.parameters()]
    loss, skipped, _ = train.train_step(objective, model, optimizer, scaler, micro, lr=1e-3, clip=1.0)
    assert not skipped
    assert excess(loss, expected, fp32_tol(expected, model_terms(model.config))) <= 1
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups) and len(optimizer.state) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())   # zeroed for the next step

    after_one = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    real = train.Objective.forward
    monkeypatch.setattr(train.Objective, "forward", lambda self, batch: real(self, batch) * float("nan"))
    loss, skipped, _ = train.train_step(objective, model, optimizer, scaler, micro, lr=1e-3, clip=1.0)
    assert math.isnan(loss) and skipped
    assert all(torch.equal(a, p) for a, p in zip(after_one, model.parameters()))
    assert all(torch.equal(v, optimizer.state[next(model.parameters())][k]) for k, v in state.items())

    # a finite loss with a non-finite gradient (bf16/fp32 have no scaler to catch it): skipped the same way, for
    # clipping (which would scale every gradient by NaN) and without it
    monkeypatch.setattr(train.Objective, "forward", real)
    poison = next(model.parameters())
    hook = poison.register_hook(lambda grad: grad * float("inf"))
    for clip in (1.0, 0.0):
        loss, skipped, _ = train.train_step(objective, model, optimizer, scaler, micro, lr=1e-3, clip=clip)
        assert math.isfinite(loss) and skipped, clip
        assert all(torch.equal(a, p) for a, p in zip(after_one, model.parameters()))
        assert all(torch.equal(v, optimizer.state[poison][k]) for k, v in state.items())
    hook.remove()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_step_on_cpu(corpus, dtype):
    """bf16 autocast; fp16 autocast + gradient scaler (the GPU paths, exercised on CPU)."""
    args = train.get_args(base_args(corpus, "unused", "--dropout", "0"))
    samples = data.load_split("cnerta", corpus, "train", verbose=False)[:4]
    model, assets = train.build_model(args, samples, None, lambda *a: None)
    name, autocast, scaler = devices.resolve_precision(dtype, torch.device("cpu"))
    assert name == dtype and scaler.is_enabled() == (dtype == "fp16")
    assert devices.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    batch = data.collate([data.Featurizer(assets).inputs(s, "TNER") for s in samples])
    optimizer = train.make_optimizer(model, args, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    with autocast:
        loss = train.Objective(model)(batch)
    scaler.scale(loss / (batch["target"] != 1).sum()).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_ctc_targets_and_loss(corpus):
    """CTC phone targets exist only for rows with real speech; the auxiliary loss adds to the cross-entropy."""
    fixtures = ROOT / "tests" / "fixtures" / "wavs"  # real speech and its phones
    index = [json.loads(line) for line in (fixtures / "index.jsonl").read_text(encoding="utf-8").splitlines()]
    samples = [data.Sample(r["wav"], r["text"], [], str(fixtures / r["wav"])) for r in index[:3]]
    args = train.get_args(base_args(corpus, "unused", "--dropout", "0"))
    model, assets = train.build_model(args, samples, None, lambda *a: None)
    featurizer = data.Featurizer(assets)
    rows = [(0, "TNER", 1.0), (1, "SNER", 1.0), (2, "MNER", 1.0)]
    batch = data.BatchBuilder(samples, featurizer, model.config.phone_dict_size - 3)[(0, rows)]
    assert batch["ctc_lengths"][0] == 0 and batch["ctc_lengths"][1] > 0
    for row in (1, 2):
        phones = featurizer.text(samples[row].text)[0]
        assert torch.equal(batch["ctc_phones"][row, :batch["ctc_lengths"][row]], phones - 3)
    with torch.no_grad():
        ce = train.Objective(model)(batch)
        both = train.Objective(model, ctc_weight=0.5)(batch)
    assert math.isfinite(both.item()) and both > ce


def test_start_up_removes_temp_files_of_dead_runs_only(tmp_path, capsys):
    """A run killed with SIGKILL leaves .last.pt.tmpPID; the next run removes it at start-up (before any data is
    read), but not the temp file of a process still writing. A run refused for its inputs leaves the folder's
    earlier outputs alone."""
    corpus = write_corpus(tmp_path / "data", n_train=0, n_dev=1, n_test=1, audio=False)   # refused: empty train split
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        stale, busy = out / f".last.pt.tmp{gone.pid}", out / f".best.pt.tmp{live.pid}"
        stale.write_bytes(b"torn"), busy.write_bytes(b"being written")
        (out / "last.pt").write_bytes(b"an earlier run"), (out / "metrics.jsonl").write_text("{}\n")
        with pytest.raises(SystemExit):
            train.main(base_args(corpus, out))
        live.kill()
    assert re.search(r"train\.py: \S*train\.json: no sentences in the train split", capsys.readouterr().err)
    # the refused run keeps the earlier run's metrics (only a run that starts replaces them)
    assert sorted(p.name for p in out.iterdir()) == sorted([busy.name, "last.pt", "metrics.jsonl"])


def test_resume_from_a_version_1_last_pt_writes_the_current_format(corpus, tmp_path, capsys):
    """tests/fixtures/pre_layout/last.pt (train.py before the format change, --pseudo-len 7) resumes for one step;
    the new best.pt/last.pt have the keys the old ones had (last.pt: the step in the epoch, how steps were made and
    split instead of this rank's micro-batch count), version 2 and the pseudo text length in the assets."""
    fixture = ROOT / "tests" / "fixtures" / "pre_layout"
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes((fixture / "last.pt").read_bytes())            # a copy: the fixture stays as is
    train.main(base_args(corpus, out, "--pseudo-len", "7", "--max-steps", "2", "--batch-size", "4", "--eval-limit",
                         "1", "--resume"))
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "older train.py whose batches differ" in printed
    for name in ("last.pt", "best.pt"):
        old, new = load(fixture / name), load(out / name)
        renamed = {"batch_in_epoch": "step_in_epoch", "micro_batch": "split"} if name == "last.pt" else {}
        assert set(new) == {renamed.get(k, k) for k in old} | ({"plan"} if renamed else set())
        assert new["format"] == old["format"]
        assert (old["version"], new["version"]) == (1, 2)
        assert new["assets"]["pseudo_text_len"] == 7 and new["config"] == old["config"]
    assert new["source"]["step"] == 2 and load(out / "last.pt")["step"] == 2


def tensorboard_scalars(folder):
    """{tag: [steps]} of every event file in a TensorBoard folder, purges applied (as TensorBoard shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_and_resume_without_repeats(corpus, tmp_path, capsys):
    """--tensorboard: loss, lr, throughput, gradient norm every --log-every steps and every evaluation; a run killed
    after its step-2 checkpoint wrote curves up to step 3; --resume continues from step 2 with purge_step, so the
    curves hold each step once."""
    pytest.importorskip("tensorboard", reason="tensorboard is a test requirement (requirements-test.txt)")
    tb, out = tmp_path / "tb", tmp_path / "run"
    args = ("--batch-size", "4", "--eval-every", "2", "--eval-limit", "1", "--tasks", "TNER,SNER", "--warmup", "0",
            "--tensorboard", str(tb))
    train.main(base_args(corpus, out, *args, "--max-steps", "3"))
    first = tensorboard_scalars(tb)
    assert first["train/loss"] == [1, 2, 3] and first["train/grad_norm"] == [1, 2, 3]
    assert {"train/lr", "train/samples_per_s", "dev/TNER_f1", "dev/SNER_cer", "dev/mean_f1"} <= set(first)
    assert first["dev/mean_f1"] == [2, 3]
    last = load(out / "last.pt")
    assert last["step"] == 3
    # what a run killed between its step-2 checkpoint and step 3 leaves: last.pt at step 2, curves up to step 3
    train.main(base_args(corpus, tmp_path / "at2", *args[:-2], "--max-steps", "2"))
    shutil.copy(tmp_path / "at2" / "last.pt", out / "last.pt")
    capsys.readouterr()
    train.main(base_args(corpus, out, *args, "--max-steps", "4", "--resume"))
    after = tensorboard_scalars(tb)
    assert after["train/loss"] == [1, 2, 3, 4] and after["dev/mean_f1"] == [2, 4]   # step 3 once, from the rerun


def test_tensorboard_missing_is_said_before_training(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as without the package
    with pytest.raises(SystemExit):
        train.main(base_args(corpus, tmp_path / "run", "--max-steps", "1", "--tensorboard", str(tmp_path / "tb")))
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last.pt").exists()
