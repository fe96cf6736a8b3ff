"""text.py: the text front end: special ids, entity brackets, the decoder vocabulary, characters -> phones.

    python text.py phones --lexicon ../shared/reference/assets/text2phone_dict.txt   # pypinyin vs lexicon

Decoder vocabulary (TextVocab): one token per character, so offsets in the text stay exact; ids 0-3 are the
specials. Phones (MMSpeech): pinyin initials, tonal finals, codas n/ng as separate units; phone_dict.txt's first
line is phone id 4. Phonemizer turns a sentence into those units, one list per character, from a
checkpoint's lexicon and pypinyin. A bad dictionary or lexicon raises files.InputError naming file:line.
map_spans: entity offsets in a free output (an SNER transcription) mapped onto the input text (edit alignment).
"""
from __future__ import annotations

import argparse
import collections
import difflib
import functools
import itertools
import json
import re
import unicodedata
from pathlib import Path

import files
from image import BOS, EOS, PAD, UNK  # the special ids: defined once, by the model that embeds them

ASSETS = Path(__file__).resolve().parent / "assets"

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # the tokens of ids BOS, PAD, EOS, UNK (0..3)
TYPES = ("PER", "LOC", "ORG")
BRACKETS = {"PER": "[]", "LOC": "()", "ORG": "<>"}  # entity type -> its open and close bracket
OPEN_OF = {t: b[0] for t, b in BRACKETS.items()}
CLOSE_OF = {t: b[1] for t, b in BRACKETS.items()}
TYPE_OF_OPEN = {b[0]: t for t, b in BRACKETS.items()}
TYPE_OF_CLOSE = {b[1]: t for t, b in BRACKETS.items()}
BRACKET_CHARS = "".join(BRACKETS.values())  # "[]()<>"
TO_FULLWIDTH = str.maketrans(BRACKET_CHARS, "［］（）＜＞")  # literal brackets in a sentence
MAX_DEPTH = 4  # deepest entity nesting a search writes (CNERTA needs 3): the constraint allows no deeper, a list
#              bonus never pays for deeper


def read_phone_dict(path=ASSETS / "phone_dict.txt", expected_size: int | None = None) -> list[str]:
    """phone_dict.txt ('unit count' lines, a fairseq Dictionary) -> [<s>, <pad>, </s>, <unk>, unit0, ...]
    (index = phone id; line n -> id n + 3). expected_size: the checkpoint's phone_vocab_size, checked."""
    phones = list(SPECIALS)
    for lineno, line in enumerate(files.read_lines(path), 1):
        if not line.split():
            raise files.InputError(f"{path}:{lineno}: empty line in a phone dictionary")
        if line.split()[0] in phones:
            raise files.InputError(f"{path}:{lineno}: phone {line.split()[0]!r} appears twice")
        phones.append(line.split()[0])
    if expected_size is not None and len(phones) != expected_size:
        raise files.InputError(f"{path}: {len(phones) - 4} phones + 4 specials = {len(phones)}, but config.json "
                               f"phone_vocab_size is {expected_size}")
    return phones


def read_lexicon(path, phones: list[str] | None = None) -> dict[str, str]:
    """text2phone_dict.txt ('word<TAB>phones' lines) -> {word: phones}; the first entry of a word wins. With
    phones (read_phone_dict), every phone must be one of them."""
    known = set(phones) if phones is not None else None
    lexicon = {}
    for lineno, line in enumerate(files.read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].split():
            raise files.InputError(f"{path}:{lineno}: expected 'word<TAB>phones', got {line[:60]!r}")
        unknown = [p for p in parts[1].split() if known is not None and p not in known]
        if unknown:
            raise files.InputError(f"{path}:{lineno}: phone(s) {unknown} of {parts[0]!r} are not in phone_dict.txt")
        lexicon.setdefault(parts[0].strip(), " ".join(parts[1].split()))
    return lexicon


