"""The top-level modules form a ladder: each imports only modules on lower rungs, never inside a function."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest rung first. A module may import modules of lower rungs only (not of its own rung).
LADDER = [
    ("files", "measure", "synth"),  # input errors, output checks, atomic writes | clocks, peak memory, machine
                                    # load | Mandarin speech from espeak-ng with the syllables' start samples
    ("image", "audio", "demo", "devices", "trainlog", "shard"),  # the model | wav, resampling, fbank | the demo
                                    # corpus | device, precision and RNG choices | training's progress bar and
                                    # TensorBoard curves | decoding over torchrun ranks: batches, dealing, parts
    ("text", "cost", "options"),   # special ids, bracket tables, vocabulary, phones | FLOPs and peak memory of a
                                   # training step, from the config | every decoding knob: DecodeOptions
    ("data", "weights", "search", "entitylist", "align"),  # samples, linearization, features, batches |
                                    # converter, checkpoint format | beam search, bracket constraint,
                                    # joint CTC scorer | a user's entity list: its lines, occurrences in a text, SNER
                                    # trie bonus | CTC forced alignment: characters in time
    ("augment", "segment", "workload", "scoring"),  # training-time augmentations (entity swaps, bleeped entities,
                                      # noise) | long recordings: voice activity, pieces, realigned boundaries,
                                      # stitching | what bench.py runs on | our scorer and the official one, CER,
                                      # prediction files
    ("recognize", "diagnose", "breakdown"),  # inputs -> rows -> search -> entities with confidences and times;
                                   # Recognizer | entity times, confidence, playback, long recordings per utterance |
                                   # the error taxonomy: what went wrong per sentence, the breakdown tables
    ("decode", "report"),          # the command line: outputs, label tracks, redaction, --eval | the HTML error
                                   # browser of a predictions file
    ("evaluate",),                 # the scoring and analysis command line: breakdown, report, gazetteer, corpus
                                   # statistics, times, confidence, long recordings, entity lists
    ("train",),
    ("bench",),
]
RUNG = {name: i for i, rung in enumerate(LADDER) for name in rung}


def project_modules(root=ROOT):
    return sorted(p.stem for p in root.glob("*.py"))


def imports(name, root=ROOT):
    """-> [(imported project module, line, inside a function?)] of one top-level module."""
    tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
    ours = set(project_modules(root))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return [f for f in found if f[0] in ours and f[0] != name]


def test_every_module_is_on_the_ladder():
    missing = [m for m in project_modules() if m not in RUNG]
    assert not missing, f"add {missing} to LADDER in tests/test_layout.py"


def test_imports_point_down_the_ladder_only():
    bad = [f"{m}.py:{line} imports {target} (rung {RUNG[target]} >= rung {RUNG[m]})"
           for m in project_modules() if m in RUNG
           for target, line, _ in imports(m) if RUNG.get(target, -1) >= RUNG[m]]
    assert not bad, "\n".join(bad)


def test_no_project_import_inside_a_function():
    hidden = [f"{m}.py:{line} imports {target} inside a function"
              for m in project_modules() for target, line, inside in imports(m) if inside]
    assert not hidden, "\n".join(hidden)


def test_the_checker_sees_an_upward_and_a_hidden_import(tmp_path):
    """The checks above can fail: a planted upward import and a function-level import are both caught."""
    (tmp_path / "files.py").write_text("import decode\n")
    (tmp_path / "decode.py").write_text("def f():\n    import files\n")
    ups = [t for t, _, _ in imports("files", tmp_path) if RUNG[t] >= RUNG["files"]]
    inside = [t for t, _, hidden in imports("decode", tmp_path) if hidden]
    assert ups == ["decode"] and inside == ["files"]
