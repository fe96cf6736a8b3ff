"""
options.py: every decoding knob in one frozen dataclass (whisper's DecodingOptions is the model), with its checks and
how unset settings are resolved: a search setting left None (and onset_lead_seconds="auto") takes the checkpoint's
assets["decoding"] value, else SEARCH_DEFAULTS (DecodeOptions.resolve). search.py's beam search reads the search
fields, recognize.py's Recognizer the others (tasks, long recordings, entity lists, times, confidences).
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import files
from image import BOS, EOS, PAD

MAX_AUDIO_SECONDS = 60.0  # longer wavs are refused (the encoder's attention is quadratic in frames)
MIN_PIECE_SECONDS = 4.0   # shortest --max-piece-seconds: room for speech, the pad and the overlap of a cut
VADS = ("silero", "energy")
PIECE_RULES = ("pauses", "packed")  # a piece per stretch of speech between pauses, or stretches packed up to the limit


# search settings built into the code: what an option left unset (None) gets when the checkpoint has no value
SEARCH_DEFAULTS = dict(beam=5, max_len=128, min_len=1, no_repeat_ngram_size=5, constraint_range=None,
                       len_penalty=1.0, ctc_weight=0.0)

TIMESTAMPS = ("entities", "chars", "none")
# --entity-weight when unset, per task: chosen two-fold (evaluate.py choose) on the CNERTA dev text (2; README) and
# on the demo unseen-names split among the weights that cost the ordinary demo valid split <= 0.5 F1 (3 and 2.5)
ENTITY_WEIGHTS = {"TNER": 2.0, "MNER": 2.0, "SNER": 3.0}


@dataclass(frozen=True)
class DecodeOptions:
    """Every decoding knob: the beam search's settings (fairseq SequenceGenerator's) and what the Recognizer decodes.

    A search setting left None, and onset_lead_seconds "auto", take the checkpoint's assets["decoding"] value, else
    SEARCH_DEFAULTS (resolve()); explicit values win. beam_search reads the search fields, Recognizer the others.
    """
    # search
    beam: Optional[int] = None                  # beam width; 1 = greedy
    max_len: Optional[int] = None               # max_len_b (max_len_a is 0): at step max_len only EOS is allowed
    min_len: Optional[int] = None               # EOS is barred while step < min_len
    no_repeat_ngram_size: Optional[int] = None  # ban repeating an n-gram of this size (0 = off)
    constraint_range: Optional[tuple] = None    # (start, end): logits[4:start], logits[end:] = -inf before log_softmax
    len_penalty: Optional[float] = None         # final score = sum(logprobs) / len**len_penalty (len includes EOS)
    ctc_weight: Optional[float] = None          # SNER: joint CTC/attention weight (0 = decoder only, as fairseq)
    ctc_candidates: int = 10                    # SNER joint decoding: characters per row the CTC scores each step
    bos: int = BOS                              # special ids: 0/1/2 in our vocabularies; only a ModelScope directory
    pad: int = PAD                              # with the bare BERT vocab.txt puts them elsewhere (parity tests)
    eos: int = EOS
    # what to decode
    asr: bool = False                           # plain MMSpeech recognition (no text stream); results carry tokens
    constrain: bool = True                      # TNER/MNER: the input text with brackets inserted (BracketConstraint)
    pool_chars: bool = True                     # constrained: the known character scores the whole character mass
    entity_bias: float = 0.0                    # constrained: added to every opening bracket's log-probability
    entities: Optional[str] = None              # a user's entity list file (entitylist.py): names to favour
    entity_weight: Optional[float] = None       # its bonus per character of a listed string (entitylist.py); None:
                                                # ENTITY_WEIGHTS of the task (list_weight)
    nbest: int = 1                              # results also list the best nbest hypotheses (at most beam)
    timestamps: str = "entities"                # SNER/MNER: times from the phone CTC head (align.py): entities,
                                                # chars (every character's too) or none
    time_offset_ms: float = -10.0               # added to every time (align.char_times; fitted on demo dev)
    confidence_temperature: float = 1.0         # entity confidence = exp(log-confidence / T) (entity_log_confidence)
    confidence_platt: Optional[tuple] = None    # (a, b): then sigmoid(a logit(exp(log-confidence / T)) + b)
    min_confidence: float = 0.0                 # results drop entities whose confidence is below
    # inputs
    pseudo_text_len: Optional[int] = None       # SNER pseudo text length (None: the checkpoint's, else Featurizer's)
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # longer audio is never decoded in one go:
    max_piece_seconds: float = 20.0             # SNER/MNER recordings longer than this are cut at pauses (segment.py)
                                                # into pieces of at most this and max_audio_seconds
    vad: str = "silero"                         # voice activity detector of the cut: silero or energy
    pieces: str = "pauses"                      # pauses: a piece per stretch of speech; packed: stretches packed
                                                # into pieces up to max_piece_seconds (segment.plan_pieces)
    min_pause_seconds: float = 0.2              # silence that separates two stretches of speech
    pause_level: Optional[float] = 0.25         # a pause whose mean speech probability is this or more is a dip
                                                # inside speech, not a pause (segment.speech_stretches); None: none
    short_piece_seconds: float = 2.0            # a piece this short that touches the next joins it (segment.
    join_piece_seconds: Optional[float] = 6.5   # join_touching) while both stay within this, and so may a gap piece
                                                # and a neighbour (MNER, segment.join_gaps); None: no such joins
    piece_pad_seconds: float = 0.2              # pause a piece keeps before and after its speech (at most half of it)
    vad_threshold: float = 0.5                  # speech probability that starts a stretch of speech (segment.py)
    quiet_threshold: Optional[float] = 0.1      # MNER: quiet speech between pieces, found at this probability,
                                                # makes pieces too (segment.quiet_pieces); None: none
    gap_piece_seconds: Optional[float] = 2.5    # MNER: a gap between pieces this long makes a piece that takes the
                                                # characters nobody heard (segment.gap_pieces); None: none
    realign_margin_seconds: Optional[float] = 0.2   # MNER: pieces move to the pause their shares' alignment finds,
                                                # characters too when it is this much longer (segment.pause_between)
    onset_lead_seconds: Union[float, None, str] = "auto"   # SNER pieces start this long before the first phone
                                                # the CTC head hears (segment.snap_onsets); None: where the detector
                                                # puts them; "auto": the checkpoint's assets["decoding"] value or None
    modelscope_padding: bool = False            # ModelScope's batch-dependent encoder padding (when loading a path)

    def list_weight(self, task) -> float:
        """The entity list's bonus per character for `task`: entity_weight, else ENTITY_WEIGHTS[task]."""
        if self.entity_weight is not None:
            return self.entity_weight
        if task not in ENTITY_WEIGHTS:
            raise ValueError(f"no entity list weight for task {task!r} (one of {', '.join(ENTITY_WEIGHTS)})")
        return ENTITY_WEIGHTS[task]

    @property
    def longest_piece_seconds(self) -> float:
        """The most audio decoded in one go: longer recordings are cut into pieces of at most this."""
        return min(self.max_piece_seconds, self.max_audio_seconds)

    def resolve(self, assets=None, capacity=None):
        """-> these options with every unset search setting (and pseudo_text_len, an "auto" onset_lead_seconds) taken
        from the checkpoint's assets, else SEARCH_DEFAULTS; checked, max_len against `capacity` (the decoder's
        positions) when given."""
        saved = dict((assets or {}).get("decoding") or {})
        if "max_len_b" in saved:                                 # fairseq's name
            saved["max_len"] = saved["max_len_b"]
        saved["constraint_range"] = tuple(saved["constraint_range"]) if saved.get("constraint_range") else None
        unset = {name: saved.get(name, default) for name, default in SEARCH_DEFAULTS.items()
                 if getattr(self, name) is None}
        if self.pseudo_text_len is None:
            unset["pseudo_text_len"] = (assets or {}).get("pseudo_text_len")
        if self.onset_lead_seconds == "auto":                   # train.py: models that need it say so
            unset["onset_lead_seconds"] = saved.get("onset_lead_seconds")
        options = dataclasses.replace(self, **unset)
        options.check()
        if options.nbest > options.beam:
            raise files.InputError(f"nbest {options.nbest} must be between 1 and the beam size {options.beam}")
        if capacity is not None and options.max_len > capacity:
            raise files.InputError(f"max_len {options.max_len} must be in [1, {capacity}] (decoder positions)")
        return options

    def check(self, flags=None):
        """InputError for a value out of range (unset ones pass); flags: {field: CLI flag} names the flag."""
        name = lambda field: (flags or {}).get(field, field)      # noqa: E731
        for field in ("beam", "max_len", "nbest", "ctc_candidates", "pseudo_text_len"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise files.InputError(f"{name(field)} must be >= 1, got {value}")
        if self.ctc_weight is not None and not 0 <= self.ctc_weight < math.inf:   # NaN fails it too
            raise files.InputError(f"{name('ctc_weight')} must be >= 0, got {self.ctc_weight}")
        if self.entity_weight is not None and not 0 <= self.entity_weight < math.inf:
            raise files.InputError(f"{name('entity_weight')} must be a finite number >= 0, got {self.entity_weight}")
        if self.entities and self.asr:
            raise files.InputError(f"{name('entities')} biases entity brackets: not with {name('asr')}")
        if not math.isfinite(self.entity_bias):
            raise files.InputError(f"{name('entity_bias')} must be a finite number, got {self.entity_bias}")
        if self.entity_bias and (self.asr or not self.constrain):
            raise files.InputError(f"{name('entity_bias')} biases the constrained search: not with {name('asr')} "
                                   f"or unconstrained ({name('constrain')})")
        if self.timestamps not in TIMESTAMPS:
            raise files.InputError(f"{name('timestamps')} must be one of {', '.join(TIMESTAMPS)}, got "
                                   f"{self.timestamps!r}")
        if not math.isfinite(self.time_offset_ms):
            raise files.InputError(f"{name('time_offset_ms')} must be a finite number, got {self.time_offset_ms}")
        if self.confidence_platt is not None and (len(self.confidence_platt) != 2 or not all(
                math.isfinite(x) for x in self.confidence_platt)):
            raise files.InputError(f"{name('confidence_platt')} must be two finite numbers A,B, got "
                                   f"{self.confidence_platt}")
        if not 0 < self.confidence_temperature < math.inf:
            raise files.InputError(f"{name('confidence_temperature')} must be a positive number, got "
                                   f"{self.confidence_temperature}")
        if not 0 <= self.min_confidence <= 1:
            raise files.InputError(f"{name('min_confidence')} must be in [0, 1], got {self.min_confidence}")
        if not 0 < self.max_audio_seconds < math.inf:
            raise files.InputError(f"{name('max_audio_seconds')} must be a positive number, got "
                                   f"{self.max_audio_seconds}")
        if not MIN_PIECE_SECONDS <= self.max_piece_seconds < math.inf:
            raise files.InputError(f"{name('max_piece_seconds')} must be at least {MIN_PIECE_SECONDS:g}, got "
                                   f"{self.max_piece_seconds}")
        if self.vad not in VADS:
            raise files.InputError(f"{name('vad')} must be one of {', '.join(VADS)}, got {self.vad!r}")
        if self.pieces not in PIECE_RULES:
            raise files.InputError(f"{name('pieces')} must be one of {', '.join(PIECE_RULES)}, got {self.pieces!r}")
        if not 0 < self.min_pause_seconds <= 5:
            raise files.InputError(f"{name('min_pause_seconds')} must be in (0, 5], got {self.min_pause_seconds}")
        if not 0 <= self.short_piece_seconds <= 10:
            raise files.InputError(f"{name('short_piece_seconds')} must be in [0, 10], got {self.short_piece_seconds}")
        if self.join_piece_seconds is not None and not 0 < self.join_piece_seconds < math.inf:
            raise files.InputError(f"{name('join_piece_seconds')} must be a positive number of seconds or None, got "
                                   f"{self.join_piece_seconds}")
        if self.pause_level is not None and not 0 < self.pause_level < 1:
            raise files.InputError(f"{name('pause_level')} must be in (0, 1) or None, got {self.pause_level}")
        if not 0.15 < self.vad_threshold < 1:
            raise files.InputError(f"{name('vad_threshold')} must be in (0.15, 1), got {self.vad_threshold}")
        if not 0 <= self.piece_pad_seconds <= 0.5:
            raise files.InputError(f"{name('piece_pad_seconds')} must be in [0, 0.5], got {self.piece_pad_seconds}")
        if self.quiet_threshold is not None and not 0 < self.quiet_threshold < 1:
            raise files.InputError(f"{name('quiet_threshold')} must be in (0, 1) or None, got {self.quiet_threshold}")
        if self.gap_piece_seconds is not None and not 1 <= self.gap_piece_seconds < math.inf:
            raise files.InputError(f"{name('gap_piece_seconds')} must be 1 second or more or None, got "
                                   f"{self.gap_piece_seconds}")
        if self.realign_margin_seconds is not None and not 0 <= self.realign_margin_seconds < math.inf:
            raise files.InputError(f"{name('realign_margin_seconds')} must be 0 or more seconds or None, got "
                                   f"{self.realign_margin_seconds}")
        lead = self.onset_lead_seconds
        if lead not in (None, "auto") and (isinstance(lead, str) or not 0 <= lead <= 0.5):
            raise files.InputError(f"{name('onset_lead_seconds')} must be in [0, 0.5], None or 'auto', got {lead!r}")
