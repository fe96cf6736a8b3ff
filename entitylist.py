"""entitylist.py: entity lists at decode time: the names a user expects, each with a type or none, as a bonus in the
beam search (decode.py --entities LIST, --entity-weight; a jsonl input's "entities"; Request.entities).

    张三 PER
    上海浦东发展银行 ORG
    北京                    <- no type: any type

One string a line, then optionally its type (PER, LOC or ORG) after white space; blank lines and lines starting
with # are skipped. Two ways to use a list, after what the task gives:

SNER (the text is heard, not given): SpellingBoost. A hypothesis spelling out a listed string inside an entity
bracket of its type gains `weight` for every matched character (a prefix trie over the list per type: shallow
fusion, as contextual biasing in speech recognition); when the bracket closes on a string that is not complete,
when a character leaves every listed string, or when the hypothesis ends with the bracket open, what that bracket
gained is taken back. Nothing is paid for a malformed output: a bracket opened where one of its type is already
open at the same place (its twin) earns nothing, and an opening deeper than MAX_DEPTH, a close that does not match
the innermost open bracket or a close of an empty one takes back what every open bracket gained (else writing
brackets would put a take-back off for ever).
beam_search adds the bonus to the log-probabilities before the joint-CTC scorer's candidate pre-selection, so a
listed name is not dropped before CTC scores it; the scorer also takes the model's own best characters, so that
listed first characters do not crowd out the one the audio says. A list for SNER must be writable: a character
the decoder's vocabulary lacks is refused with its line number.

TNER/MNER (the text is given): occurrences(). Where a listed string occurs in the input, the constrained search
(search.BracketConstraint) gives an opening bracket of its type weight x its length at once, taken back when that
bracket closes anywhere but at the end of an occurrence of that type; characters outside the vocabulary match as
they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import files
from text import BRACKET_CHARS, MAX_DEPTH, TYPES


@dataclass(frozen=True)
class Entry:
    text: str
    type: str | None            # None: any type
    where: str                  # "file:line" or "input 3, entities[2]", for messages


def parse_entry(line: str, where: str) -> Entry | None:
    """One list line -> Entry, or None for a blank or # line. Raises files.InputError saying where and why."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    if len(fields) > 2 or (len(fields) == 2 and fields[1] not in TYPES):
        raise files.InputError(f"{where}: expected 'STRING' or 'STRING TYPE' with TYPE one of {', '.join(TYPES)}, "
                               f"got {line.strip()!r}")
    if any(c in BRACKET_CHARS for c in fields[0]):
        raise files.InputError(f"{where}: {fields[0]!r} holds a bracket character ({BRACKET_CHARS}), which the "
                               "output uses to mark entities")
    return Entry(fields[0], fields[1] if len(fields) == 2 else None, where)


def read_entity_list(path) -> list[Entry]:
    """The entries of a list file (UTF-8), in file order. Raises files.InputError for a missing file or a bad line."""
    entries = []
    for lineno, line in enumerate(files.read_lines(path), 1):
        entry = parse_entry(line, f"{path}:{lineno}")
        if entry is not None:
            entries.append(entry)
    return entries


def entries_of(items, where: str) -> list[Entry]:
    """A jsonl input's "entities": a list of strings, each 'STRING' or 'STRING TYPE'."""
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise files.InputError(f"{where}: \"entities\" must be a list of strings ('STRING' or 'STRING TYPE')")
    return [e for k, x in enumerate(items) if (e := parse_entry(x, f"{where}: entities[{k}]")) is not None]


# ----------------------------------------------------------------------------------------------------------------
# TNER / MNER: occurrences in the given text


def occurrences(text: str, entries) -> dict[int, dict[str, tuple[int, ...]]]:
    """Where listed strings occur in `text`: {start: {type: (ends, ascending)}}; an untyped entry counts for every
    type. Overlapping and nested occurrences are all found."""
    by_first = {}
    for e in entries:
        by_first.setdefault(e.text[:1], []).append(e)
    found = {}
    for start in range(len(text)):
        for e in by_first.get(text[start], ()):
            if text.startswith(e.text, start):
                for t in ([e.type] if e.type else TYPES):
                    found.setdefault(start, {}).setdefault(t, set()).add(start + len(e.text))
    return {start: {t: tuple(sorted(ends)) for t, ends in by_type.items()} for start, by_type in found.items()}


# ----------------------------------------------------------------------------------------------------------------
# SNER: a prefix trie per type, walked by the hypotheses


class Trie:
    """Listed strings of one type as decoder ids: node 0 is the root; children[node] = {token: child}; complete
    marks the nodes where a listed string ends."""

    def __init__(self):
        self.children = [{}]
        self.complete = [False]

    def add(self, ids):
        node = 0
        for tok in ids:
            nxt = self.children[node].get(tok)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][tok] = nxt
                self.children.append({})
                self.complete.append(False)
            node = nxt
        self.complete[node] = True


def tries_for(entries, vocab, unk) -> dict[str, Trie]:
    """One Trie per type over the decoder ids of the entries (an untyped entry goes into all three). Raises
    files.InputError naming the first entry with a character the vocabulary cannot write (id `unk`)."""
    tries = {t: Trie() for t in TYPES}
    for e in entries:
        ids = vocab.encode(e.text)
        if unk in ids:
            bad = e.text[ids.index(unk)]
            raise files.InputError(f"{e.where}: {e.text!r} has {bad!r}, which the decoder cannot write (not in its "
                                   "vocabulary): SNER can never spell it; drop the line or the character")
        for t in ([e.type] if e.type else TYPES):
            tries[t].add(ids)
    return tries


