"""
CTC forced alignment: where in the audio each character of a known text is spoken (issue #17, first step).

The encoder's phone CTC head (image.IMAGE.speech_phone_log_probs: one frame every 40 ms, class 0 = blank) fires in
spikes. Given a sentence as characters, each with one or more readings (a reading = its CTC phone classes; pypinyin
heteronyms give several), the best CTC path through them (Viterbi) says which frames each character's phones take
and which reading was spoken:

    graph = ReadingGraph.build(readings)                   # one sentence: [[reading, ...] per character]
    paths = viterbi(log_probs, frames, [graph, ...])       # (B, T, C) log-probs -> best path per row
    spans = graph.char_frames(paths[0])                     # [(first frame, last frame, reading index)] per char
    times = char_times(spans, frames[0])                    # [(start_s, end_s)] per character

Frame -> time: subsampled frame f comes from fbank frames 4f .. 4f + 6 (two 3x3 convolutions of stride 2 over 25 ms
windows 10 ms apart), i.e. audio from 40f ms to 40f + 85 ms; its centre is 40f + 42.5 ms. The head fires at a
phone's onset, so the blank run after a character's last spike is still that character: a character starts half a
frame (20 ms) before its first frame's centre and ends where the next one starts; the last one ends half a frame
after its last frame's centre. Then a constant offset, fitted on dev data (never test): on the demo corpus's dev
split (gold times from espeak-ng), the offset on a 5 ms grid that minimises the mean |error| of the starts and ends
of the MNER entities recognised right is -10 ms (decode.py --time-offset-ms, default -10). Measured there against
splitting each blank run at its middle (+15 ms then): start error median / p90 25.5 / 37.5 -> 11.7 / 27.7 ms, end
13.0 / 33.3 -> 11.0 / 33.5 ms, frame-F1 91.6 -> 92.2, audio of right entities covered at pad 0 0.954 -> 0.964.
Alignment confidence (char_log_posteriors): the geometric mean posterior of a stretch's phones on their frames;
redaction fails closed below audio.MIN_ALIGN_CONFIDENCE (audio.redaction_plan).

The Viterbi search runs batched in torch: states are the phones of every reading of every character, the blanks
between characters and the blanks inside a reading (CTC needs one between two equal phones); every state has at most
a handful of predecessors, padded into a (S, P) index table, so one step over all rows and states is a gather, a max
and an add. Python loops over frames only. Not ctc-segmentation (PyPI 1.7.5): it comes as source only (Cython and a
C compiler at install; it built here), aligns one utterance at a time in numpy and takes one label sequence, where
here every heteronym is a branch of the graph and the rows of a batch run together on the model's device.
"""
import dataclasses

import torch

FRAME_S = 0.040            # subsampled frame step (4 x the 10 ms fbank shift)
FRAME_SPAN_S = 0.085       # audio one subsampled frame sees: 7 fbank frames, 6 x 10 ms + a 25 ms window
BLANK = 0


@dataclasses.dataclass
class ReadingGraph:
    """The CTC alignment graph of one sentence. State s emits class labels[s]; preds[s] lists the states a path may
    come from (itself included; -1 pads); paths start in a start state and end in an end state. char[s]/reading[s]:
    the character and reading of a phone state (-1 for blanks)."""
    labels: list
    preds: list
    starts: list
    ends: list
    char: list
    reading: list

    @classmethod
    def build(cls, readings):
        """readings: one list per character of its readings, each a non-empty sequence of CTC classes (>= 1)."""
        g = cls([], [], [], [], [], [])

        def state(label, char=-1, reading=-1):                 # a new state, its own predecessor (it may repeat)
            g.labels.append(label)
            g.preds.append([len(g.labels) - 1])
            g.char.append(char)
            g.reading.append(reading)
            return len(g.labels) - 1

        between = state(BLANK)                                   # the blank before the first character
        g.starts.append(between)
        last_phones = []                                         # the last phone state of each reading of the char before
        for k, options in enumerate(readings):
            if not options or not all(options):
                raise ValueError(f"character {k}: needs at least one reading, each of at least one phone")
            ends = []
            for r, phones in enumerate(options):
                prev = None
                for j, label in enumerate(phones):
                    if label == BLANK:
                        raise ValueError(f"character {k} reading {r}: class 0 is the blank, not a phone")
                    s = state(label, k, r)
                    if j == 0:                                   # entered from the blank before, or directly from the
                        g.preds[s] += [between] + [p for p in last_phones if g.labels[p] != label]   # last char
                        if k == 0:
                            g.starts.append(s)
                    else:
                        inner = state(BLANK)                     # an optional blank between two phones of a reading
                        g.preds[inner].append(prev)
                        g.preds[s].append(inner)
                        if g.labels[prev] != label:              # equal phones need the blank between them
                            g.preds[s].append(prev)
                    prev = s
                ends.append(prev)
            between = state(BLANK)                               # the blank after this character
            g.preds[between] += ends
            last_phones = ends
        g.ends = [between] + last_phones
        return g

    def char_frames(self, path):
        """A best path (frames,) of state indices -> [(first frame, last frame, reading)] per character."""
        spans = {}
        for t, s in enumerate(path.tolist()):
            k = self.char[s]
            if k >= 0:
                first, _, reading = spans.get(k, (t, t, self.reading[s]))
                spans[k] = (first, t, reading)
        return [spans[k] for k in range(len(spans))]


