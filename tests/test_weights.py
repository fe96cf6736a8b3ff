"""weights.py: ModelScope directory -> our checkpoint (key map, shapes, flags, assets, error paths) and the loader.
Full key lists of the reference base/large state dicts: tests/fixtures/keys_{base,large}.txt."""
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image  # noqa: E402
import text  # noqa: E402
import weights  # noqa: E402
from image import IMAGE, Config  # noqa: E402
from weights import ConversionError  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
REFERENCE_TOTALS = {"base": 210_967_464, "large": 608_949_696}       # MMSPEECH.md section 1, unique parameters



@pytest.fixture(scope="module")
def ckpts():
    return {name: weights.convert(os.path.join(FIXTURES, name)) for name in ("ms_tiny_a", "ms_tiny_b")}


def copy_dir(tmp_path, name="ms_tiny_a"):
    out = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), out)
    return out


def edit_weights(directory, fn):
    path = directory / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)


def edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def read_keys(size):
    """keys_{size}.txt -> (total unique parameters from the header, {name: (shape, dtype)})."""
    with open(os.path.join(FIXTURES, f"keys_{size}.txt"), encoding="utf-8") as f:
        header = f.readline()
        keys = {}
        for line in f:
            name, shape, dtype = line.split()
            keys[name] = (tuple(int(x) for x in shape.split(",")) if shape else (), dtype)
    total = int(header.split(" unique parameters")[0].rsplit(" ", 1)[1])
    return total, keys


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Key coverage and parameter counts at the real sizes

@pytest.mark.parametrize("size", ["base", "large"])
def test_key_map_covers_reference_state_dict(size):
    total, keys = read_keys(size)
    assert total == REFERENCE_TOTALS[size]
    config = getattr(Config, size)()
    key_map = weights.modelscope_key_map(config)
    shapes = weights.our_shapes(config)
    unaccounted = [k for k in keys if k not in key_map and k != weights.TIED_HEAD
                   and not weights.is_unused(k) and not weights.is_buffer(k)]
    assert unaccounted == []
    assert [k for k in key_map if k not in keys] == []
    for theirs, ours in key_map.items():
        assert keys[theirs][0] == shapes[ours], theirs
    assert sorted(set(shapes) - set(key_map.values())) == ["encoder.modality_embed.weight"]
    # every reference parameter is converted or listed unused; buffers are int64 and recomputed
    params = {k: v for k, v in keys.items() if not weights.is_buffer(k) and k != weights.TIED_HEAD}
    assert all(v[1] == "int64" for k, v in keys.items() if weights.is_buffer(k))
    assert sum(numel(s) for s, _ in params.values()) == total
    unused = sum(numel(s) for k, (s, _) in params.items() if weights.is_unused(k))
    with torch.device("meta"):
        model = IMAGE(config)
    assert model.num_parameters(mmspeech_only=True) + unused == total
    assert model.num_parameters() == model.num_parameters(mmspeech_only=True) + 2 * config.d_model


def test_real_size_config_from_modelscope_fields():
    """The fields make_modelscope_dir.py writes for large give exactly our large preset."""
    cfg = json.loads(open(os.path.join(FIXTURES, "ms_tiny_a", "config.json")).read())
    cfg.update(d_model=1024, encoder_layers=24, decoder_layers=12, encoder_attention_heads=16,
               decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=51134)
    config = weights.config_from_modelscope(cfg)
    assert config == Config.large(dropout=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# Conversion of the committed fixtures

def test_convert_fixture_directories(ckpts):
    a, b = ckpts["ms_tiny_a"], ckpts["ms_tiny_b"]
    assert a["config"]["scale_embedding"] and a["config"]["entangle_position_embedding"]
    assert not b["config"]["scale_embedding"] and not b["config"]["entangle_position_embedding"]
    assert (b["config"]["d_model"], b["config"]["encoder_layers"], b["config"]["decoder_heads"]) == (48, 7, 3)
    for ckpt in (a, b):
        assert ckpt["format"] == "image-checkpoint" and ckpt["version"] == weights.CHECKPOINT_VERSION == 2
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values())        # fp16 files cast to fp32
        assert not ckpt["model"]["encoder.modality_embed.weight"].any()
        assert "encoder.mask_emb" in ckpt["source"]["unused"]
        assert "decoder.embed_image_positions.weight" in ckpt["source"]["unused"]
        assert ckpt["source"]["weights_dtype"] == ["float16"] and ckpt["source"]["tied_head_in_file"]
    # ms_tiny_b has the "model." prefix: the tensors still arrive under our names, bit-exact after the fp16 cast
    raw = torch.load(os.path.join(FIXTURES, "ms_tiny_b", "pytorch_model.bin"), weights_only=True)
    assert torch.equal(raw["model.decoder.embed_tokens.weight"].float(), b["model"]["decoder.embed_tokens.weight"])
    assert torch.equal(raw["model.decoder.layers.0.cross_attn.c_attn"].float(),
                       b["model"]["decoder.layers.0.cross_attn.head_scale"])


