"""ModelScope MMSpeech directory -> one IMAGE checkpoint; and THE checkpoint format (make_checkpoint, save, read and
migrate older versions, model_from_checkpoint: every model built from a checkpoint is built there).

    python weights.py MODELSCOPE_DIR OUT.pt                # e.g. damo/ofa_mmspeech_pretrain_large_zh
    model, assets, ckpt = weights.load_checkpoint("OUT.pt", device="cuda")

The ModelScope directory holds config.json, pytorch_model.bin, vocab.txt, phone_dict.txt, fbank_config.yaml and
usually configuration.json and text2phone_dict.txt. Our checkpoint (torch.save of a dict, loadable with
weights_only=True; keys in make_checkpoint) carries the config, the weights under our names and every asset the
data pipeline needs (vocabulary, phones, lexicon, fbank/CMVN settings, decoding defaults, pseudo text length), so decode.py and train.py
need nothing else.

Conversion is explicit: modelscope_key_map() names every ModelScope tensor we use; the image-side tables MMSpeech never
uses are dropped and listed by name; an unknown or missing key, a wrong shape or an unsupported config.json flag is an
error that names it. Facts: ../shared/reference/MMSPEECH.md (sections 2, 4, 6, 10).
"""
import argparse
import dataclasses
import itertools
import json
import os
import pickle
import re
from pathlib import Path

import torch
import yaml

import files
import text
from image import IMAGE, Config

CHECKPOINT_FORMAT = "image-checkpoint"
CHECKPOINT_VERSION = 2                                # 1: pseudo text length only in source.args
FORMAT_KEYS = ("format", "version", "config", "model", "assets", "source")   # see make_checkpoint
BERT_VOCAB_LINES = 21128                              # bert-base-chinese vocab.txt
MASK_ID = len(text.SPECIALS) + BERT_VOCAB_LINES       # 21132 '<mask>', then 21133 '<blank>', 21134.. '<audio_i>'

# Tensors of the ModelScope state dict that MMSpeech (and IMAGE) never use: image-side OFA tables, the pretraining
# projection / mask embedding, and a LayerNorm that is built but never called (MMSPEECH.md sections 3.2-3.3, 4).
UNUSED_PATTERNS = [
    r"encoder\.mask_emb",
    r"encoder\.final_proj\.(weight|bias)",
    r"encoder\.encoder\.phone_layer_norm\.(weight|bias)",
    r"decoder\.embed_image_positions\.weight",
    r"decoder\.image_pos_ln\.(weight|bias)",
    r"decoder\.image_rel_pos_table_list\.\d+\.weight",
    r"decoder\.code_layernorm_embedding\.(weight|bias)",
]
# int64 buffers ModelScope recomputes in __init__ (so do we: image.Decoder.rel_buckets); may be absent from the file.
BUFFERS = {"decoder.token_rp_bucket", "decoder.image_rp_bucket", "decoder.image_position_idx"}
TIED_HEAD = "decoder.output_projection.weight"        # the LM head, tied to decoder.embed_tokens.weight
MODALITY_EMBEDDING = "encoder.modality_embed.weight"  # IMAGE's addition to MMSpeech

# MMSpeechConfig class defaults for the config.json fields we read (save_pretrained may omit default-valued fields).
MODELSCOPE_DEFAULTS = dict(
    vocab_size=59457, d_model=512, encoder_layers=4, encoder_attention_heads=8, encoder_ffn_dim=2048,
    decoder_layers=4, decoder_attention_heads=8, decoder_ffn_dim=2048, phone_vocab_size=141, phone_dict_size=124,
    encoder_pos_conv_depth=5, encoder_conv_pos=95, encoder_conv_pos_groups=16, max_position_embeddings=1024,
    token_bucket_size=256, attn_scale_factor=2.0, scale_embedding=False, entangle_position_embedding=False,
    disable_entangle=False, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
    activation_function="gelu", encoder_normalize_before=True, decoder_normalize_before=True, normformer=True,
    layernorm_embedding=True, share_decoder_input_output_embed=True, use_ofasys=False, share_attn_bias=False,
    use_gamma_feature=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
)
# Flags whose other values would change the computation in ways this model does not implement.
REQUIRED_FLAGS = dict(
    activation_function="gelu", encoder_normalize_before=True, decoder_normalize_before=True, normformer=True,
    layernorm_embedding=True, share_decoder_input_output_embed=True, use_ofasys=False, share_attn_bias=False,
    use_gamma_feature=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
)
# OfaForAllTasks' generator defaults (used when configuration.json has no model.beam_search).
BEAM_SEARCH_DEFAULTS = dict(beam_size=5, max_len_a=0, max_len_b=16, min_len=1, no_repeat_ngram_size=3,
                            constraint_range=None, len_penalty=1.0, normalize_scores=True, unk_penalty=0.0,
                            temperature=1.0)