class TextVocab:
    """Decoder vocabulary. encode: one id per character (lookup: the character, its lower case, its NFKC form;
    else UNK), so bracket-free offsets equal token offsets. decode: joins tokens, drops BOS/PAD/EOS and
    multi-character specials ([PAD], <mask>, <audio_7>...); UNK becomes `unk`."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        if len(self.tokens) < 4:
            raise ValueError("a vocabulary needs at least the 4 specials <s> <pad> </s> <unk>")
        self.index = {}
        for i, t in enumerate(self.tokens[4:], 4):
            self.index.setdefault(t, i)
        self._ids = {}

    @classmethod
    def build(cls, samples) -> TextVocab:
        """For models from scratch: specials, the 6 brackets, then every character of the texts (sorted)."""
        chars = set().union(*(s.text for s in samples)) - set(BRACKET_CHARS)
        return cls(list(SPECIALS) + list(BRACKET_CHARS) + sorted(chars))

    def __len__(self):
        return len(self.tokens)

    def char_id(self, ch: str) -> int:
        if ch not in self._ids:
            nfkc = unicodedata.normalize("NFKC", ch).lower()
            self._ids[ch] = next((self.index[c] for c in (ch, ch.lower(), nfkc) if c in self.index), UNK)
        return self._ids[ch]

    def encode(self, text: str) -> list[int]:
        return [self.char_id(c) for c in text]

    def decode(self, ids, unk: str = "") -> str:
        out = []
        for i in map(int, ids):
            t = self.tokens[i] if 0 <= i < len(self.tokens) else None
            if i in (BOS, PAD, EOS):
                continue
            if i == UNK or t is None:
                out.append(unk)
            elif t.startswith("##") and len(t) > 2:
                out.append(t[2:])
            elif not (len(t) > 1 and t[0] in "[<" and t[-1] in "]>"):
                out.append(t)
        return "".join(out)


INITIALS = frozenset("b c ch d f g h j k l m n p q r s sh t w x y z zh".split())
CHINESE_DIGITS = "零一二三四五六七八九"
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")


def pinyin_units(initial: str, final: str, bare: str = "") -> list[str]:
    """pypinyin strict INITIALS + FINALS_TONE3 (neutral tone 5) -> MMSpeech's unit spelling, learnt from its
    lexicon: zero initials written y/w (yu -> y u3, yuan -> y ua2 n, wen -> w e4 n), iou/uei/uen -> iu/ui/u n,
    ü after j/q/x/n/l stays v alone (q v4) but is u before other letters (x ue2, q ua2 n), codas n/ng split off,
    iong -> i o ng with the tone on both vowels. Syllabic nasals (嗯 n, 呣 m, 噷 hm) have no final: `bare` is
    pypinyin's toneless spelling, kept as units."""
    tone, final = (final[-1], final[:-1]) if final[-1:].isdigit() else ("5", final)
    if not final:
        return ["h", bare[1:]] if bare[:1] == "h" else [bare or "<unk>"]
    if not initial:
        if final[0] == "i":
            initial, final = "y", final if final in ("i", "in", "ing") else final[1:]
        elif final[0] == "u":
            initial, final = "w", final if final == "u" else final[1:]
        elif final[0] == "v":
            initial, final = "y", "u" + final[1:]
    else:
        final = {"iou": "iu", "uei": "ui", "uen": "un"}.get(final, final)
        if final[0] == "v" and final != "v":
            final = "u" + final[1:]
    out = [initial] if initial else []
    coda = next((c for c in ("ng", "n") if final != "er" and len(final) > len(c) and final.endswith(c)), None)
    nucleus = final[: -len(coda)] if coda else final
    out += [nucleus[0] + tone, nucleus[1:] + tone] if nucleus == "io" else [nucleus + tone]
    return out + ([coda] if coda else [])


def _has_reading(ch: str) -> bool:
    """pypinyin knows a reading of this Han character: its character table (what pinyin() looks a character up in;
    load_single_dict adds to it) has one. A lookup, not a pinyin() call: a third of the time of phonemizing."""
    from pypinyin.constants import PINYIN_DICT
    return ord(ch) in PINYIN_DICT