def test_assets(ckpts):
    a, b = ckpts["ms_tiny_a"]["assets"], ckpts["ms_tiny_b"]["assets"]
    # fairseq-layout vocab.txt (a) and the bare BERT file (b) give the same ids
    assert a["vocab"] == b["vocab"] and len(a["vocab"]) == 1000
    assert a["vocab"][:5] == ["<s>", "<pad>", "</s>", "<unk>", "[PAD]"] and a["vocab"][675] == "一"
    assert len(a["phones"]) == 141 and a["phones"][4] == "a1" and a["phones"][124] == "<mask>"
    assert a["phones"][125] == "#2"
    first = open(os.path.join(FIXTURES, "ms_tiny_a", "text2phone_dict.txt"), encoding="utf-8").readline()
    word, pron = first.rstrip("\n").split("\t")
    assert a["lexicon"][word] == pron
    assert a["fbank"]["cmvn"] == "utterance" and b["fbank"]["cmvn"] == "none"
    assert a["fbank"]["specaugment"]["freq_mask_N"] == 2 and b["fbank"]["specaugment"] is None
    assert a["decoding"] == {"beam": 5, "max_len_a": 0.0, "max_len_b": 128, "min_len": 1,
                             "no_repeat_ngram_size": 5, "constraint_range": [4, 1000], "len_penalty": 1.0,
                             "normalize_scores": True, "unk_penalty": 0.0, "temperature": 1.0}