class ConversionError(files.InputError):
    """A ModelScope directory or checkpoint we cannot convert or load; the message names the file and the item."""


# ----------------------------------------------------------------------------------------------------------------------
# config.json

def config_from_modelscope(cfg: dict, notes: list = None, **overrides) -> Config:
    """Our Config from a ModelScope config.json dict; unsupported flag values are errors that name the flag.
    Training-only regularisers we do not implement (layer drop, drop path) are reported in `notes`."""
    if not isinstance(cfg, dict):
        raise ConversionError(f"config.json: expected a JSON object, got a {type(cfg).__name__}")

    def get(key):
        default = MODELSCOPE_DEFAULTS[key]
        value = cfg.get(key, default)
        # JSON gives str/bool/int/float: a quoted number or a bool in a number's place is an error, not a cast
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConversionError(f"config.json: {key}={value!r} is not a number")
        return value

    architectures = cfg.get("architectures")
    if architectures is not None and "MMSpeechModel" not in architectures:
        raise ConversionError(f"config.json: architectures={architectures!r}, expected MMSpeechModel")
    for key, want in REQUIRED_FLAGS.items():
        if get(key) != want:
            raise ConversionError(f"config.json: {key}={get(key)!r} is not supported (this model implements "
                                  f"{key}={want!r})")
    depth = get("encoder_pos_conv_depth")
    if not isinstance(depth, int) or depth < 2:
        raise ConversionError(f"config.json: encoder_pos_conv_depth={depth!r} is not supported (depth 1 is "
                              "ModelScope's single weight-normed conv; only the multi-layer conv is implemented)")
    for key in ("encoder_layerdrop", "decoder_layerdrop", "encoder_drop_path_rate", "decoder_drop_path_rate"):
        if cfg.get(key, 0.0) and notes is not None:      # no effect at inference
            notes.append(f"config.json {key}={cfg[key]!r} ignored (training-only regulariser, not implemented)")
    fields = dict(
        vocab_size=get("vocab_size"), phone_vocab_size=get("phone_vocab_size"), phone_dict_size=get("phone_dict_size"),
        d_model=get("d_model"), encoder_layers=get("encoder_layers"), encoder_heads=get("encoder_attention_heads"),
        encoder_ffn=get("encoder_ffn_dim"), decoder_layers=get("decoder_layers"),
        decoder_heads=get("decoder_attention_heads"), decoder_ffn=get("decoder_ffn_dim"),
        pos_conv_layers=depth, pos_conv_width=get("encoder_conv_pos"), pos_conv_groups=get("encoder_conv_pos_groups"),
        max_positions=get("max_position_embeddings"), token_bucket_size=get("token_bucket_size"),
        attn_scale_factor=float(get("attn_scale_factor")), scale_embedding=bool(get("scale_embedding")),
        entangle_position_embedding=bool(get("entangle_position_embedding")) and not bool(get("disable_entangle")),
        dropout=float(get("dropout")), attention_dropout=float(get("attention_dropout")),
        activation_dropout=float(get("activation_dropout")),
    )
    try:
        return Config(**{**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# The key map

def modelscope_key_map(config: Config) -> dict:
    """{ModelScope state_dict name: our name} for every tensor we take over (explicit, layer by layer)."""
    names = {}

    def module(theirs, ours, params=("weight", "bias")):
        for p in params:
            names[f"{theirs}.{p}"] = f"{ours}.{p}"

    module("encoder.subsample.conv.0", "encoder.subsample.conv1")
    module("encoder.subsample.conv.2", "encoder.subsample.conv2")
    module("encoder.subsample.out.0", "encoder.subsample.proj")
    module("encoder.post_subsample_proj", "encoder.input_proj")
    module("encoder.phone_item_embedding", "encoder.phone_embed", ("weight",))
    for i in range(config.pos_conv_layers):
        module(f"encoder.encoder.pos_conv.{i}.0", f"encoder.speech_pos_conv.convs.{i}")
        module(f"encoder.encoder.phone_pos_conv.{i}.0", f"encoder.text_pos_conv.convs.{i}")
    for i in range(config.encoder_layers):
        theirs, ours = f"encoder.encoder.layers.{i}", f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            module(f"{theirs}.self_attn.{proj}", f"{ours}.attn.{proj}")
        module(f"{theirs}.self_attn_layer_norm", f"{ours}.attn_norm")
        module(f"{theirs}.final_layer_norm", f"{ours}.ffn_norm")
        module(f"{theirs}.fc1", f"{ours}.fc1")
        module(f"{theirs}.fc2", f"{ours}.fc2")
    module("encoder.encoder.layer_norm", "encoder.final_norm")

    module("decoder.embed_tokens", "decoder.embed_tokens", ("weight",))
    module("decoder.embed_positions", "decoder.embed_positions", ("weight",))
    module("decoder.layernorm_embedding", "decoder.embed_norm")
    module("decoder.pos_ln", "decoder.pos_norm")
    for which in ("self", "cross"):
        for qk in ("q", "k"):
            module(f"decoder.{which}_pos_{qk}_linear", f"decoder.{which}_pos_{qk}")
    for j in range(config.decoder_layers):
        module(f"decoder.token_rel_pos_table_list.{j}", f"decoder.rel_pos_bias.{j}", ("weight",))
        theirs, ours = f"decoder.layers.{j}", f"decoder.layers.{j}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                module(f"{theirs}.{attn}.{proj}", f"{ours}.{attn}.{proj}")
            names[f"{theirs}.{attn}.c_attn"] = f"{ours}.{attn}.head_scale"
        for theirs_ln, ours_ln in (("self_attn_layer_norm", "self_attn_norm"),
                                   ("self_attn_mid_layer_norm", "self_attn_mid_norm"),
                                   ("cross_attn_layer_norm", "cross_attn_norm"),
                                   ("cross_attn_mid_layer_norm", "cross_attn_mid_norm"),
                                   ("final_layer_norm", "ffn_norm"), ("ffn_layer_norm", "ffn_mid_norm")):
            module(f"{theirs}.{theirs_ln}", f"{ours}.{ours_ln}")
        module(f"{theirs}.fc1", f"{ours}.fc1")
        module(f"{theirs}.fc2", f"{ours}.fc2")
    module("decoder.layer_norm", "decoder.final_norm")
    return names


def is_unused(name: str) -> bool:
    return any(re.fullmatch(p, name) for p in UNUSED_PATTERNS)


def is_buffer(name: str) -> bool:
    return name in BUFFERS or name.endswith(".version")


def our_shapes(config: Config) -> dict:
    """{our state_dict name: shape}, from a model built on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        model = IMAGE(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(state: dict, config: Config, dtype: torch.dtype = torch.float32) -> tuple:
    """ModelScope state dict (prefix already stripped) -> (our state dict, sorted list of unused ModelScope names)."""
    key_map = modelscope_key_map(config)
    shapes = our_shapes(config)
    unknown = [k for k in state if k not in key_map and k != TIED_HEAD and not is_unused(k) and not is_buffer(k)]
    if unknown:
        raise ConversionError(f"pytorch_model.bin: {len(unknown)} unknown key(s): {', '.join(unknown[:8])}"
                              + (" ..." if len(unknown) > 8 else ""))
    missing = [k for k in key_map if k not in state]
    if missing:
        raise ConversionError(f"pytorch_model.bin: {len(missing)} missing key(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    ours = {}
    for theirs, name in key_map.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != shapes[name]:
            raise ConversionError(f"pytorch_model.bin: {theirs} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{shapes[name]} (our {name})")
        if not tensor.is_floating_point():
            raise ConversionError(f"pytorch_model.bin: {theirs} has dtype {tensor.dtype}, expected floating point")
        ours[name] = tensor.to(dtype)
    if TIED_HEAD in state and not torch.equal(state[TIED_HEAD].to(dtype), ours["decoder.embed_tokens.weight"]):
        raise ConversionError(f"pytorch_model.bin: {TIED_HEAD} differs from decoder.embed_tokens.weight, but "
                              "share_decoder_input_output_embed is true (an untied head is not supported)")
    if config.use_modality_embedding:     # IMAGE's addition, zero: the converted model computes exactly MMSpeech
        ours[MODALITY_EMBEDDING] = torch.zeros(shapes[MODALITY_EMBEDDING], dtype=dtype)
    assert set(ours) == set(shapes), f"key map incomplete: {sorted(set(shapes) ^ set(ours))}"
    return ours, sorted(k for k in state if is_unused(k))


def check_checkpoint_path(path: str, what: str) -> bool:
    """Cheap checks before torch.load: a folder (a ModelScope one: convert it first), a missing file and a file
    that torch.save did not write are ConversionErrors naming `what` and the path. -> whether the file is in
    torch.save's zip format (its default since PyTorch 1.6; else the legacy pickle format)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            raise ConversionError(f"{what} {path}: is a ModelScope directory; convert it first with "
                                  f"`python weights.py {path} OUT.pt` and pass OUT.pt")
        raise ConversionError(f"{what} {path}: is a directory, expected a checkpoint file")
    if not os.path.isfile(path):
        raise ConversionError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ConversionError(f"{what} {path}: not a PyTorch checkpoint (a file written by torch.save starts with "
                              f"a zip or pickle header; this one starts with {head!r})")
    return head.startswith(b"PK")


def load_torch_file(path: str, what: str) -> dict:
    """torch.load(weights_only=True) after check_checkpoint_path; a file with pickled code or objects is refused
    with a clear message.

    A zip-format file is memory-mapped (mmap=True): its tensors are pages of the file, read when first used and
    shared by every process that maps it, so a rank loading last.pt (about 7 GB at large with AdamW) makes no
    private copy of it (page cache only, which the kernel can reclaim). The mapping is private: writing to a loaded
    tensor (a CPU training step) copies that page, the file never changes. Files are replaced by renaming
    (save_checkpoint), never rewritten in place, so a mapped file cannot shrink under a running process. Legacy
    (pickle-format) files cannot be mapped and are read whole."""
    zip_format = check_checkpoint_path(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as e:
        detail = re.search(r"Unsupported global: ([^\n]*?)(?: was not|\n|$)", str(e))
        detail = detail.group(1).strip() if detail else "see torch.load(weights_only=True)"
        raise ConversionError(f"{path}: refused: the file contains pickled Python objects or code ({detail}); "
                              "only plain tensors are accepted (torch.load with weights_only=True, nothing "
                              "in the file is executed)") from None
    except Exception as e:  # noqa: BLE001  (corrupt or foreign file: say which one)
        raise ConversionError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {e})") from None


def read_modelscope_weights(path: str) -> dict:
    """pytorch_model.bin -> flat {name: tensor} without the optional 'model.' prefix."""
    state = load_torch_file(path, "pytorch_model.bin")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConversionError(f"{path}: expected a flat state dict of tensors")
    prefixed = [k.startswith("model.") for k in state]
    if any(prefixed):
        if not all(prefixed):
            odd = next(k for k in state if not k.startswith("model."))
            raise ConversionError(f"{path}: some keys have the 'model.' prefix and some do not (e.g. {odd})")
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------------------
# Assets: vocabulary, fbank settings, decoding defaults (the phone dictionary and lexicon: text.py's readers)

def canonical_token(i: int) -> str:
    """Token of id i >= 21132 in MMSpeech's vocabulary: <mask>, <blank>, then <audio_0> ..."""
    return "<mask>" if i == MASK_ID else "<blank>" if i == MASK_ID + 1 else f"<audio_{i - MASK_ID - 2}>"


def read_vocab(path: str, vocab_size: int) -> list:
    """vocab.txt (fairseq layout with <s> <pad> </s> <unk> first, or the bare BERT file) -> token per id.

    Ids as MMSPEECH.md section 6: specials 0..3, BERT lines from 4, then <mask>, <blank>, <audio_i> up to vocab_size.
    """
    lines = files.read_lines(path)
    if lines[:4] == list(text.SPECIALS):
        tokens = list(lines)
    elif lines and lines[0] == "[PAD]":
        tokens = list(text.SPECIALS) + lines
    else:
        first = lines[0] if lines else "(empty file)"
        raise ConversionError(f"{path}: first line is {first!r}; expected '<s>' (fairseq layout with the specials "
                              "<s> <pad> </s> <unk>) or '[PAD]' (the bare bert-base-chinese vocab)")
    for i, token in enumerate(tokens[4:], start=4):
        if token in text.SPECIALS:
            raise ConversionError(f"{path}: special token {token!r} appears again as id {i}")
        if i >= MASK_ID and token != canonical_token(i):
            raise ConversionError(f"{path}: id {i} is {token!r}, expected {canonical_token(i)!r}")
    if len(tokens) > vocab_size:
        raise ConversionError(f"{path}: {len(tokens)} tokens but config.json vocab_size is {vocab_size}")
    if len(tokens) < vocab_size:
        if len(tokens) < MASK_ID:
            raise ConversionError(f"{path}: only {len(tokens)} tokens (with the 4 specials); config.json vocab_size "
                                  f"{vocab_size} needs the full {BERT_VOCAB_LINES}-line BERT vocabulary")
        tokens += [canonical_token(i) for i in range(len(tokens), vocab_size)]
    return tokens


def _transforms(cfg: dict, split: str, is_train: bool, path: str) -> list:
    """fairseq S2TDataConfig.get_feature_transforms lookup: split, then _train/_eval, then '*'."""
    found = []
    for key in ("transforms", "feature_transforms"):
        table = cfg.get(key) or {}
        names = table.get(split)
        if names is None:
            names = table.get("_train" if is_train else "_eval")
        if names is None:
            names = table.get("*")
        if names is not None and not isinstance(names, list):
            raise ConversionError(f"{path}: {key} for {split!r} must be a list, got {names!r}")
        found += names or []
    return found


def read_fbank_config(path: str) -> dict:
    """fbank_config.yaml -> {'num_mel_bins', 'sample_rate', 'cmvn' ('utterance' | 'none'), 'train_cmvn',
    'specaugment' (dict or None, training only)}; unsupported transforms are errors."""
    try:
        cfg = yaml.safe_load(files.read_text(path)) or {}
    except files.InputError as e:
        raise ConversionError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConversionError(f"{path}: not YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a YAML mapping, got {type(cfg).__name__}")
    for key in ("transforms", "feature_transforms"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ConversionError(f"{path}: {key} must be a mapping of split -> list of transforms")

    def cmvn_of(names, split):
        rest = [n for n in names if n not in ("utterance_cmvn", "specaugment")]
        if rest:
            raise ConversionError(f"{path}: {split} feature transform(s) {rest} are not supported "
                                  "(only utterance_cmvn, and specaugment for training)")
        return "utterance" if "utterance_cmvn" in names else "none"

    test = _transforms(cfg, "test", False, path)
    train = _transforms(cfg, "train", True, path)
    if "specaugment" in test:
        raise ConversionError(f"{path}: specaugment in the test transforms is not supported")
    mels = cfg.get("input_feat_per_channel", 80)
    if mels != 80 or cfg.get("input_channels", 1) != 1:
        raise ConversionError(f"{path}: input_feat_per_channel={mels}, input_channels={cfg.get('input_channels')}: "
                              "MMSpeech uses 80 mel bins, 1 channel")
    rate = cfg.get("use_sample_rate", 16000)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ConversionError(f"{path}: use_sample_rate={rate!r} is not a sample rate in Hz")
    return {"num_mel_bins": 80, "sample_rate": rate,
            "cmvn": cmvn_of(test, "test"), "train_cmvn": cmvn_of(train, "train"),
            "specaugment": cfg.get("specaugment") if "specaugment" in train else None}


def read_decoding_defaults(path) -> dict:
    """configuration.json model.beam_search (or OfaForAllTasks' defaults when absent) -> our decoding defaults."""
    beam = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                beam = (json.load(f).get("model") or {}).get("beam_search") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise ConversionError(f"{path}: cannot read model.beam_search ({e})") from None
    unknown = sorted(set(beam) - set(BEAM_SEARCH_DEFAULTS))
    if unknown:
        raise ConversionError(f"{path}: model.beam_search key(s) {unknown} are not supported")
    b = {**BEAM_SEARCH_DEFAULTS, **beam}
    constraint = b["constraint_range"]
    if constraint is not None:
        try:
            start, end = (int(x) for x in str(constraint).split(","))
        except ValueError:
            raise ConversionError(f"{path}: constraint_range {constraint!r} is not 'start,end'") from None
        constraint = [start, end]
    return {"beam": int(b["beam_size"]), "max_len_a": float(b["max_len_a"]), "max_len_b": int(b["max_len_b"]),
            "min_len": int(b["min_len"]), "no_repeat_ngram_size": int(b["no_repeat_ngram_size"]),
            "constraint_range": constraint, "len_penalty": float(b["len_penalty"]),
            "normalize_scores": bool(b["normalize_scores"]), "unk_penalty": float(b["unk_penalty"]),
            "temperature": float(b["temperature"])}


# ----------------------------------------------------------------------------------------------------------------------
# Conversion and checkpoints

def convert(model_dir: str, dtype: torch.dtype = torch.float32, **config_overrides) -> dict:
    """A ModelScope MMSpeech directory -> our checkpoint dict (not yet saved)."""
    def path(name, required=True):
        p = os.path.join(model_dir, name)
        if not os.path.isfile(p):
            if required:
                raise ConversionError(f"{model_dir}: {name} not found (needed for conversion)")
            return None
        return p

    if not os.path.isdir(model_dir):
        raise ConversionError(f"ModelScope directory not found: {model_dir}")
    try:
        with open(path("config.json"), encoding="utf-8") as f:
            ms_config = json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path('config.json')}: not valid JSON ({e})") from None
    notes = []
    config = config_from_modelscope(ms_config, notes, **config_overrides)
    state = read_modelscope_weights(path("pytorch_model.bin"))
    model_state, unused = convert_state_dict(state, config, dtype)
    lexicon_path = path("text2phone_dict.txt", required=False)
    configuration_path = path("configuration.json", required=False)
    try:  # the text readers' errors (file:line: why) as the converter's one error type
        phones = text.read_phone_dict(path("phone_dict.txt"), config.phone_vocab_size)
        vocab = read_vocab(path("vocab.txt"), config.vocab_size)
        lexicon = text.read_lexicon(lexicon_path, phones) if lexicon_path else {}
    except files.InputError as e:
        raise ConversionError(str(e)) from None
    assets = {
        "vocab": vocab,
        "phones": phones,
        "lexicon": lexicon,
        "fbank": read_fbank_config(path("fbank_config.yaml")),
        "decoding": read_decoding_defaults(configuration_path),
    }
    notes += [f"{name} absent: {what}" for name, p, what in (
        ("text2phone_dict.txt", lexicon_path, "empty lexicon"),
        ("configuration.json", configuration_path, "OfaForAllTasks' default beam search settings")) if p is None]
    source = {"kind": "modelscope", "dir": os.path.abspath(model_dir), "unused": unused,
              "buffers_dropped": sorted(k for k in state if is_buffer(k)), "tied_head_in_file": TIED_HEAD in state,
              "weights_dtype": sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                                       if v.is_floating_point()}),
              "modelscope_config": ms_config, "notes": notes}
    return make_checkpoint(config, model_state, assets, source)


