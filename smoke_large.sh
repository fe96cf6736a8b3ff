#!/usr/bin/env bash
# The paper configuration end to end on a CPU (issue #16 "Prove it"): a random-weight *large* ModelScope MMSpeech
# directory -> weights.py -> train.py (paper recipe, global batch 12, bf16 autocast where native) for 2 steps ->
# --resume for a 3rd -> a dev evaluation of a few sentences (inside each train.py run) -> decode.py on one MNER input.
# Not a test: it proves the large model converts, trains, resumes, evaluates and decodes, and measures each command.
#
#   bash smoke_large.sh /work/smoke-large          # everything big goes under this folder, never into the repo
#
# Needs the reference venv once (bash ../shared/reference/setup.sh, ~2 min) and about 15 GB of disk
# (2.5 GB ModelScope directory, 2.4 GB converted checkpoint, 7.3 GB last.pt with AdamW moments, 2.4 GB best.pt,
# which decode.py reads).
# Each command's wall time and peak RSS come from GNU time (apt-get install time) into OUT/<name>.time.
set -euo pipefail

OUT=${1:?usage: smoke_large.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$REPO/.venv/bin/python}                            # the project's venv (torch CPU)
REF=${REF:-$REPO/../shared/reference}                       # MMSpeech reference tools (make_modelscope_dir.py)
MS_DIR=${MS_DIR:-$OUT/ms_large}                             # the random-weight ModelScope directory
CKPT=${CKPT:-$OUT/large.pt}                                 # converted checkpoint (our format)
RUN=${RUN:-$OUT/run}                                        # train.py --out
DEMO_DIR=${DEMO_DIR:-${IMAGE_CACHE:-$HOME/.cache/image}/demo-v2-seed0}   # demo corpus (train.py builds it)
# train.py --dtype: bf16 (the GPU run's autocast) where the CPU computes it natively (AVX512-BF16/AMX); elsewhere
# torch falls back to a scalar bf16 gemm (measured 68x slower than fp32 on an AVX2 EPYC: one step did not finish in
# 11 min, fp32 takes 1 min), so fp32 there.
DTYPE=${DTYPE:-$(cd "$REPO" && "$PY" -c 'import devices, torch; print("bf16" if devices.native_bf16(torch.device("cpu")) else "fp32")')}
EVAL_LIMIT=${EVAL_LIMIT:-2}                                 # dev sentences per evaluation (x3 tasks)
TIMEOUT=${TIMEOUT:-7200}                                    # seconds per command
NICE=${NICE:-5}                                             # the machine is shared
mkdir -p "$OUT"
echo "== dtype $DTYPE"

# run NAME CMD...: one command under GNU time (time waits on timeout, so its peak RSS is the python's),
# output to OUT/NAME.log as well as the terminal, then one summary line.
run() {
    local name=$1; shift
    echo "== $name: $*"
    /usr/bin/time -v -o "$OUT/$name.time" timeout "$TIMEOUT" nice -n "$NICE" "$@" 2>&1 | tee "$OUT/$name.log"
    awk -v name="$name" '/Elapsed \(wall clock\)/ {wall=$NF} /Maximum resident set size/ {kb=$NF}
        END {printf "== %s: wall %s, peak RSS %.2f GB = %.2f GiB\n", name, wall, kb*1024/1e9, kb/1048576}' \
        "$OUT/$name.time" | tee -a "$OUT/summary.txt"
}

# 1. random-weight large MMSpeech in ModelScope's layout (seeded: byte-identical on every run)
[ -f "$MS_DIR/pytorch_model.bin" ] || run make_dir "$REF/make_modelscope_dir.py" --size large --seed 0 --out "$MS_DIR"
# 2. convert to our checkpoint format (steps 1-2 are skipped when their output exists)
[ -f "$CKPT" ] || run convert "$PY" "$REPO/weights.py" "$MS_DIR" "$CKPT"
# 3. paper recipe (lr 1e-5, uniform TNER/SNER/MNER mix, speeds 0.9/1.0/1.1, pseudo length 40, beam 5, the model's own
#    dropout) on the demo corpus; --recipe paper overrides the demo recipe that --dataset demo would apply.
#    The run stops after 2 optimizer steps, evaluates EVAL_LIMIT dev sentences and writes last.pt and best.pt.
TRAIN=("$PY" "$REPO/train.py" --dataset demo --recipe paper --init "$CKPT" --batch-size 12 --dtype "$DTYPE"
       --device cpu --eval-limit "$EVAL_LIMIT" --log-every 1 --seed 0 --out "$RUN")
rm -rf "$RUN"
run train "${TRAIN[@]}" --max-steps 2
ls -l "$CKPT" "$RUN"/last.pt "$RUN"/best.pt | tee -a "$OUT/summary.txt"
# 4. continue the same run from last.pt for a 3rd step (and evaluate again)
run resume "${TRAIN[@]}" --max-steps 3 --resume
# 5. one MNER input: the first dev sentence's wav and transcript (data paths from the demo corpus files)
read -r WAV TEXT < <("$PY" - "$DEMO_DIR" <<'EOF'
import json, sys
root = sys.argv[1]
first = json.loads(open(f"{root}/valid.json", encoding="utf-8").readline())
index = map(json.loads, open(f"{root}/index.jsonl", encoding="utf-8"))
wav = next(e["wav"] for e in index if e["id"] == first["audio"])
print(f"{root}/{wav}", first["sentence"])
EOF
)
run decode "$PY" "$REPO/decode.py" --ckpt "$RUN/best.pt" --wav "$WAV" --text "$TEXT" --device cpu --json
cat "$OUT/summary.txt"