@pytest.mark.parametrize("layout", ["fairseq", "bert"])
def test_full_size_vocab_ids(tmp_path, layout):
    """21,128 BERT lines (one of them U+2028), bare or with the fairseq specials: ids as MMSPEECH.md section 6."""
    bert = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "\u2028", "##\u2028"]
    bert += [f"tok{i}" for i in range(weights.BERT_VOCAB_LINES - len(bert))]
    lines = (list(text.SPECIALS) + bert + ["<mask>"]) if layout == "fairseq" else bert
    path = tmp_path / "vocab.txt"
    path.write_bytes("".join(t + "\n" for t in lines).encode("utf-8"))
    vocab = weights.read_vocab(str(path), 51134)
    assert len(vocab) == 51134 and vocab[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert vocab[4] == "[PAD]" and vocab[104] == "[UNK]" and vocab[105] == "\u2028"
    assert vocab[21131] == bert[-1]
    assert vocab[21132:21135] == ["<mask>", "<blank>", "<audio_0>"] and vocab[-1] == "<audio_29999>"


def test_checkpoint_roundtrip_and_loader(ckpts, tmp_path):
    out = tmp_path / "sub" / "a.pt"
    weights.save_checkpoint(ckpts["ms_tiny_a"], str(out))
    assert sorted(os.listdir(out.parent)) == ["a.pt"]                              # no temp file left
    model, assets, ckpt = weights.load_checkpoint(str(out))
    assert not model.training and assets["vocab"] == ckpts["ms_tiny_a"]["assets"]["vocab"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpts["ms_tiny_a"]["model"][name])
    model, _, _ = weights.load_checkpoint(str(out), modelscope_padding=True, mask_pseudo=True)
    assert model.config.modelscope_padding and model.config.mask_pseudo
    with pytest.raises(ConversionError, match="unknown config field"):
        weights.load_checkpoint(str(out), beam=3)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not an image-checkpoint"):
        weights.load_checkpoint(str(tmp_path / "other.pt"))


def test_cli(tmp_path, capsys):
    out = tmp_path / "b.pt"
    weights.main([os.path.join(FIXTURES, "ms_tiny_b"), str(out), "--dtype", "float16"])
    printed = capsys.readouterr().out
    assert "unused ModelScope tensors (11)" in printed and "encoder.final_proj.weight" in printed
    model, assets, ckpt = weights.load_checkpoint(str(out))
    assert model.decoder.embed_tokens.weight.dtype == torch.float16
    with pytest.raises(SystemExit) as e:
        weights.main([str(tmp_path / "nowhere"), str(tmp_path / "x.pt")])
    assert e.value.code == 2 and "weights.py: ModelScope directory not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Accepted variants and error paths

def test_tied_head_absent_is_fine(tmp_path):
    d = copy_dir(tmp_path)
    edit_weights(d, lambda s: s.pop(weights.TIED_HEAD))
    ckpt = weights.convert(str(d))
    assert not ckpt["source"]["tied_head_in_file"]


def test_untied_head_is_an_error(tmp_path):
    d = copy_dir(tmp_path)

    def untie(state):
        state[weights.TIED_HEAD] = state[weights.TIED_HEAD].clone() + 1
    edit_weights(d, untie)
    with pytest.raises(ConversionError, match="output_projection.weight differs"):
        weights.convert(str(d))


def test_buffers_present_are_dropped(tmp_path):
    d = copy_dir(tmp_path)

    def add(state):
        state["decoder.token_rp_bucket"] = torch.zeros(4, 4, dtype=torch.long)
    edit_weights(d, add)
    assert weights.convert(str(d))["source"]["buffers_dropped"] == ["decoder.token_rp_bucket"]


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update({"encoder.extra.weight": torch.zeros(2)}), "unknown key.*encoder.extra.weight"),
    (lambda s: s.pop("decoder.layers.1.fc2.bias"), "missing key.*decoder.layers.1.fc2.bias"),
    (lambda s: s.update({"encoder.encoder.layers.3.fc1.weight": torch.zeros(3, 64)}),
     r"encoder.encoder.layers.3.fc1.weight has shape \(3, 64\).*\(128, 64\)"),
    (lambda s: s.update({"model.decoder.layer_norm.bias": torch.zeros(64)}), "prefix"),
])
def test_weight_errors_name_the_key(tmp_path, edit, message):
    d = copy_dir(tmp_path)
    edit_weights(d, edit)
    with pytest.raises(ConversionError, match=message):
        weights.convert(str(d))


@pytest.mark.parametrize("change,message", [
    ({"encoder_pos_conv_depth": 1}, "encoder_pos_conv_depth=1"),
    ({"normformer": False}, "normformer=False"),
    ({"use_ofasys": True}, "use_ofasys=True"),
    ({"pad_token_id": 0}, "pad_token_id=0"),
    ({"share_attn_bias": True}, "share_attn_bias=True"),
    ({"architectures": ["OFAModel"]}, "architectures"),
    ({"encoder_layers": 9}, "missing key.*encoder.encoder.layers.8"),
    ({"d_model": 80}, "shape"),
])
def test_config_errors_name_the_flag(tmp_path, change, message):
    d = copy_dir(tmp_path)
    edit_config(d, **change)
    with pytest.raises(ConversionError, match=message):
        weights.convert(str(d))


def test_training_only_flags_are_noted(tmp_path):
    d = copy_dir(tmp_path)
    edit_config(d, encoder_layerdrop=0.05)
    assert any("encoder_layerdrop" in n for n in weights.convert(str(d))["source"]["notes"])


def test_disable_entangle_wins(tmp_path):
    d = copy_dir(tmp_path)
    edit_config(d, disable_entangle=True)
    assert not weights.convert(str(d))["config"]["entangle_position_embedding"]


def test_pickled_code_is_refused(tmp_path):
    d = copy_dir(tmp_path)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state["evil"] = shutil.rmtree                    # a global that weights_only loading does not allow
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refused: the file contains pickled"):
        weights.convert(str(d))