def assets_for_scratch(samples) -> dict:
    """The assets of a model trained from scratch on samples (data.Sample): vocabulary from the training text
    (+ brackets), MMSpeech's phone inventory (assets/phone_dict.txt), no lexicon (pypinyin), fbank settings,
    decoding defaults. no_repeat_ngram_size 0: the output copies the input, and 47 of CNERTA's 4,440 dev targets
    repeat a 5-gram (19 of AISHELL-NER's 14,326: 年的百分之 ... 年的百分之), which a 5-gram block would make
    unreachable."""
    vocab = text.TextVocab.build(samples).tokens
    return {"vocab": vocab, "phones": text.read_phone_dict(), "lexicon": {},
            "fbank": {"num_mel_bins": 80, "cmvn": "utterance"},
            "decoding": {"beam": 5, "max_len_b": 128, "min_len": 1, "no_repeat_ngram_size": 0,
                         "constraint_range": [4, len(vocab)], "len_penalty": 1.0}}


def make_checkpoint(config: Config, model_state: dict, assets: dict, source: dict, **training_state) -> dict:
    """The checkpoint format (version CHECKPOINT_VERSION), the one writer of it:

        format   "image-checkpoint"     version  CHECKPOINT_VERSION
        config   dataclasses.asdict(image.Config)
        model    {name: tensor}, our parameter names (no recomputed buffers; the tied LM head under its own name)
        assets   vocab, phones, lexicon, fbank, decoding (search defaults) and, for a model trained by train.py,
                 pseudo_text_len (the length of the pseudo text that stands for an absent text; decode needs the same)
        source   where the weights came from (ModelScope conversion or train.py with its arguments); read by people
    training_state adds train.py's fields beside these (best.pt: best_f1; last.pt: optimizer, scaler, scheduler,
    step, epoch, step_in_epoch, best_f1, rng, world_size, split, plan, seed, loss)."""
    clash = sorted(set(training_state) & set(FORMAT_KEYS))
    if clash:
        raise ValueError(f"make_checkpoint: training state may not replace the format's keys {clash}")
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": dataclasses.asdict(config),
            "model": model_state, "assets": assets, "source": source, **training_state}