class Phonemizer:
    """Characters -> phone units, one list per character, so each phone knows the character it was said from.

    With a lexicon (a checkpoint's text2phone_dict.txt): forward maximum matching over its words; a word's units
    are cut into one syllable per character (the grammar [initial] vowel(s) [n|ng], ambiguities settled by each
    character's own reading). Characters not in the lexicon, and everything without one: pypinyin (phrase
    aware), mapped onto the same units by pinyin_units. A character neither knows (latin letters without a
    lexicon, symbols) gets one '<unk>' phone: every character stays visible to the encoder. Digits are read as
    Chinese digits, latin letters upper-cased (the lexicon spells 'A', 'B', ...)."""

    def __init__(self, phones, lexicon: dict[str, str] | None = None):
        self.inventory = set(phones)
        self.vowels = {u for u in phones if u[-1:].isdigit() and not u.startswith("#")}
        self.lexicon = dict(lexicon or {})
        self.max_word = max(map(len, self.lexicon), default=1)
        self._words = {}

    def units(self, text: str) -> list[list[str]]:
        norm = [self._normalize(c) for c in text]
        out: list = [None] * len(text)
        i = 0
        while self.lexicon and i < len(text):
            for n in range(min(self.max_word, len(text) - i), 1, -1):
                word = "".join(norm[i: i + n])
                parts = self._split_word(word) if word in self.lexicon else None
                if parts is not None:
                    out[i: i + n], i = parts, i + n
                    break
            else:
                out[i], i = (self.lexicon[norm[i]].split() if norm[i] in self.lexicon else None), i + 1
        todo = "".join(c if u is None else " " for c, u in zip(norm, out))
        for m in HAN.finditer(todo):
            out[m.start(): m.end()] = self._pinyin(m.group())
        return [u if u else ["<unk>"] for u in out]

    def __call__(self, text: str) -> tuple[list[str], list[int]]:
        """-> (phone units, index of the character each unit came from)."""
        units = self.units(text)
        return [u for us in units for u in us], [i for i, us in enumerate(units) for _ in us]

    def readings(self, ch: str, limit: int = 4) -> list[list[str]]:
        """Every way one character may be said, its usual reading first (at most `limit`): for joint CTC decoding,
        which meets characters one at a time, without their context. [] for a character without a reading."""
        from pypinyin import Style, pinyin
        from pypinyin.style import convert
        out = [u for u in self.units(ch)[:1] if u != ["<unk>"]]
        if HAN.fullmatch(ch) and _has_reading(ch):
            for syllable in pinyin(ch, style=Style.TONE, heteronym=True)[0]:
                final = convert(syllable, Style.FINALS_TONE3, True)
                units = self._fit(pinyin_units(convert(syllable, Style.INITIALS, True), final,
                                               "" if final else convert(syllable, Style.NORMAL, True)))
                if "<unk>" not in units and units not in out:
                    out.append(units)
        return out[:limit]

    def pronounce(self, text: str) -> str:
        """Space-separated units without '<unk>' (MMSpeech's Text2Phone drops unknown characters)."""
        return " ".join(u for us in self.units(text) for u in us if u != "<unk>")

    @staticmethod
    def _normalize(ch: str) -> str:
        n = unicodedata.normalize("NFKC", ch)
        n = n if len(n) == 1 else ch
        return CHINESE_DIGITS[int(n)] if "0" <= n <= "9" else n.upper() if "a" <= n.lower() <= "z" else n

    def _pinyin(self, run: str) -> list:
        """A run of Han characters -> units per character; None (one '<unk>' phone) for a character pypinyin has
        no reading for (𠮷, 兙: 68 of the basic block, ~800 of Extension A, most of Extension B). Those are taken
        out before pypinyin sees the run: inside a phrase pypinyin style-converts whatever its errors= hook
        returns, and a None there crashes it."""
        out = []
        for known, chars in itertools.groupby(run, key=_has_reading):
            chars = "".join(chars)
            out += self._pinyin_known(chars) if known else [None] * len(chars)
        return out

    def _pinyin_known(self, run: str) -> list:
        from pypinyin import Style, pinyin
        ini = pinyin(run, style=Style.INITIALS, strict=True)
        fin = pinyin(run, style=Style.FINALS_TONE3, strict=True, neutral_tone_with_five=True)
        if len(ini) != len(run) or len(fin) != len(run):
            return [self._pinyin_known(c)[0] for c in run] if len(run) > 1 else [None]
        bare = lambda c: pinyin(c, style=Style.NORMAL)[0][0]  # only for syllabic nasals
        return [self._fit(pinyin_units(i[0], f[0], "" if f[0].rstrip("12345") else bare(c)))
                for c, i, f in zip(run, ini, fin)]

    def _fit(self, units: list[str]) -> list[str]:
        """A tone the inventory lacks (er5, ue5...) -> the same vowel with another tone; else '<unk>'."""
        out = []
        for u in units:
            if u not in self.inventory and u[-1:].isdigit():
                u = next((u[:-1] + t for t in "52413" if u[:-1] + t in self.inventory), u)
            out.append(u if u in self.inventory else "<unk>")
        return out

    def _split_word(self, word: str):
        """A multi-character lexicon word -> its units cut per character (None: no cut fits), cached. Of several
        cuts the one agreeing most with each character's own lexicon reading wins (with tones, then without),
        then the one with fewer initial-less syllables ('e1 n uo2' 婀娜: e1 | n uo2, not e1 n | uo2)."""
        if word not in self._words:
            units, own = self.lexicon[word].split(), [self.lexicon.get(c, "") for c in word]
            bare = lambda s: re.sub(r"\d", "", s)
            score = lambda cut: (sum(" ".join(units[a:b]) == r for (a, b), r in zip(cut, own)),
                                 sum(bare(" ".join(units[a:b])) == bare(r) for (a, b), r in zip(cut, own)),
                                 -sum(units[a] not in INITIALS for a, _ in cut))
            cuts = self._segmentations(units, len(word))
            self._words[word] = [units[a:b] for a, b in max(cuts, key=score)] if cuts else None
        return self._words[word]

    def _segmentations(self, units, n_chars, limit=256):
        """All cuts of `units` into n_chars syllables (at most `limit`), each a list of (start, end)."""
        @functools.lru_cache(maxsize=None)
        def cuts(i, k):
            if k == 0:
                return [()] if i == len(units) else []
            found = []
            for j in self._syllable_ends(units, i):
                found += [((i, j),) + rest for rest in cuts(j, k - 1)][: limit - len(found)]
            return found
        return cuts(0, n_chars)

    def _syllable_ends(self, u, i):
        """Ends j such that u[i:j] is one syllable: [initial] (vowel | i o before ng) [n | ng], or a bare nasal.
        Without an initial the vowel cannot start with i/u/v: the lexicon writes those with y/w."""
        if i >= len(u):
            return []
        ends = [i + 1] if u[i] in ("n", "ng", "m") else []
        j = i + 1 if u[i] in INITIALS else i
        if j < len(u) and u[j] in self.vowels and (j > i or u[j][0] not in "iuv"):
            nuclei = [j + 1]
            if u[j][:-1] == "i" and u[j + 1: j + 2] and u[j + 1][:-1] == "o" and u[j + 2: j + 3] == ["ng"]:
                nuclei.insert(0, j + 2)
            for k in nuclei:
                ends += [k + 1] if k < len(u) and u[k] in ("n", "ng") else []
                ends.append(k)
        return ends


