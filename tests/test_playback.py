"""Redacted recordings played back through decode.py (#17): the redacted entities are no longer recognised, and the
rest is transcribed within 2 CER points of the unredacted recordings. It needs a model that has learnt the demo
corpus (train.py --dataset demo, ~15 minutes on a CPU), so it runs only where IMAGE_DEMO_CKPT names its best.pt:

    IMAGE_DEMO_CKPT=runs/demo/best.pt python -m pytest tests/test_playback.py

The tiny random models of the other tests recognise nothing, so they cannot show that redaction removes what was
recognised. IMAGE_PLAYBACK_LIMIT: how many demo test utterances (default 200; 0 = the whole split). The redaction
is the target's: a beep, --pad-ms 0 (the default 100 ms pad also bleeps part of each neighbouring character, which
then cannot be heard: measured in the README)."""
import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import decode  # noqa: E402
import evaluate  # noqa: E402

CKPT = os.environ.get("IMAGE_DEMO_CKPT")


@pytest.mark.skipif(not CKPT or not Path(CKPT).is_file(),
                    reason="IMAGE_DEMO_CKPT does not name a trained demo checkpoint (train.py --dataset demo)")
def test_redacted_entities_are_gone_and_the_rest_is_still_heard(tmp_path):
    limit = os.environ.get("IMAGE_PLAYBACK_LIMIT", "200")
    common = ["--ckpt", CKPT, "--dataset", "demo", "--split", "test", "--limit", limit, "--task", "SNER", "--eval",
              "--threads", "2"]
    redacted = tmp_path / "redacted"
    decode.main([*common, "--predictions", str(tmp_path / "original.jsonl"), "--out", str(tmp_path / "o.json"),
                 "--redact-dir", str(redacted), "--pad-ms", "0"])        # the beep, exactly over each entity
    decode.main([*common, "--audio-dir", str(redacted), "--predictions", str(tmp_path / "replayed.jsonl"),
                 "--out", str(tmp_path / "r.json")])
    out = io.StringIO()
    with redirect_stdout(out):
        evaluate.main(["playback", "--predictions", str(tmp_path / "replayed.jsonl"), "--original",
                       str(tmp_path / "original.jsonl"), "--task", "SNER", "--dataset", "demo", "--split", "test"])
    result = json.loads(out.getvalue())
    print(result)
    assert result["redacted_entities"] > 0
    assert result["still_found"] == 0
    assert result["cer_of_the_rest"] <= result["cer_original"] + 2.0