def save_checkpoint(ckpt: dict, path: str) -> None:
    """torch.save atomically (files.atomic_path: temp file beside path, fsync, rename; ordinary permissions)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def read_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """Our checkpoint file -> its dict in the current format (older versions migrated); another kind of file, a
    missing key or a version this code does not know is a ConversionError naming the path."""
    return migrate(load_torch_file(path, what), path)


def migrate(ckpt, path: str) -> dict:
    """A loaded checkpoint of any version -> the same in the current one (a new dict; tensors shared), after checking
    that it is one of ours.

    Version 1 -> 2: the pseudo text length was only train.py's argument source.args.pseudo_len; it becomes
    assets.pseudo_text_len (converted checkpoints have neither)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConversionError(f"{path}: not an {CHECKPOINT_FORMAT} file (a ModelScope directory? convert it with "
                              "`python weights.py MODELSCOPE_DIR OUT.pt`)")
    missing = [k for k in FORMAT_KEYS if k not in ckpt]
    if missing:
        raise ConversionError(f"{path}: an incomplete {CHECKPOINT_FORMAT} file (no {', '.join(missing)})")
    if ckpt["version"] == 1:
        pseudo_len = ((ckpt["source"] or {}).get("args") or {}).get("pseudo_len")
        assets = dict(ckpt["assets"])
        if pseudo_len is not None:
            assets["pseudo_text_len"] = pseudo_len
        ckpt = {**ckpt, "version": 2, "assets": assets}
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise ConversionError(f"{path}: checkpoint version {ckpt['version']!r}, this code reads "
                              f"{CHECKPOINT_VERSION} and older")
    return ckpt