def phone_agreement(lexicon_path, stride: int = 1) -> dict:
    """How often pypinyin (mapped by pinyin_units) spells a lexicon word exactly as the lexicon's first entry
    (and as any of its entries), over every `stride`-th word of the lexicon."""
    entries = collections.defaultdict(list)
    for line in files.read_lines(lexicon_path):
        word, _, phones = line.partition("\t")
        entries[word.strip()].append(" ".join(phones.split()))
    phonemizer = Phonemizer(read_phone_dict())
    words = list(entries)[::stride]
    spelt = {w: phonemizer.pronounce(w) for w in words}
    first = sum(spelt[w] == entries[w][0] for w in words)
    anyone = sum(spelt[w] in entries[w] for w in words)
    return {"lexicon": str(lexicon_path), "words": len(words), "agree_first_entry": first,
            "rate_first_entry": round(first / max(1, len(words)), 4), "agree_any_entry": anyone,
            "rate_any_entry": round(anyone / max(1, len(words)), 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ph = sub.add_parser("phones", help="agreement of pypinyin with a phone lexicon (text2phone_dict.txt)")
    ph.add_argument("--lexicon", required=True, help="path of text2phone_dict.txt")
    ph.add_argument("--stride", type=int, default=1, help="use every N-th lexicon word")
    args = p.parse_args(argv)
    with files.cli_errors("text.py"):
        result = phone_agreement(args.lexicon, args.stride)
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------------------------
# Offsets of a free output (an SNER transcription, unconstrained TNER) mapped onto the input text


def align_offsets(output_text, input_text):
    """Map each character index of output_text to input_text (None where it has no counterpart)."""
    mapping = [None] * len(output_text)
    matcher = difflib.SequenceMatcher(None, output_text, input_text, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):   # same-length substitution: position kept
            for k in range(i2 - i1):
                mapping[i1 + k] = j1 + k
    return mapping


def map_spans(spans, output_text, input_text):
    """Spans [(start, end, type)] over output_text -> over input_text ((None, None, type) if not alignable)."""
    if output_text == input_text:
        return list(spans)
    m = align_offsets(output_text, input_text)
    out = []
    for s, e, t in spans:
        a, b = m[s], m[e - 1]
        out.append((a, b + 1, t) if a is not None and b is not None and a <= b else (None, None, t))
    return out