DEAD, EMPTY_DEAD = -1, -2   # trie node of an open bracket that earns nothing (-2: nothing inside it yet)


class SpellingBoost:
    """The SNER bonus (module docstring) for beam_search's `boost`: start(); bias(lprobs) -> lprobs with each row's
    bonus added; select(rows, tokens) after each step. tries[i]: the tries of input i (None or {}: no list), so
    each input of a batch has its own list.

    A row's state: the stack of open brackets, each (type index, trie node, or DEAD once it left every listed
    string, EMPTY_DEAD if it earns nothing and holds nothing yet; bonus gained so far); the row's input index. A
    closing bracket closes the innermost open one whatever its type (a mismatched close, or one of an empty
    bracket, spoils every open bracket), where data.parse would pair it with the innermost of its own type: the
    bonus never rewards a malformed output."""

    def __init__(self, tries, open_ids, close_ids, weight, eos):
        if not 0 <= weight < math.inf:
            raise ValueError(f"entity list weight must be a finite number >= 0, got {weight}")
        self.tries = [[(t or {}).get(typ) for typ in TYPES] if t else None for t in tries]
        self.open_of = {open_ids[t]: k for k, t in enumerate(TYPES)}
        self.close_of = {close_ids[t]: k for k, t in enumerate(TYPES)}
        self.open_ids, self.close_ids = [open_ids[t] for t in TYPES], [close_ids[t] for t in TYPES]
        self.weight, self.eos = float(weight), eos
        self.rows = []

    def start(self):
        self.rows = [(i, ()) for i in range(len(self.tries))]

    @staticmethod
    def _spoiled(stack):
        """Every open bracket of `stack` dead (an empty one stays empty: EMPTY_DEAD), with nothing gained."""
        return tuple((t, EMPTY_DEAD if node in (0, EMPTY_DEAD) else DEAD, 0.0) for t, node, _ in stack)

    def _walk(self, sent, stack, tok):
        """The state after token `tok` and the bonus it earns (negative: taken back)."""
        if tok in self.open_of:
            typ = self.open_of[tok]
            if len(stack) >= MAX_DEPTH:                  # nested deeper than any search writes: nothing earns
                return self._spoiled(stack) + ((typ, EMPTY_DEAD, 0.0),), -sum(g for _, _, g in stack)
            listed = self.tries[sent] and self.tries[sent][typ] is not None
            twin = any(t == typ and node == 0 for t, node, _ in stack)   # same type opened at this place
            return stack + ((typ, 0 if listed and not twin else EMPTY_DEAD, 0.0),), 0.0
        if tok in self.close_of or tok == self.eos:
            if not stack:
                return stack, 0.0
            if tok == self.eos:
                return (), -sum(g for _, _, g in stack)
            typ, node, gained = stack[-1]
            if tok != self.close_ids[typ] or node in (0, EMPTY_DEAD):   # a mismatched or an empty close: the
                return self._spoiled(stack[:-1]), -sum(g for _, _, g in stack)   # output is malformed, none earns
            trie = self.tries[sent][typ] if self.tries[sent] else None
            done = node >= 0 and trie is not None and trie.complete[node]
            return stack[:-1], 0.0 if done else -gained
        new, bonus = [], 0.0
        for typ, node, gained in stack:
            trie = self.tries[sent][typ] if self.tries[sent] else None
            nxt = trie.children[node].get(tok, -1) if node >= 0 and trie is not None else -1
            if nxt >= 0:
                new.append((typ, nxt, gained + self.weight))
                bonus += self.weight
            else:
                new.append((typ, DEAD, 0.0))
                bonus -= gained
        return tuple(new), bonus

    def bias(self, lprobs):
        """(N, V) log-probs -> the same tensor with each row's bonus for every next token added (in place)."""
        rows, cols, values, flat_rows, flat_values = [], [], [], [], []
        for r, (sent, stack) in enumerate(self.rows):
            if not stack or not self.tries[sent]:
                continue
            alive = [(typ, node, g) for typ, node, g in stack if node >= 0]
            if not alive:
                continue
            total = sum(g for _, _, g in alive)
            if total:                                        # any other character breaks every alive bracket
                flat_rows.append(r)
                flat_values.append(-total)
            special = {}                                     # brackets: what _walk says (EOS: -total)
            for tok in self.open_ids + self.close_ids:
                special[tok] = total + self._walk(sent, stack, tok)[1]
            for typ, node, g in alive:                       # characters that go on spelling a listed string
                for tok in self.tries[sent][typ].children[node]:
                    special[tok] = special.get(tok, 0.0) + g + self.weight
            for tok, v in special.items():
                if v:
                    rows.append(r), cols.append(tok), values.append(v)
        if flat_rows:
            index = torch.tensor(flat_rows, dtype=torch.long, device=lprobs.device)
            lprobs[index] += torch.tensor(flat_values, dtype=lprobs.dtype, device=lprobs.device)[:, None]
        if rows:
            r_, c_ = torch.tensor([rows, cols], dtype=torch.long, device=lprobs.device)
            lprobs.index_put_((r_, c_), torch.tensor(values, dtype=lprobs.dtype, device=lprobs.device),
                              accumulate=True)
        return lprobs

    def select(self, rows, tokens):
        self.rows = [(self.rows[r][0], self._walk(self.rows[r][0], self.rows[r][1], tok)[0])
                     for r, tok in zip(rows, tokens)]