def viterbi(log_probs, frames, graphs):
    """Best CTC paths. log_probs (B, T, C) float, frames (B,) valid frames per row, graphs: B ReadingGraphs.
    -> (paths, scores): paths a list of B long tensors (frames_b,) of state indices, scores (B,) the paths' summed
    log-probs (-inf where the text cannot fit the frames: each phone needs a frame, equal neighbours a blank between)."""
    b, t_max, _ = log_probs.shape
    device = log_probs.device
    n_states = max(len(g.labels) for g in graphs)
    n_preds = max(len(p) for g in graphs for p in g.preds)
    labels = torch.zeros(b, n_states, dtype=torch.long)
    preds = torch.full((b, n_states, n_preds), n_states, dtype=torch.long)   # n_states: a column that stays -inf
    start = torch.full((b, n_states + 1), -torch.inf)
    end = torch.zeros(b, n_states + 1, dtype=torch.bool)
    for i, g in enumerate(graphs):
        labels[i, :len(g.labels)] = torch.tensor(g.labels)
        for s, p in enumerate(g.preds):
            preds[i, s, :len(p)] = torch.tensor(p)
        start[i, g.starts] = 0.0
        end[i, g.ends] = True
    labels, preds, start, end = labels.to(device), preds.to(device), start.to(device), end.to(device)
    emit = log_probs.float().gather(2, labels[:, None, :].expand(b, t_max, n_states))   # (B, T, S)
    emit = torch.cat([emit, torch.full((b, t_max, 1), -torch.inf, device=device)], 2)   # (B, T, S + 1)
    score = start + emit[:, 0]                                   # (B, S + 1) best path ending in each state at t = 0
    flat_preds = preds.view(b, -1)                                # (B, S * P)
    back = torch.zeros(t_max, b, n_states, dtype=torch.long, device=device)
    frames = frames.to(device)
    for t in range(1, t_max):
        candidates = score.gather(1, flat_preds).view(b, n_states, n_preds)        # (B, S, P)
        best, arg = candidates.max(2)                                              # (B, S)
        live = (t < frames)[:, None]                                               # rows past their end keep still
        back[t] = torch.where(live, preds.gather(2, arg[..., None])[..., 0], torch.arange(n_states, device=device))
        score[:, :n_states] = torch.where(live, best + emit[:, t, :n_states], score[:, :n_states])
    final = score.masked_fill(~end, -torch.inf)
    scores, state = final.max(1)                                  # (B,)
    path = torch.empty(t_max, b, dtype=torch.long, device=device)
    path[-1] = state
    for t in range(t_max - 1, 0, -1):
        path[t - 1] = back[t].gather(1, path[t][:, None])[:, 0]
    return [path[: int(n), i].cpu() for i, n in enumerate(frames.tolist())], scores


def char_log_posteriors(graph, path, log_probs):
    """Per character: the head's log-probabilities of the path's phones on the frames they take, a list each.
    log_probs (T, C) of one row, path (frames,) from viterbi. Confidence of a stretch = exp(mean of its values), the
    geometric mean posterior of its phones' frames: near 1 where the head hears those phones, low where the text
    was forced onto audio that says something else."""
    labels = torch.tensor(graph.labels)[path]                                          # (frames,)
    picked = log_probs[: len(path)].float().cpu().gather(1, labels[:, None])[:, 0]     # (frames,)
    out = [[] for _ in range(1 + max(graph.char))]
    for k, lp in zip(torch.tensor(graph.char)[path].tolist(), picked.tolist()):
        if k >= 0:
            out[k].append(lp)
    return out


def frame_centre_s(f):
    return f * FRAME_S + FRAME_SPAN_S / 2


def char_times(spans, frames, offset_s=0.0):
    """[(first frame, last frame, reading)] per character (ReadingGraph.char_frames) -> [(start_s, end_s)] per
    character by the module's rule: each starts half a frame before its first frame's centre and ends where the
    next starts (a blank run belongs to the character before it), the last half a frame after its last frame's
    centre; then offset_s added (the constant fitted on dev data); all within the audio the frames see."""
    if not spans:
        return []
    bounds = [frame_centre_s(b[0]) - FRAME_S / 2 for b in spans[1:]]
    first = frame_centre_s(spans[0][0]) - FRAME_S / 2
    last = frame_centre_s(spans[-1][1]) + FRAME_S / 2
    starts, ends = [first] + bounds, bounds + [last]
    audio_end = (frames - 1) * FRAME_S + FRAME_SPAN_S
    clip = lambda t: min(audio_end, max(0.0, t + offset_s))    # noqa: E731
    return [(round(clip(s), 4), round(clip(e), 4)) for s, e in zip(starts, ends)]