@pytest.mark.parametrize("filename,content,message", [
    ("vocab.txt", "hello\nworld\n", "first line is 'hello'"),
    ("vocab.txt", "<s>\n<pad>\n</s>\n<unk>\n[PAD]\n", "only 5 tokens"),
    ("vocab.txt", "<s>\n<pad>\n</s>\n<unk>\n" + "".join(f"t{i}\n" for i in range(1200)), "1204 tokens but"),
    ("phone_dict.txt", "a1 1\na2 2\n", "2 phones \\+ 4 specials = 6"),
    ("phone_dict.txt", "a1 1\n\na2 2\n", "phone_dict.txt:2: empty line"),
    ("text2phone_dict.txt", "一\ty i1\n一个 y i2 g e4\n", "text2phone_dict.txt:2: expected"),
    ("text2phone_dict.txt", "一\tqq9\n", "qq9"),
    ("fbank_config.yaml", "transforms:\n  '*': [global_cmvn]\n", "global_cmvn"),
    ("configuration.json", '{"model": {"beam_search": {"beam_size": 5, "top_p": 0.9}}}', "top_p"),
    ("configuration.json", '{"model": {"beam_search": {"constraint_range": "4-9"}}}', "constraint_range"),
])
def test_asset_errors_name_the_file(tmp_path, filename, content, message):
    d = copy_dir(tmp_path)
    (d / filename).write_text(content, encoding="utf-8")
    with pytest.raises(ConversionError, match=message):
        weights.convert(str(d))


@pytest.mark.parametrize("filename", ["config.json", "pytorch_model.bin", "vocab.txt", "phone_dict.txt",
                                      "fbank_config.yaml"])
def test_missing_required_file(tmp_path, filename):
    d = copy_dir(tmp_path)
    os.remove(d / filename)
    with pytest.raises(ConversionError, match=filename):
        weights.convert(str(d))


def test_optional_files(tmp_path):
    d = copy_dir(tmp_path)
    os.remove(d / "text2phone_dict.txt")
    os.remove(d / "configuration.json")
    ckpt = weights.convert(str(d))
    assert ckpt["assets"]["lexicon"] == {}
    assert ckpt["assets"]["decoding"]["max_len_b"] == 16 and ckpt["assets"]["decoding"]["constraint_range"] is None
    assert len(ckpt["source"]["notes"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes (files.atomic_path): permissions, signals, temp files of killed runs

def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)        # before: mkstemp's 0600 whatever the umask
    try:
        weights.save_checkpoint({"x": torch.zeros(2)}, str(tmp_path / "a.pt"))
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == mode


def test_stale_temp_of_a_dead_process_is_removed_a_live_one_kept(tmp_path):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        stale, busy = tmp_path / f".last.pt.tmp{dead_pid()}", tmp_path / f".last.pt.tmp{live.pid}"
        stale.write_bytes(b"torn"), busy.write_bytes(b"being written")
        weights.save_checkpoint({"x": torch.zeros(2)}, str(tmp_path / "last.pt"))
        live.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "last.pt"]