# what train.py --resume needs beyond the model: best.pt has none of it
RESUME_KEYS = ("optimizer", "step", "epoch", "best_f1", "rng", "world_size")


def read_last_checkpoint(path, plan: dict) -> dict:
    """train.py's OUT/last.pt for --resume, in the current format. A missing, unreadable or wrong kind of file, or one
    trained with other plan settings (`plan`: train.py's PLAN_KEYS; its steps would be other rows), is an InputError
    naming it. A last.pt of a train.py before global-batch plans (batch_in_epoch: this rank's micro-batches) gets
    step_in_epoch."""
    path = Path(path)
    if not path.is_file():
        raise files.InputError(f"--resume: no checkpoint {path}" + (" (a folder)" if path.is_dir() else ""))
    ckpt = load_torch_file(str(path), "--resume checkpoint")
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not ("step_in_epoch" in ckpt or "batch_in_epoch" in ckpt):
        missing = ", ".join(missing or ["step_in_epoch"])
        raise files.InputError(f"{path}: not a last.pt written by train.py (no {missing}; best.pt keeps only the "
                               "model, --resume needs the run's last.pt)")
    ckpt = migrate(ckpt, str(path))
    saved = ckpt.get("plan") or {}
    changed = [f"--{k.replace('_', '-')} {saved[k]} (now {v})" for k, v in plan.items() if k in saved and saved[k] != v]
    if changed:
        raise files.InputError(f"--resume: {path} was trained with " + ", ".join(changed) + ": its steps would "
                               "be other rows; resume with the run's settings, or start afresh in another --out")
    if "step_in_epoch" not in ckpt:
        accum = int(((ckpt["source"] or {}).get("args") or {}).get("grad_accum", 1))
        ckpt = {**ckpt, "step_in_epoch": ckpt["batch_in_epoch"] // accum}
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu", where: str = "checkpoint", **config_overrides) -> IMAGE:
    """The model of a checkpoint dict (current version), in eval mode on device; the tensors are the checkpoint's
    own (built on the meta device, then load_state_dict(assign=True): no random init, no copy; dtype as stored;
    memory-mapped when read by read_checkpoint). Buffers derived in __init__ (the decoder's bucket table, not in
    checkpoints) are computed on the CPU even then, and move to device with the weights.

    config_overrides replace Config fields (e.g. modelscope_padding=True, mask_pseudo=True, dropout=0.0);
    use_modality_embedding=False drops a stored modality embedding (the ablation). Every other weight must fit
    the config exactly; `where` names the checkpoint in errors."""
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(ckpt["config"]) - fields) + sorted(set(config_overrides) - fields)
    if unknown:
        raise ConversionError(f"{where}: unknown config field(s) {unknown}")
    config = Config(**{**ckpt["config"], **config_overrides})
    state = ckpt["model"]
    if config_overrides.get("use_modality_embedding") is False:
        state = {k: v for k, v in state.items() if k != MODALITY_EMBEDDING}
    with torch.device("meta"):
        model = IMAGE(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConversionError(f"{where}: weights do not fit the config: {e}") from None
    empty = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if empty:   # a tensor that __init__ derives without device="cpu" stays a meta tensor: no values
        raise RuntimeError(f"model_from_checkpoint: {', '.join(empty)} left on the meta device (not in the checkpoint "
                           "and not computed on the CPU in image.py's __init__)")
    return model.to(device).eval()


def load_checkpoint(path: str, device="cpu", **config_overrides) -> tuple:
    """Our checkpoint file -> (model in eval mode on device, assets, the checkpoint dict in the current version).

    config_overrides replace Config fields for this run (e.g. modelscope_padding=True, mask_pseudo=True).
    """
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device, path, **config_overrides), ckpt["assets"], ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a ModelScope MMSpeech directory into one IMAGE checkpoint.")
    p.add_argument("modelscope_dir", help="ModelScope model directory (config.json, pytorch_model.bin, vocab.txt, "
                                          "phone_dict.txt, fbank_config.yaml, configuration.json, text2phone_dict.txt)")
    p.add_argument("out", help="output checkpoint (.pt), written atomically")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the stored weights (default float32; ModelScope's fp16 weights are cast)")
    args = p.parse_args(argv)
    with files.cli_errors("weights.py"):
        # before the conversion, not after it; a missing folder is made, as save_checkpoint does
        files.check_output_dir(os.path.dirname(os.path.abspath(args.out)), "output folder")
        files.check_output_file(args.out, "output checkpoint")
        ckpt = convert(args.modelscope_dir, getattr(torch, args.dtype))
        save_checkpoint(ckpt, args.out)
    config, source = ckpt["config"], ckpt["source"]
    n_params = sum(v.numel() for v in ckpt["model"].values())
    print(f"wrote {args.out}: {n_params:,} parameters ({args.dtype}), d_model {config['d_model']}, "
          f"{config['encoder_layers']}+{config['decoder_layers']} layers, vocab {len(ckpt['assets']['vocab'])}, "
          f"scale_embedding={config['scale_embedding']}, entangle={config['entangle_position_embedding']}, "
          f"cmvn={ckpt['assets']['fbank']['cmvn']}")
    print(f"unused ModelScope tensors ({len(source['unused'])}): {', '.join(source['unused'])}")
    if source["buffers_dropped"]:
        print(f"buffers recomputed, not converted: {', '.join(source['buffers_dropped'])}")
    for note in source["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
