"""Tests for text.py: the phone dictionary and lexicon readers, the decoder vocabulary, pinyin units, the
Phonemizer (lexicon words cut per character, readings, characters pypinyin cannot read), phone agreement, CLI."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import files  # noqa: E402
import text  # noqa: E402
from data import Sample  # noqa: E402

SHARED = ROOT / ".." / "shared"
REF_LEXICON = SHARED / "reference" / "assets" / "text2phone_dict.txt"
FIXTURE = ROOT / "tests" / "fixtures"


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# readers, vocabulary, phones

def test_readers_on_fixture_checkpoint_files(tmp_path):
    phones = text.read_phone_dict(FIXTURE / "ms_tiny_a" / "phone_dict.txt")
    assert len(phones) == 141 and phones[4] == "a1" and phones[124] == "<mask>" and phones[125] == "#2"
    assert phones == text.read_phone_dict()  # the committed copy equals the checkpoint's
    lexicon = text.read_lexicon(FIXTURE / "ms_tiny_a" / "text2phone_dict.txt")
    assert lexicon["一"] == "y ao1"  # first entry wins, as in MMSpeech
    with pytest.raises(files.InputError, match="lex.txt:2"):
        text.read_lexicon(write(tmp_path / "lex.txt", "中\tzh o1 ng\n坏行\n"))

def test_text_vocab():
    v = text.TextVocab(["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[", "]", "a", "中", "##b", "<mask>"])
    assert v.encode("[A中ｂ") == [5, 7, 8, 3] and v.encode("[Ａ") == [5, 7]  # lower case, NFKC, else UNK
    assert v.decode([0, 5, 7, 3, 9, 4, 10, 8, 2, 1]) == "[ab中" and v.decode([7, 3], unk="?") == "a?"
    built = text.TextVocab.build([Sample("1", "北京b", []), Sample("2", "京a", [])])
    assert built.tokens == list(text.SPECIALS) + list("[]()<>") + ["a", "b", "京", "北"]


@pytest.mark.parametrize("ini, fin, units", [
    ("", "v3", ["y", "u3"]), ("", "van2", ["y", "ua2", "n"]), ("", "ve4", ["y", "ue4"]), ("", "vn2", ["y", "u2", "n"]),
    ("", "i1", ["y", "i1"]), ("", "ing1", ["y", "i1", "ng"]), ("", "ian3", ["y", "a3", "n"]), ("", "iou3", ["y", "ou3"]),
    ("", "iong4", ["y", "o4", "ng"]), ("", "u3", ["w", "u3"]), ("", "uen4", ["w", "e4", "n"]), ("", "uang2", ["w", "a2", "ng"]),
    ("q", "v4", ["q", "v4"]), ("x", "ve2", ["x", "ue2"]), ("q", "van2", ["q", "ua2", "n"]), ("l", "ve4", ["l", "ue4"]),
    ("n", "v3", ["n", "v3"]), ("x", "iong2", ["x", "i2", "o2", "ng"]), ("d", "uei4", ["d", "ui4"]),
    ("zh", "uen3", ["zh", "u3", "n"]), ("d", "ong1", ["d", "o1", "ng"]), ("", "er4", ["er4"]), ("d", "e5", ["d", "e5"]),
])
def test_pinyin_units_follow_the_lexicon_spelling(ini, fin, units):
    assert text.pinyin_units(ini, fin) == units


def test_phonemizer_lexicon_words_are_cut_per_character():
    lexicon = {"别扭": "b ie4 n iu5", "别": "b ie2", "扭": "n iu3", "西安": "x i1 a1 n", "熊猫": "x i2 o2 ng m ao1",
               "一": "y ao1"}
    p = text.Phonemizer(text.read_phone_dict(), lexicon)
    assert p.units("别扭") == [["b", "ie4"], ["n", "iu5"]]  # not 'b ie4 n' + 'iu5': no bare i/u/v syllable
    assert p.units("西安熊猫") == [["x", "i1"], ["a1", "n"], ["x", "i2", "o2", "ng"], ["m", "ao1"]]
    assert p.units("一个7A!") == [["y", "ao1"], ["g", "e4"], ["q", "i1"], ["<unk>"], ["<unk>"]]  # pypinyin, digits
    units, which = p("别扭的")
    assert units == ["b", "ie4", "n", "iu5", "d", "e5"] and which == [0, 0, 1, 1, 2, 2]
    assert p.pronounce("别!") == "b ie2"


def test_phonemizer_readings_of_one_character():
    p = text.Phonemizer(text.read_phone_dict())
    assert p.readings("长") == [["zh", "a3", "ng"], ["ch", "a2", "ng"]]      # its usual reading first
    assert p.readings("了")[0] == ["l", "e5"] and ["l", "iao3"] in p.readings("了")
    assert len(p.readings("行")) == 4                                       # capped at `limit`
    assert p.readings("A") == [] and p.readings("!") == []
    lexicon = {"长": "ch a2 ng"}                                           # a lexicon's reading comes first
    assert text.Phonemizer(text.read_phone_dict(), lexicon).readings("长")[0] == ["ch", "a2", "ng"]


def test_every_fixture_lexicon_word_is_cut_into_its_characters():
    lexicon = text.read_lexicon(FIXTURE / "ms_tiny_a" / "text2phone_dict.txt")
    p = text.Phonemizer(text.read_phone_dict(), lexicon)
    words = [w for w in lexicon if len(w) > 1]
    assert words and all(p._split_word(w) is not None and len(p._split_word(w)) == len(w) for w in words)


def test_phone_agreement_floor_on_fixture_lexicon():
    result = text.phone_agreement(FIXTURE / "ms_tiny_a" / "text2phone_dict.txt")
    assert result["words"] > 500 and result["rate_first_entry"] >= 0.90, result


@pytest.mark.skipif(not REF_LEXICON.is_file(), reason="../shared/reference/assets/text2phone_dict.txt absent")
def test_phone_agreement_floor_on_full_lexicon():
    result = text.phone_agreement(REF_LEXICON, stride=25)  # the full lexicon: `python text.py phones`, 94.3 %
    assert result["words"] > 2000 and result["rate_first_entry"] >= 0.90, result
NO_READING = "𠮷兙瓧嗧"  # Han characters pypinyin has no reading for (Extension B, then three of the basic block)


def check_phones_per_character(p, text, inventory):
    units, which = p(text)
    per_char = p.units(text)
    assert len(per_char) == len(text) and all(per_char), "every character gets one or more phones"
    assert all(u in inventory for us in per_char for u in us)
    assert units == [u for us in per_char for u in us]
    assert which == [i for i, us in enumerate(per_char) for _ in us]  # the character map follows the units


def test_han_characters_without_a_pinyin_reading_get_the_unknown_phone():
    phones = text.read_phone_dict()
    p = text.Phonemizer(phones)
    assert p.units("𠮷野家在北京") == [["<unk>"], ["y", "e3"], ["j", "ia1"], ["z", "ai4"], ["b", "ei3"], ["j", "i1", "ng"]]
    for ch in NO_READING:
        assert p.units(ch) == [["<unk>"]] and p.readings(ch) == [] and p.pronounce(f"北{ch}京") == "b ei3 j i1 ng"
    check_phones_per_character(p, "北" + NO_READING + "京野家", set(phones))
    lexicon = {"北京": "b ei3 j i1 ng"}  # with a lexicon the other characters still go to pypinyin
    assert text.Phonemizer(phones, lexicon).units("北京𠮷野") == [["b", "ei3"], ["j", "i1", "ng"], ["<unk>"], ["y", "e3"]]


def test_every_han_character_gets_valid_phones():
    """All of CJK basic and Extension A, every 8th character of Extension B, each block as one run."""
    phones = text.read_phone_dict()
    p = text.Phonemizer(phones)
    for first, last, step in ((0x4E00, 0x9FFF, 1), (0x3400, 0x4DBF, 1), (0x20000, 0x2A6DF, 8)):
        check_phones_per_character(p, "".join(chr(c) for c in range(first, last + 1, step)), set(phones))


def test_dictionaries_must_be_utf8(tmp_path):
    phone_dict = tmp_path / "phone_dict.txt"
    phone_dict.write_bytes(b"a1 1\nb\xe9 1\n")
    with pytest.raises(files.InputError, match=re.escape(f"{phone_dict}:2: not UTF-8 (byte 0xe9 at column 2)")):
        text.read_phone_dict(phone_dict)
    lexicon = tmp_path / "lex.txt"
    lexicon.write_bytes("\ufeff中\tzh o1 ng\n".encode() + "国\tg uo2\n".encode("utf-16"))
    with pytest.raises(files.InputError, match=re.escape(f"{lexicon}:2: not UTF-8 (byte 0xff at column 1)")):
        text.read_lexicon(lexicon)
    lexicon.write_bytes("\ufeff中\tzh o1 ng\n".encode())
    assert text.read_lexicon(lexicon) == {"中": "zh o1 ng"}  # the BOM is not part of the first word


def test_lexicon_first_entry_wins(tmp_path):
    path = tmp_path / "t2p.txt"
    path.write_text("一\ty i1\n一\ty i2\n一下\ty i2 x ia4\n", encoding="utf-8")
    phones = list(text.SPECIALS) + ["y", "i1", "i2", "x", "ia4"]
    assert text.read_lexicon(str(path), phones) == {"一": "y i1", "一下": "y i2 x ia4"}


def test_phones_cli(capsys):
    lexicon = FIXTURE / "ms_tiny_a" / "text2phone_dict.txt"
    text.main(["phones", "--lexicon", str(lexicon), "--stride", "10"])
    assert json.loads(capsys.readouterr().out) == text.phone_agreement(lexicon, stride=10)
    with pytest.raises(SystemExit) as e:
        text.main(["phones", "--lexicon", str(FIXTURE / "nope.txt")])
    assert e.value.code == 2 and capsys.readouterr().err == f"text.py: {FIXTURE / 'nope.txt'}: no such file\n"


# ------------------------------------------------------------------------------------------------------------
# alignment of a free output to the input


def test_alignment_of_free_output_to_the_input():
    assert text.map_spans([(0, 2, "LOC"), (2, 3, "PER"), (3, 5, "ORG")], "北京x大学", "北京大学") == [
        (0, 2, "LOC"), (None, None, "PER"), (2, 4, "ORG")]
    assert text.map_spans([(0, 2, "PER")], "章三来了", "张三来了") == [(0, 2, "PER")]   # substitution keeps place