WRITER = """
import signal, sys, torch, weights
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal (a background job ignores SIGINT)
ckpt = weights.convert(sys.argv[2])
ckpt["padding"] = torch.zeros(8 * 2**20)       # 32 MB: each write takes a while
weights.convert = lambda *args, **kwargs: ckpt
while True:
    weights.main([sys.argv[2], sys.argv[1]])   # the entry point, as `python weights.py DIR OUT` runs it
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_checkpoint_write_leaves_no_temp_file(tmp_path, sig):
    out = tmp_path / "big.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), os.path.join(FIXTURES, "ms_tiny_a")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(".tmp" in p.name for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(sig)                # most likely inside torch.save, the temp file half written
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0, err[-2000:]
    assert [p.name for p in tmp_path.iterdir() if p.name != "big.pt"] == []
    if out.exists():                     # the previous complete write, never a torn one
        assert torch.load(out, weights_only=True)["padding"].shape == (8 * 2**20,)


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint format: versions, migration, round trip

PRE_LAYOUT = os.path.join(FIXTURES, "pre_layout")   # version 1 files from train.py, --pseudo-len 7 (README there)


def test_version_1_checkpoints_are_migrated_on_load():
    for name in ("best.pt", "last.pt"):
        path = os.path.join(PRE_LAYOUT, name)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert raw["version"] == 1 and "pseudo_text_len" not in raw["assets"]     # the fixture is what it says
        ckpt = weights.read_checkpoint(path)
        assert ckpt["version"] == weights.CHECKPOINT_VERSION == 2
        assert ckpt["assets"]["pseudo_text_len"] == 7 == raw["source"]["args"]["pseudo_len"]
        assert set(ckpt) == set(raw) and ckpt["source"] == raw["source"]           # nothing else changes
        assert all(ckpt["assets"][k] == raw["assets"][k] for k in raw["assets"])
    assert "optimizer" in ckpt and ckpt["step"] == 1                              # last.pt keeps its training state
    model, assets, ckpt = weights.load_checkpoint(os.path.join(PRE_LAYOUT, "best.pt"))
    assert assets["pseudo_text_len"] == 7 and not model.training
    assert all(torch.equal(t, ckpt["model"][k]) for k, t in model.state_dict().items())


def test_unknown_versions_are_refused(tmp_path):
    raw = torch.load(os.path.join(PRE_LAYOUT, "best.pt"), map_location="cpu", weights_only=True)
    for version in (0, 3, None):
        torch.save({**raw, "version": version}, tmp_path / "v.pt")
        with pytest.raises(ConversionError, match=f"v.pt: checkpoint version {version!r}, this code reads 2"):
            weights.read_checkpoint(str(tmp_path / "v.pt"))


def test_converted_version_1_checkpoint_gets_no_pseudo_length(ckpts):
    old = {**ckpts["ms_tiny_a"], "version": 1}                                    # no train.py arguments
    ckpt = weights.migrate(old, "a.pt")
    assert ckpt["version"] == 2 and "pseudo_text_len" not in ckpt["assets"] and old["version"] == 1


def test_make_save_read_round_trip_keeps_everything(tmp_path):
    torch.manual_seed(0)
    config = Config.tiny(vocab_size=40, d_model=16, encoder_layers=2, text_join_layer=1, decoder_layers=1,
                         encoder_heads=2, decoder_heads=2, encoder_ffn=32, decoder_ffn=32, pos_conv_groups=8)
    model = IMAGE(config)
    assets = {"vocab": [f"t{i}" for i in range(40)], "phones": ["p"], "lexicon": {"张": ["zh", "ang1"]},
              "fbank": {"cmvn": "utterance"}, "decoding": {"beam": 3}, "pseudo_text_len": 11}
    source = {"trainer": "test", "args": {"pseudo_len": 99}}   # the format's field wins over train.py's argument
    made = weights.make_checkpoint(config, model.state_dict(), assets, source, step=5, rng=[torch.arange(3)])
    weights.save_checkpoint(made, str(tmp_path / "c.pt"))
    back = weights.read_checkpoint(str(tmp_path / "c.pt"))
    assert set(back) == {"format", "version", "config", "model", "assets", "source", "step", "rng"}
    assert back["version"] == 2 and back["config"] == made["config"] and back["assets"] == assets
    assert back["source"] == source and back["step"] == 5 and torch.equal(back["rng"][0], torch.arange(3))
    rebuilt = weights.model_from_checkpoint(back, "cpu", dropout=0.0)
    assert rebuilt.config == Config(**{**made["config"], "dropout": 0.0}) and not rebuilt.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"replace the format's keys \['format', 'version'\]"):
        weights.make_checkpoint(config, model.state_dict(), assets, source, version=3, format="x")


def test_model_from_checkpoint_keys_are_strict_except_the_modality_ablation(ckpts):
    ckpt = ckpts["ms_tiny_a"]
    plain = weights.model_from_checkpoint(ckpt, use_modality_embedding=False)
    assert plain.encoder.modality_embed is None
    assert set(plain.state_dict()) == set(ckpt["model"]) - {weights.MODALITY_EMBEDDING}
    short = {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != weights.MODALITY_EMBEDDING}}
    with pytest.raises(ConversionError, match="(?s)x.pt: weights do not fit the config.*Missing.*modality_embed"):
        weights.model_from_checkpoint(short, "cpu", "x.pt")
    extra = {**ckpt, "model": {**ckpt["model"], "encoder.stray": torch.zeros(1)}}
    with pytest.raises(ConversionError, match="encoder.stray"):
        weights.model_from_checkpoint(extra, "cpu", "x.pt", use_modality_embedding=False)


def test_incomplete_checkpoints_are_refused_by_name(tmp_path):
    raw = torch.load(os.path.join(PRE_LAYOUT, "best.pt"), map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in raw.items() if k not in ("assets", "source")}, tmp_path / "cut.pt")
    with pytest.raises(ConversionError, match="cut.pt: an incomplete image-checkpoint file \\(no assets, source\\)"):
        weights.read_checkpoint(str(tmp_path / "cut.pt"))


def test_fbank_config_takes_the_test_transforms_first(tmp_path):
    """fairseq's lookup: the test split's list, even an empty one, wins over '_eval' and '*'."""
    path = tmp_path / "fbank_config.yaml"
    path.write_text("transforms:\n  test: []\n  '*': [utterance_cmvn]\n", encoding="utf-8")
    assert weights.read_fbank_config(str(path))["cmvn"] == "none"


def saved_tiny_model(path, legacy=False):
    """A tiny model with every table non-zero (the relative-position biases too), saved as our checkpoint."""
    torch.manual_seed(0)
    model = IMAGE(Config.tiny(dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = weights.make_checkpoint(model.config, model.state_dict(), {}, {})
    if legacy:
        torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    else:
        weights.save_checkpoint(ckpt, str(path))


def tiny_batch():
    """A fixed batch with speech and text streams (model(**batch) takes it)."""
    g = torch.Generator().manual_seed(1)
    dec = torch.randint(4, 1000, (2, 6), generator=g)
    dec[:, 0] = 0
    return dict(fbank=torch.randn(2, 60, 80, generator=g), fbank_lengths=torch.tensor([60, 45]), decoder_input=dec,
                phones=torch.randint(4, 141, (2, 5), generator=g),
                phone_chars=torch.randint(4, 1000, (2, 5), generator=g), phone_lengths=torch.tensor([5, 3]),
                speech_present=torch.tensor([True, True]), text_present=torch.tensor([True, False]))


def model_outputs(model):
    """Teacher-forced logits and two cached decoding steps of tiny_batch()."""
    batch = tiny_batch()
    dec = batch.pop("decoder_input")
    with torch.no_grad():
        enc = model.encode(**batch)
        cache = model.new_cache(enc, 8)
        steps = [model.decode_step(dec[:, t], cache) for t in range(2)]
        return [model.decode(dec, enc), *steps]


@pytest.mark.parametrize("legacy", [False, True])
def test_mapped_meta_assigned_load_equals_an_ordinary_load(tmp_path, monkeypatch, legacy):
    """read_checkpoint maps zip-format files (legacy ones are read whole); model_from_checkpoint builds on the meta
    device and assigns the file's tensors. Same outputs, to the bit, as torch.load into a model built normally;
    nothing on meta, the derived bucket table on the CPU; trainable, and training does not write into the file."""
    path = tmp_path / "m.pt"
    saved_tiny_model(path, legacy)
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or load(*a, **k))
    model, _, _ = weights.load_checkpoint(str(path))
    assert calls == [not legacy]
    raw = load(path, map_location="cpu", weights_only=True)
    ordinary = IMAGE(Config(**raw["config"]))
    ordinary.load_state_dict(raw["model"])
    ordinary.eval()
    for ours, theirs in zip(model_outputs(model), model_outputs(ordinary)):
        assert torch.equal(ours, theirs)
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    assert "decoder.rel_buckets" in tensors and torch.equal(model.decoder.rel_buckets, ordinary.decoder.rel_buckets)
    assert all(t.device == torch.device("cpu") and not t.is_meta for t in tensors.values())
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**tiny_batch()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    assert not torch.equal(model.decoder.embed_tokens.weight, ordinary.decoder.embed_tokens.weight)
    again = load(path, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(again[k], v) for k, v in raw["model"].items())    # the file is unchanged


def test_a_derived_tensor_left_on_meta_is_an_error(tmp_path, monkeypatch):
    """A buffer that __init__ computes without device="cpu" would be an empty meta tensor after a meta build."""
    path = tmp_path / "m.pt"
    saved_tiny_model(path)
    monkeypatch.setattr(image, "relative_bucket_table", lambda n, size: torch.zeros(2 * n - 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="decoder.rel_buckets left on the meta device"):
        weights.load_checkpoint(str(path))
