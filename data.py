"""data.py: corpora -> unified IMNER samples -> model inputs -> batches.

A sample is a sentence, its entity spans (start, end exclusive, type; nesting allowed) and, when the corpus has
speech, the path of its wav. For a modality (TNER text only, SNER speech only, MNER both) the Featurizer turns it
into the tensors of one batch row; Loader draws the modality of every sample each epoch and batches them.

Sections: 1 samples | 2 linearization (ours) | 3 the official code's rules | 4 loaders | 5 model inputs | 6 batching.
Vocabulary, specials, brackets, phones: text.py; a scratch model's assets: weights.py; scoring and corpus statistics
(python evaluate.py stats): evaluate.py.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import audio
import demo
import files
from text import (BOS, BRACKET_CHARS, BRACKETS, EOS, PAD, TO_FULLWIDTH, TYPE_OF_CLOSE, TYPE_OF_OPEN, TYPES, UNK,
                  Phonemizer, TextVocab)

# ----------------------------------------------------------------------------------------------------------------
# 1. Samples

TASKS = ("TNER", "SNER", "MNER")
NEITHER = "NONE"  # the official coin mix's fourth case: both inputs pseudo, target = UNKs
OUTER_FIRST = {"ORG": 0, "LOC": 1, "PER": 2}  # nesting order of identical spans with different types


class Entity(NamedTuple):
    start: int  # character offset in Sample.text
    end: int  # exclusive
    type: str  # PER | LOC | ORG


@dataclass
class Sample:
    id: str
    text: str
    entities: list[Entity] = field(default_factory=list)  # file order (the official rule depends on it)
    audio: str | None = None
    times: list[tuple[float, float]] | None = None  # gold (start_s, end_s) of each entity's speech, where recorded


class DataError(files.InputError):
    """A malformed corpus line; the message starts with 'file:line:'."""


def read_lines(path) -> list[str]:
    """files.read_lines with its errors as DataError."""
    try:
        return files.read_lines(path)
    except files.InputError as e:
        raise DataError(str(e)) from None


def json_lines(path):
    """-> (line number, parsed object) for every non-blank line of a JSON-lines file; a bad line says where."""
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if "\\u" in line:  # an escape may spell half of a surrogate pair, which is no text (and cannot be written)
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{path}:{lineno}: a lone surrogate escape (\\u{ord(e.object[e.start]):04x}) "
                                "is not text") from None
        yield lineno, obj


def entity_problem(text: str, start: int, end: int, kind: str) -> str | None:
    """Why the span [start, end) of type kind does not fit text; None when it does."""
    if kind not in BRACKETS:
        return f"type {kind!r} is not PER, LOC or ORG"
    if start < 0:
        return f"start {start} < 0"
    if start >= end:
        return f"start {start} >= end {end}"
    if end > len(text):
        return f"end {end} > sentence length {len(text)}"
    return None


def check_entities(text: str, entities) -> None:
    for e in entities:
        problem = entity_problem(text, *e)
        if problem:
            raise ValueError(f"entity {tuple(e)}: {problem}")


# ----------------------------------------------------------------------------------------------------------------
# 2. Our linearization: properly nested brackets, outermost opens first, innermost closes first, no collapsing.
# parse(linearize(text, E)) == (text, sorted(set(E))) for every set E without crossing spans.


def nest(entities) -> tuple[list[Entity], list[Entity], int]:
    """-> (kept, crossing, duplicates). Identical (start, end, type) entries count once (duplicates = how many
    extra). Of two crossing spans (overlapping, neither inside the other) the shorter is dropped, the later one
    at equal length, so the outer structure survives."""
    unique = set(map(Entity._make, entities))
    kept, crossing = [], []
    for e in sorted(unique, key=lambda e: (e.start - e.end, e.start, OUTER_FIRST[e.type])):
        if any(k.start < e.start < k.end < e.end or e.start < k.start < e.end < k.end for k in kept):
            crossing.append(e)
        else:
            kept.append(e)
    return sorted(kept), sorted(crossing), len(entities) - len(unique)


def linearize(text: str, entities) -> str:
    """'央视和中超', [(0,2,ORG), (3,5,ORG), (3,4,LOC)] -> '<央视>和<(中)超>'. Crossing spans are dropped (see nest)."""
    if any(c in BRACKET_CHARS for c in text):
        raise ValueError(f"text contains a bracket character: {text!r} (loaders map them to full width)")
    check_entities(text, entities)
    opens, closes = collections.defaultdict(list), collections.defaultdict(list)
    for e in nest(entities)[0]:
        opens[e.start].append(e)
        closes[e.end].append(e)
    out = []
    for p in range(len(text) + 1):
        out += [BRACKETS[e.type][1] for e in sorted(closes[p], key=lambda e: (-e.start, -OUTER_FIRST[e.type]))]
        out += [BRACKETS[e.type][0] for e in sorted(opens[p], key=lambda e: (-e.end, OUTER_FIRST[e.type]))]
        if p < len(text):
            out.append(text[p])
    return "".join(out)


def parse(bracketed: str, strict: bool = False) -> tuple[str, list[Entity]]:
    """Stack parse -> (bracket-free text, sorted unique entities). A close bracket pairs with the innermost open
    bracket of its type. Not strict (model output): stray closes, unclosed opens and empty entities are ignored.
    Strict (corpus files): they, and brackets that cross, raise ValueError."""
    chars, stack, found = [], [], set()
    for i, ch in enumerate(bracketed):
        if ch in TYPE_OF_OPEN:
            stack.append((TYPE_OF_OPEN[ch], len(chars)))
        elif ch in TYPE_OF_CLOSE:
            kind = TYPE_OF_CLOSE[ch]
            depth = next((d for d in range(len(stack) - 1, -1, -1) if stack[d][0] == kind), None)
            if strict and depth != len(stack) - 1:
                raise ValueError(f"'{ch}' at character {i} closes no open {kind}"
                                 + (f" (crosses an open {stack[-1][0]})" if depth is not None else ""))
            if depth is None:
                continue
            start = stack.pop(depth)[1]
            if start < len(chars):
                found.add(Entity(start, len(chars), kind))
            elif strict:
                raise ValueError(f"empty {kind} entity before character {i}")
        else:
            chars.append(ch)
    if strict and stack:
        raise ValueError(f"{len(stack)} unclosed bracket(s), the last a {stack[-1][0]} at text offset {stack[-1][1]}")
    return "".join(chars), sorted(found)


# ----------------------------------------------------------------------------------------------------------------
# 3. The official code's rules (NingJinzhong/IMAGE4IMNER), to reproduce paper-style numbers. IMAGE.md §1.6-1.7.


def linearize_official(text: str, entities) -> str:
    """The rule that made the official data/CNERTA/*.txt from CNERTA's JSON (reverse-engineered): at each boundary
    the closing brackets (longest entity first) then the opening ones (longest first); the run of identical
    symbols next to the character collapses to one. Lossy: same-type entities sharing a boundary merge
    (搜狐 in 搜狐科技 -> '<搜狐>科技>'). The order of `entities` matters (stable sort), as in the JSON file."""
    check_entities(text, entities)
    longest_first = sorted(entities, key=lambda e: e.start - e.end)
    out = []
    for p in range(len(text) + 1):
        closes = [BRACKETS[e.type][1] for e in longest_first if e.end == p]
        opens = [BRACKETS[e.type][0] for e in longest_first if e.start == p]
        while len(closes) > 1 and closes[1] == closes[0]:
            del closes[1]
        while len(opens) > 1 and opens[-2] == opens[-1]:
            del opens[-2]
        out += closes + opens
        if p < len(text):
            out.append(text[p])
    return "".join(out)


def parse_official(bracketed: str, last_char_bug: bool = True) -> tuple[str, list[Entity]]:
    """The official evaluator's parser -> (bracket-free text, sorted unique entities with offsets in it). Per type,
    every open bracket pairs with the nearest close after it, and every close with the nearest open before it;
    the union counts. With last_char_bug (as released) an entity ending at the last character is never found."""
    raw, marks = [], collections.defaultdict(set)
    for ch in bracketed:
        if ch in TYPE_OF_OPEN:
            marks[TYPE_OF_OPEN[ch], "open"].add(len(raw))
        elif ch in TYPE_OF_CLOSE:
            marks[TYPE_OF_CLOSE[ch], "close"].add(len(raw))
        else:
            raw.append(ch)
    last = len(raw) - 1 if last_char_bug else len(raw)  # largest end offset the loops visit
    found = set()
    for kind in TYPES:
        opens, closes = marks[kind, "open"], marks[kind, "close"]
        for s in sorted(o for o in opens if o < len(raw)):
            e = next((e for e in range(s + 1, last + 1) if e in closes), None)
            if e is not None:
                found.add(Entity(s, e, kind))
        for e in sorted((c for c in closes if 0 < c <= last), reverse=True):
            s = next((s for s in range(e - 1, -1, -1) if s in opens), None)
            if s is not None:
                found.add(Entity(s, e, kind))
    return "".join(raw), sorted(found)


# ----------------------------------------------------------------------------------------------------------------
# 4. Loaders: load_split(dataset, data_dir, split) -> SampleList (a list of Samples with a .report dict)

DATASETS = ("cnerta", "demo", "aishell_ner", "msra", "image4imner")
SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev", "test": "test"}
FILES = {  # candidate file names per dataset; {s}: train|dev|test, {v}: train|valid|test
    "cnerta": ["{v}.json", "{s}.json"],
    "aishell_ner": ["aishell_ner_transcript.{s}.txt", "{v}.txt", "{s}.txt"],
    "image4imner": ["{v}.txt", "image4imner_{v}_bracketed.txt", "{s}.txt"],
    "msra": ["{s}.txt", "{v}.txt", "{s}.bio.txt", "{s}.bio", "{s}.char.bmes", "{s}.bmes", "msra_{s}_bio.txt",
             "msra_{s}.txt", "{s}_dev.char.bmes"],
}
BIO_TYPES = {"PER": "PER", "LOC": "LOC", "ORG": "ORG", "NR": "PER", "NS": "LOC", "NT": "ORG"}
BIO_TAG = re.compile(r"^(?:O|([BIMES])[-_]([A-Za-z]+))$")


class SampleList(list):
    """list[Sample] plus .report: file, counts, audio found/missing, malformed lines."""

    report: dict


def load_split(dataset: str, data_dir, split: str, audio_dir=None, errors: str = "raise",
               verbose: bool = True) -> SampleList:
    """Read one split. errors='raise' stops at the first malformed line (DataError 'file:line: why');
    'collect' skips such lines and lists them in .report['malformed']. Audio is looked up by utterance id under
    audio_dir (default DATA_DIR/wav when it exists): utterances without a wav keep audio=None (TNER only) and
    are counted in the report."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from train, dev, test")
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', not {errors!r}")
    if data_dir is None and dataset == "demo":
        data_dir = demo.ensure_demo_corpus()
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} needs a data directory")
    data_dir, s = Path(data_dir), SPLITS[split]
    kind = "cnerta" if dataset == "demo" else dataset
    names = [n.format(s=s, v="valid" if s == "dev" else s) for n in FILES[kind]]
    path = next((data_dir / n for n in dict.fromkeys(names) if (data_dir / n).is_file()), None)
    if path is None:
        raise DataError(f"{dataset} {split}: none of {', '.join(dict.fromkeys(names))} in {data_dir}")
    reader = {"cnerta": _read_cnerta, "aishell_ner": _read_bracketed, "image4imner": _read_bracketed,
              "msra": _read_bio}[kind]
    samples, malformed, replaced = SampleList(), [], 0
    for lineno, item in reader(read_lines(path), dataset, s):
        if isinstance(item, Exception):
            err = DataError(f"{path}:{lineno}: {item}")
            if errors == "raise":
                raise err from item
            malformed.append(str(err))
            continue
        if any(c in BRACKET_CHARS for c in item.text):  # keep linearization invertible; offsets unchanged
            item.text, replaced = item.text.translate(TO_FULLWIDTH), replaced + 1
        samples.append(item)
    report = {"file": str(path), "sentences": len(samples), "brackets_made_fullwidth": replaced,
              "malformed_count": len(malformed), "malformed": malformed[:5]}
    if audio_dir is None and kind != "msra" and (data_dir / "wav").is_dir():
        audio_dir = data_dir / "wav"
    report.update(attach_audio(samples, audio_dir))
    samples.report = report
    if verbose and audio_dir is not None and report["audio_missing"]:
        print(f"data: {report['audio_missing']} of {len(samples)} {dataset} {split} utterances have no wav under "
              f"{audio_dir} (e.g. {', '.join(report['audio_missing_examples'])}); they are used for TNER only",
              file=sys.stderr)
    return samples


def _read_cnerta(lines, dataset, split):
    """JSON lines {"sentence", "audio", "entity": [[start, end_exclusive, text, TYPE], ...], ...}."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict) or not isinstance(d.get("sentence"), str) or not isinstance(d.get("entity"), list):
                raise ValueError('expected a JSON object with "sentence" (string) and "entity" (list)')
            text, entities = d["sentence"], []
            for item in d["entity"]:
                if not (isinstance(item, list) and len(item) == 4 and all(isinstance(x, int) for x in item[:2])):
                    raise ValueError(f"entity {item!r} is not [start, end, text, type]")
                start, end, span, kind = item
                problem = entity_problem(text, start, end, kind)
                if problem is None and text[start:end] != span:
                    problem = f"the sentence has {text[start:end]!r} at [{start}, {end})"
                if problem:
                    raise ValueError(f"entity {item!r}: {problem}")
                entities.append(Entity(start, end, kind))
            yield lineno, Sample(str(d.get("audio") or f"{dataset}-{split}-{lineno}"), text, entities,
                                 times=_entity_times(d, len(entities)))
        except (ValueError, TypeError) as e:
            yield lineno, e


def _entity_times(d, n):
    """The optional "entity_times": [[start_s, end_s], ...], one per entity (the demo corpus records them)."""
    times = d.get("entity_times")
    if times is not None and not (isinstance(times, list) and len(times) == n and all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, (int, float)) for x in t) and 0 <= t[0] < t[1]
            for t in times)):
        raise ValueError(f'"entity_times" must be one [start_s, end_s] per entity ({n}), 0 <= start_s < end_s')
    return None if times is None else [(float(a), float(b)) for a, b in times]


def _read_bracketed(lines, dataset, split):
    """'<utt id> <bracketed text>' lines. aishell_ner: our strict parser; image4imner (the official repo's lossy
    files): the official pairing rule, without its last-character bug so that the training targets keep what
    the file says."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            yield lineno, ValueError(f"expected '<utterance id> <bracketed text>', got {line.strip()[:60]!r}")
            continue
        try:
            body = parts[1].strip()
            text, entities = parse(body, strict=True) if dataset == "aishell_ner" else parse_official(body, False)
            yield lineno, Sample(parts[0], text, entities)
        except ValueError as e:
            yield lineno, e


def _read_bio(lines, dataset, split):
    """'character TAG' lines (BIO or BMES; types PER/LOC/ORG or NR/NS/NT), a blank line between sentences."""
    chars, tags, first, bad = [], [], None, None
    for lineno, line in enumerate(itertools.chain(lines, [""]), 1):  # "": flushes the last sentence
        fields = line.split()
        if fields and bad is None:
            m = BIO_TAG.match(fields[-1]) if len(fields) == 2 and len(fields[0]) == 1 else None
            if m is None:
                bad = (lineno, ValueError(f"expected 'character TAG', got {line.strip()[:60]!r}"))
            elif m.group(2) and m.group(2).upper() not in BIO_TYPES:
                bad = (lineno, ValueError(f"tag {fields[-1]!r}: type not PER/LOC/ORG (or NR/NS/NT)"))
            else:
                first = first or lineno
                chars.append(fields[0])
                tags.append((m.group(1), BIO_TYPES.get((m.group(2) or "").upper())))
        elif not fields:
            if bad or chars:
                yield bad or (first, Sample(f"{dataset}-{split}-{first}", "".join(chars), _tags_to_entities(tags)))
            chars, tags, first, bad = [], [], None, None


def _tags_to_entities(tags) -> list[Entity]:
    """BIO/BMES -> spans. An I/M/E that does not continue an entity of its type starts one (conlleval's rule)."""
    out, start, kind = [], None, None
    for i, (prefix, t) in enumerate(tags + [(None, None)]):
        if start is not None and (prefix in (None, "B", "S") or t != kind):
            out.append(Entity(start, i, kind))
            start = None
        if prefix is not None and start is None:
            start, kind = i, t
        if prefix in ("E", "S"):
            out.append(Entity(start, i + 1, kind))
            start = None
    return out


@functools.lru_cache(maxsize=8)
def audio_index(audio_dir: str) -> dict[str, str]:
    """Utterance id -> wav path for every *.wav below audio_dir (AISHELL-1 wav/{train,dev,test}/SXXXX/ID.wav, its
    parent, or a flat folder). The id is the file name up to its first dot."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise DataError(f"audio directory {root} does not exist")
    index, tarballs = {}, 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".wav"):
                index.setdefault(name.split(".")[0], os.path.join(dirpath, name))
            tarballs += name.endswith(".tar.gz")
    if not index and tarballs:
        raise DataError(f"{root} holds {tarballs} .tar.gz files but no wavs: extract AISHELL-1's "
                                f"per-speaker tarballs first (in wav/: for f in *.tar.gz; do tar xzf $f; done)")
    return index


def attach_audio(samples, audio_dir) -> dict:
    """Set sample.audio from the index (None where absent) -> counts for the report."""
    index = audio_index(str(Path(audio_dir).resolve())) if audio_dir is not None else {}
    missing = []
    for s in samples:
        s.audio = index.get(s.id)
        if s.audio is None:
            missing.append(s.id)
    return {"audio_dir": None if audio_dir is None else str(audio_dir), "audio_found": len(samples) - len(missing),
            "audio_missing": len(missing), "audio_missing_examples": missing[:3]}


# ----------------------------------------------------------------------------------------------------------------
# 5. Model inputs of one sample for one modality (make_row: the keys and shapes of one batch row)

PSEUDO_SPEECH_SAMPLES = 10_000  # an absent speech input is the features of 0.625 s of zeros at 16 kHz


def _speech_features(path, speed: float, cmvn: str) -> torch.Tensor:
    return audio.speech_features(audio.load_audio(path, sample_rate=16000), cmvn=cmvn, speed=speed)


def _pseudo_speech_features(cmvn: str) -> torch.Tensor:
    return audio.speech_features(torch.zeros(PSEUDO_SPEECH_SAMPLES), cmvn=cmvn, speed=1.0)


class Featurizer:
    """Builds the tensors of one batch row. assets: a checkpoint's "assets" dict (vocab, phones, lexicon, fbank).

    Speech: fbank (T, 80) of the wav at a speed, or of 10,000 zero samples (pseudo, never perturbed). Text: phones
    of the bracket-free sentence + the character of each phone, or pseudo_text_len x (pseudo_phone, UNK).
    Target: the bracketed sentence (ours, section 2) + EOS for every task; for NEITHER neither_len x UNK + EOS.
    Feature cache: an in-process LRU of memory_cache entries, and with cache_dir a disk cache shared by
    DataLoader workers and runs (float32 .pt files written atomically; ~160 KB per 5 s utterance and speed)."""

    def __init__(self, assets: dict, pseudo_text_len: int = 40, pseudo_phone: str = "#2", neither_len: int = 50,
                 cache_dir=None, memory_cache: int = 4096):
        self.vocab = TextVocab(assets["vocab"])
        self.phones = list(assets["phones"])
        self.phone_id = {p: i for i, p in enumerate(self.phones)}
        if pseudo_phone not in self.phone_id:
            raise ValueError(f"pseudo phone {pseudo_phone!r} is not in the phone inventory "
                             f"({', '.join(p for p in self.phones if p.startswith('#'))})")
        self.phonemizer = Phonemizer(self.phones, assets.get("lexicon") or None)
        fbank = dict(assets.get("fbank") or {})
        self.num_mel_bins, self.cmvn = int(fbank.get("num_mel_bins", 80)), fbank.get("cmvn", "utterance")
        self.pseudo_text_len, self.pseudo_phone, self.neither_len = pseudo_text_len, pseudo_phone, neither_len
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory_cache, self._lru, self._pseudo, self._texts = memory_cache, collections.OrderedDict(), None, {}
        self.computed = 0  # fbank computations in this process (cache misses)

    def target(self, sample: Sample) -> list[int]:
        return self.vocab.encode(linearize(sample.text, sample.entities)) + [EOS]

    def text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> phones (P,), phone_chars (P,): phone ids and the vocabulary id of each phone's character."""
        if text not in self._texts:  # pypinyin costs ~1 ms a sentence: once per sentence, not per epoch
            units, which = self.phonemizer(text)
            chars = self.vocab.encode(text)
            if len(self._texts) >= 200_000:
                self._texts.clear()
            self._texts[text] = (torch.tensor([self.phone_id.get(u, UNK) for u in units], dtype=torch.long),
                                 torch.tensor([chars[i] for i in which], dtype=torch.long))
        return self._texts[text]

    def pseudo_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((self.pseudo_text_len,), self.phone_id[self.pseudo_phone], dtype=torch.long),
                torch.full((self.pseudo_text_len,), UNK, dtype=torch.long))

    def speech(self, path, speed: float = 1.0) -> torch.Tensor:
        """(T, num_mel_bins) float32, computed once per (file, speed) while cached."""
        key = (str(path), float(speed))
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        feats, file = None, None
        if self.cache_dir is not None:
            st = os.stat(path)
            name = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{float(speed)}|{self.cmvn}|"
                                f"{self.num_mel_bins}|{audio.FEATURES_VERSION}".encode()).hexdigest()
            file = self.cache_dir / name[:2] / f"{name}.pt"
            if file.is_file():
                try:
                    feats = torch.load(file, weights_only=True)
                except Exception:  # a torn file from a killed run: recompute
                    feats = None
        if feats is None:
            feats = _speech_features(path, speed, self.cmvn).float().contiguous()
            self.computed += 1
            if feats.dim() != 2 or feats.shape[1] != self.num_mel_bins:
                raise DataError(f"{path}: features of shape {tuple(feats.shape)}, expected (T, {self.num_mel_bins})")
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                with files.atomic_path(file) as tmp:
                    torch.save(feats, tmp)
        if self.memory_cache > 0:
            self._lru[key] = feats
            while len(self._lru) > self.memory_cache:
                self._lru.popitem(last=False)
        return feats

    def pseudo_speech(self) -> torch.Tensor:
        if self._pseudo is None:
            self._pseudo = _pseudo_speech_features(self.cmvn).float().contiguous()
        return self._pseudo

    def inputs(self, sample: Sample, task: str, speed: float = 1.0, wave=None) -> dict:
        """The row of a corpus sample under task (training): its target is the bracketed sentence + EOS. wave: float
        (N,) at 16 kHz heard instead of the sample's audio file (an augmented waveform: not cached)."""
        if task not in TASKS + (NEITHER,):
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)} (or {NEITHER})")
        has_speech = task in ("SNER", "MNER")
        if has_speech and sample.audio is None:
            raise ValueError(f"{task} needs audio, but sample {sample.id} has none")
        fbank = None if not has_speech else self.speech(sample.audio, speed) if wave is None else \
            audio.speech_features(wave, cmvn=self.cmvn, speed=speed).float().contiguous()
        target = self.target(sample) if task != NEITHER else [UNK] * self.neither_len + [EOS]
        return self.row(task, fbank, sample.text, target)

    def row(self, task: str, fbank=None, text=None, target=(EOS,)) -> dict:
        """The row of one input under task: fbank (T, 80) is read for SNER/MNER, text for TNER/MNER, pseudo inputs
        stand in for the rest (NEITHER: both). target: token ids ending with EOS (decoding: EOS alone)."""
        has_speech, has_text = task in ("SNER", "MNER"), task in ("TNER", "MNER")
        fbank = fbank if has_speech else self.pseudo_speech()  # (T, 80)
        phones, phone_chars = self.text(text) if has_text else self.pseudo_text()  # (P,), (P,)
        return make_row(fbank, phones, phone_chars, has_speech, has_text, target)


def make_row(fbank, phones, phone_chars, speech_present: bool, text_present: bool, target) -> dict:
    """The unbatched model inputs of one row. target: token ids ending with EOS; decoder_input = BOS + target[:-1]
    (teacher forcing; decoding starts from BOS alone, target [EOS])."""
    target = torch.as_tensor(target, dtype=torch.long)  # (L,)
    return {"fbank": fbank, "fbank_lengths": torch.tensor(fbank.shape[0]),
            "speech_present": torch.tensor(speech_present),
            "phones": phones, "phone_chars": phone_chars, "phone_lengths": torch.tensor(len(phones)),
            "text_present": torch.tensor(text_present),
            "decoder_input": torch.cat([torch.tensor([BOS]), target[:-1]]), "target": target}


def asr_row(fbank, ids=()) -> dict:
    """A row of MMSpeech's own task, ASR: speech only, no text stream; target ids + EOS (decoding: ids empty)."""
    empty = torch.zeros(0, dtype=torch.long)
    return make_row(fbank, empty, empty, True, False, [*ids, EOS])


# ----------------------------------------------------------------------------------------------------------------
# 6. Batching, one path: Loader. Its plan decides the batches of an epoch (samples, tasks, speeds,
# length buckets, rank shards); BatchBuilder builds each (features, collate, CTC phone targets, entity swaps).


def collate(items: list[dict]) -> dict:
    """Unbatched input dicts -> the batch dict: zero-padded fbank, PAD-padded phones and tokens, lengths, flags."""
    def pad(key, value):
        seqs = [x[key] for x in items]
        out = torch.full((len(seqs), max(len(s) for s in seqs), *seqs[0].shape[1:]), value, dtype=seqs[0].dtype)
        for row, s in enumerate(seqs):
            out[row, : len(s)] = s
        return out
    batch = {"fbank": pad("fbank", 0.0),  # (B, T, 80)
             "phones": pad("phones", PAD), "phone_chars": pad("phone_chars", PAD),  # (B, P)
             "decoder_input": pad("decoder_input", PAD), "target": pad("target", PAD)}  # (B, L)
    for key in ("fbank_lengths", "phone_lengths", "speech_present", "text_present"):
        batch[key] = torch.stack([x[key] for x in items])  # (B,)
    return {k: batch[k] for k in ("fbank", "fbank_lengths", "speech_present", "phones", "phone_chars",
                                  "phone_lengths", "text_present", "decoder_input", "target")}


PSEUDO_FRAMES = audio.num_fbank_frames(PSEUDO_SPEECH_SAMPLES)


class BatchBuilder(torch.utils.data.Dataset):
    """Collated batch of one plan entry (epoch, [(sample index, task, speed), ...]) of a Loader.

    Built per entry, not per sample, so a resumed run skips finished batches without computing their features.
    With ctc_classes > 0 the batch also has CTC phone targets: ctc_phones (B, P) padded with PAD, ctc_lengths (B,),
    0 for rows without real speech. With entity_swap (augment.EntitySwap) TNER rows get their entities replaced, with
    entity_gap (augment.EntityGap) SNER rows some entities bleeped out, with noise (augment.NoiseMix) speech rows
    background noise, drawn afresh for every (epoch, sample)."""

    def __init__(self, samples, featurizer, ctc_classes=0, entity_swap=None, entity_gap=None, noise=None):
        self.samples, self.featurizer, self.ctc_classes = samples, featurizer, ctc_classes
        self.entity_swap, self.entity_gap, self.noise = entity_swap, entity_gap, noise

    def sample(self, epoch, i, task):
        """-> (the row's Sample, its waveform or None = the sample's own audio file)."""
        key = f"{epoch}:{i}"
        if self.entity_swap is not None and task == "TNER":
            return self.entity_swap(self.samples[i], key), None
        sample, wave = self.samples[i], None
        if self.entity_gap is not None and task == "SNER":
            sample, wave = self.entity_gap(sample, key) or (sample, None)
        if self.noise is not None and task != "TNER" and sample.audio is not None:
            if wave is None:
                wave = audio.load_audio(sample.audio, sample_rate=audio.SAMPLE_RATE)      # (N,)
            wave = self.noise(wave, key, epoch)
        return sample, wave

    def __getitem__(self, entry):
        epoch, rows = entry
        drawn = [self.sample(epoch, i, task) for i, task, _ in rows]
        batch = collate([self.featurizer.inputs(sample, task, speed, wave)
                         for (sample, wave), (_, task, speed) in zip(drawn, rows)])
        if self.ctc_classes:
            # CTC class = phone id - 3 (class 0 = phone row 3 = blank); other phone ids have no class
            targets = [self.featurizer.text(sample.text)[0] - 3 if task in ("SNER", "MNER")
                       else torch.zeros(0, dtype=torch.long) for (sample, _), (_, task, _) in zip(drawn, rows)]
            targets = [t[(t >= 1) & (t < self.ctc_classes)] for t in targets]
            batch["ctc_lengths"] = torch.tensor([len(t) for t in targets])  # (B,)
            batch["ctc_phones"] = torch.full((len(rows), max(1, max(map(len, targets)))), PAD, dtype=torch.long)
            for row, t in enumerate(targets):
                batch["ctc_phones"][row, :len(t)] = t
        return batch


class Loader:
    """The one batching path (train.py's and every test's), iterated as one list of collated micro-batches a step.

    train: an epoch is a list of steps of batch_size rows (the global batch of one optimizer step), a row being
    (sample index, task, speed); tasks and speeds (for real speech) are redrawn per epoch (set_epoch); steps of
    similar length (sorted within pools of bucket_pool steps) in shuffled order, the last one filled up with the
    epoch's first rows; rank r takes the r-th of world_size contiguous near-equal parts of each step's rows (sorted
    by length), split into grad_accum micro-batches and further by max_frames (padded fbank frames per micro-batch;
    0 = no budget). Not train: every sample for every task in `tasks` it can do (SNER/MNER need audio), speed 1.0,
    sorted by length, batches of batch_size dealt to the ranks in turn. batch_plan() decides the steps (map rows back
    to samples with it), rank_steps() this rank's micro-batches, batches() builds them (BatchBuilder: ctc_classes,
    entity_swap) in a DataLoader; pin_memory: page-locked batches, so that copies to a GPU are asynchronous."""

    def __init__(self, samples, featurizer: Featurizer, batch_size: int, train: bool, task_mix: str = "uniform",
                 tasks=TASKS, seed: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 speeds=(0.9, 1.0, 1.1), bucket_pool: int = 100, ctc_classes: int = 0,
                 entity_swap=None, entity_gap=None, noise=None, grad_accum: int = 1, max_frames: int = 0,
                 pin_memory: bool = False):
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"tasks {tasks!r}: choose from {', '.join(TASKS)}")
        if task_mix not in ("uniform", "coin") or (train and task_mix == "coin" and set(tasks) != set(TASKS)):
            raise ValueError(f"task_mix {task_mix!r}: 'uniform' (any tasks) or 'coin' (all three tasks)")
        if batch_size < 1 or not 0 <= rank < world_size or grad_accum < 1 or max_frames < 0:
            raise ValueError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}, grad_accum "
                             f"{grad_accum}, max_frames {max_frames}")
        if train and batch_size < world_size:
            raise ValueError(f"a global batch of {batch_size} rows cannot give each of {world_size} ranks a row")
        self.samples, self.featurizer, self.batch_size, self.train = samples, featurizer, batch_size, train
        self.task_mix, self.tasks, self.seed = task_mix, tuple(tasks), seed
        self.rank, self.world_size = rank, world_size
        self.grad_accum, self.max_frames = grad_accum, max_frames
        self.speeds = tuple(speeds) if train else (1.0,)
        self.bucket_pool, self.epoch, self._plan = bucket_pool, 0, None
        self.target_len = [len(linearize(s.text, s.entities)) + 1 for s in samples]
        self.wav_samples = [audio.wav_info(s.audio).samples_16k if s.audio else 0 for s in samples]
        self.builder = BatchBuilder(samples, featurizer, ctc_classes, entity_swap, entity_gap, noise)
        # the sampler: the micro-batches of the epoch being iterated, refilled in place by batches(), so that one
        # DataLoader serves every epoch and persistent workers keep their feature caches
        self._entries = []
        self._loader = torch.utils.data.DataLoader(self.builder, sampler=self._entries, batch_size=None,
                                                   num_workers=num_workers, persistent_workers=num_workers > 0,
                                                   pin_memory=pin_memory)

    def margin_at(self, epoch: int) -> float:
        """The noise margin rows of `epoch` get (augment.NoiseMix; 0 without noise): whether a checkpoint saved in it
        has heard noise before speech (train.py writes demo.onset_lead of it into its assets)."""
        return self.builder.noise.margin_at(epoch) if self.builder.noise is not None else 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, start: int = 0):
        """Iterator over this epoch's steps from step `start` on (a resumed run skips the finished ones): for each,
        the list of this rank's collated micro-batches. Starting it draws the DataLoader's base seed from torch's
        global RNG, as any DataLoader does."""
        steps = self.rank_steps()[start:]
        self._entries[:] = [(self.epoch, rows) for micro in steps for rows in micro]
        built = iter(self._loader)  # now, not at the first step: a resumed run restores its RNG state after this
        return ([next(built) for _ in micro] for micro in steps)

    def __iter__(self):
        return self.batches()

    def __len__(self):
        return len(self.batch_plan())

    def batch_plan(self) -> list[list[tuple[int, str, float]]]:
        """The steps of this epoch. Training: every rank's global batches, batch_size rows each, the same for any
        world size, --grad-accum and frame budget (so a run resumes on other hardware with the same data). Not
        training: this rank's batches."""
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._make_plan(random.Random(f"{self.seed}:{self.epoch}")))
        return self._plan[1]

    def rank_steps(self) -> list[list[list[tuple[int, str, float]]]]:
        """This rank's share of every step, split into micro-batches: [step][micro-batch][row]. A step's rows (sorted
        by length) go to the ranks in world_size contiguous parts, each rank's into grad_accum: so 2 ranks x 1 and
        1 rank x 2 micro-batches sum the very same micro-batches (with a row count that divides evenly)."""
        if not self.train:
            return [self.split(rows, 1) for rows in self.batch_plan()]
        return [self.split(near_equal_parts(rows, self.world_size)[self.rank], self.grad_accum)
                for rows in self.batch_plan()]

    def split(self, rows, parts) -> list[list[tuple[int, str, float]]]:
        """Rows of one rank and step, in order -> micro-batches: `parts` near-equal contiguous parts, each cut further
        where its padded fbank frames (rows x the longest row's frames) would exceed max_frames (0 = no budget). A
        row over the budget is a micro-batch alone."""
        out = []
        for part in near_equal_parts(rows, parts):
            micro, longest = [], 0.0
            for item in part:
                frames = max(longest, self.frames(item))
                if micro and self.max_frames and (len(micro) + 1) * frames > self.max_frames:
                    out.append(micro)
                    micro, frames = [], self.frames(item)
                micro.append(item)
                longest = frames
            out += [micro] if micro else []
        return out

    def frames(self, item, margins: bool = True) -> int:
        """fbank frames of a row (speech at its speed, or the pseudo speech); margins: with the longest noise lead
        and tail it may get (the frame budget's upper bound), else without (the length buckets of _make_plan, which
        stay as they were without noise)."""
        i, task, speed = item
        if task not in ("SNER", "MNER"):
            return PSEUDO_FRAMES
        noise = self.builder.noise
        extra = 2 * round(noise.margin * audio.SAMPLE_RATE) if margins and noise is not None and self.wav_samples[i] \
            else 0
        return audio.num_fbank_frames(audio.perturbed_length(self.wav_samples[i] + extra, speed))

    def longest_frames(self) -> int:
        """fbank frames of the longest row this loader can deal (real speech at the slowest speed, or pseudo)."""
        slowest = min(self.speeds)
        return max([PSEUDO_FRAMES] + [self.frames((i, "SNER", slowest)) for i, n in enumerate(self.wav_samples) if n])

    def _length(self, item) -> float:
        i, task, _ = item
        return self.frames(item, margins=False) + (self.target_len[i] if task != NEITHER else
                                                   self.featurizer.neither_len + 1)

    def _draw(self, rng) -> list[tuple[int, str, float]]:
        """Tasks of this epoch. uniform: among samples with audio a seeded permutation deals the tasks in turn
        (exact thirds for 1:1:1); samples without audio are TNER. coin: two fair coins per sample (audio?
        text?), no audio -> the audio coin reads False. Eval: every sample for every task it can do."""
        n, has = len(self.samples), [s.audio is not None for s in self.samples]
        speed = lambda task: rng.choice(self.speeds) if task in ("SNER", "MNER") else 1.0
        if not self.train:
            return [(i, t, 1.0) for t in self.tasks for i in range(n) if has[i] or t == "TNER"]
        if self.task_mix == "coin":
            out = []
            for i in range(n):
                a, t = rng.random() < 0.5, rng.random() < 0.5
                task = {(1, 1): "MNER", (1, 0): "SNER", (0, 1): "TNER", (0, 0): NEITHER}[(a and has[i], t)]
                out.append((i, task, speed(task)))
            return out
        dealt = [i for i in range(n) if has[i]]
        rng.shuffle(dealt)
        offset = rng.randrange(len(self.tasks))
        task_of = {i: self.tasks[(j + offset) % len(self.tasks)] for j, i in enumerate(dealt)}
        if "TNER" in self.tasks:
            task_of.update({i: "TNER" for i in range(n) if not has[i]})
        return [(i, task_of[i], speed(task_of[i])) for i in sorted(task_of)]

    def _make_plan(self, rng):
        items, bs = self._draw(rng), self.batch_size
        if not self.train:  # deterministic: sorted by length, this rank's share of the batches
            items.sort(key=self._length)
            return [items[b: b + bs] for b in range(0, len(items), bs)][self.rank:: self.world_size]
        rng.shuffle(items)
        if items and len(items) % bs:  # every step takes batch_size rows: the last one wraps to the epoch's start
            items += (items * -(-bs // len(items)))[: bs - len(items) % bs]   # (around again if it is that short)
        batches, pool = [], bs * self.bucket_pool
        for p in range(0, len(items), pool):  # sort within pools of bucket_pool batches: similar lengths together
            chunk = sorted(items[p: p + pool], key=self._length)
            batches += [chunk[b: b + bs] for b in range(0, len(chunk), bs)]
        rng.shuffle(batches)
        return batches


def near_equal_parts(rows: list, n: int) -> list[list]:
    """rows in n contiguous parts whose sizes differ by at most one, the longer ones first (some empty if n > rows)."""
    base, extra = divmod(len(rows), n)
    ends = list(itertools.accumulate(base + (k < extra) for k in range(n)))      # each part's end
    return [rows[end - base - (k < extra): end] for k, end in enumerate(ends)]
