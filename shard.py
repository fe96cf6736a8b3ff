"""shard.py: decoding spread over processes and machines (torchrun), resumable, merged in input order.

    torchrun --nproc_per_node 2 decode.py --ckpt best.pt --input big.jsonl --out preds.jsonl

Every rank cuts the inputs into the same batches (plan_batches: by task, longest first, as Recognizer.run would
batch them in one process), deals the batches to the ranks balanced by cost (deal: audio seconds, or characters
read at CHARS_PER_SECOND, largest first to the least loaded rank), decodes its own, and appends each batch's results
to its part file (Parts: OUT.parts/LABEL.rankR.jsonl, flushed and synced per batch) before the next. A rerun with the
same arguments (Parts checks run.json: input, checkpoint, options) skips every batch whose results are written, so a
killed run loses at most the batch each rank had in flight. At the end the results travel to every rank (gather)
and come back in input order; decode.py writes OUT and removes the parts. Since the batches are the same whatever
the number of processes, N processes write what one writes (same threads per process: matrix products split their
sums by thread count).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import files

CHARS_PER_SECOND = 4.5     # a text input costs as much as this many characters of speech a second (for balancing)


def plan_batches(groups, lengths, batch_size: int) -> list[list[int]]:
    """Input indices -> batches: grouped by groups[i] (the task) in order of first appearance, longest first (ties
    in input order), batch_size at a time: Recognizer.run's own batching of the same list."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batches = []
    for g in dict.fromkeys(groups):
        idx = sorted((i for i, x in enumerate(groups) if x == g), key=lambda i: -lengths[i])
        batches += [idx[k: k + batch_size] for k in range(0, len(idx), batch_size)]
    return batches


def deal(costs, world: int) -> list[list[int]]:
    """Batch costs -> the batch indices of each rank (each list in batch order): largest batch first to the least
    loaded rank (ties: the lower rank). No rank gets more than the mean load plus the largest batch."""
    loads, mine = [0.0] * world, [[] for _ in range(world)]
    for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        r = min(range(world), key=lambda r: (loads[r], r))
        loads[r] += costs[b]
        mine[r].append(b)
    return [sorted(m) for m in mine]


def fingerprint(**what) -> dict:
    """What makes results reusable: the values given, with every existing file among them named by its path and its
    content hash (files up to 64 MB, inputs) or its size and modification time (checkpoints)."""
    out = {}
    for key, value in what.items():
        if isinstance(value, (str, Path)) and os.path.isfile(value):
            st = os.stat(value)
            out[key] = {"path": os.path.abspath(value), "bytes": st.st_size}
            if st.st_size <= 64 << 20:
                out[key]["sha256"] = hashlib.sha256(Path(value).read_bytes()).hexdigest()
            else:
                out[key]["mtime_ns"] = st.st_mtime_ns
        else:
            out[key] = value
    return json.loads(json.dumps(out, default=str))


class Parts:
    """The results written so far for one output file: OUT.parts/ with run.json (the fingerprint of the run that
    wrote them) and LABEL.rankR.jsonl, one {"i": input index, "result": {...}} a line. Rank 0 creates the folder;
    a folder from a run with other arguments is refused (nothing is mixed)."""

    def __init__(self, out, run: dict, rank: int = 0):
        self.dir, self.rank, self.run = Path(str(out) + ".parts"), rank, run
        meta = self.dir / "run.json"
        if meta.is_file() and any(p.stat().st_size for p in self.dir.glob("*.rank*.jsonl")):
            try:
                before = json.loads(meta.read_text(encoding="utf-8"))
            except ValueError:
                before = {}
            if before != run:
                changed = sorted(k for k in set(run) | set(before) if before.get(k) != run.get(k))
                raise files.InputError(f"{self.dir}: results of a run with other arguments ({', '.join(changed)} "
                                       "differ): rerun with the same arguments to finish it, or remove the folder")
        elif rank == 0:                              # new, or a run that failed before its first result
            files.check_output_dir(self.dir, "parts folder")
            files.write_atomic(meta, json.dumps(run, ensure_ascii=False, indent=1) + "\n")

    def done(self, label: str) -> dict[int, dict]:
        """{input index: result} of every part file of this label that this machine sees (a torn last line, from a
        kill in mid-write, is left out; a later line for the same input wins)."""
        found = {}
        for path in sorted(self.dir.glob(f"{label}.rank*.jsonl")):
            for line in path.read_text(encoding="utf-8").split("\n"):
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if isinstance(item, dict) and isinstance(item.get("i"), int) and "result" in item:
                    found[item["i"]] = item["result"]
        return found

    def append(self, label: str, indexed_results) -> None:
        """One batch's [(input index, result)], written in one go, flushed and synced before the next batch."""
        self.dir.mkdir(parents=True, exist_ok=True)     # another machine's rank without a shared file system
        path = self.dir / f"{label}.rank{self.rank}.jsonl"
        text = "".join(json.dumps({"i": i, "result": r}, ensure_ascii=False) + "\n" for i, r in indexed_results)
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():                           # a torn line from a kill ends where the next batch begins
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def run_sharded(decode_batch, requests, groups, lengths, costs, batch_size, parts: Parts | None, label: str,
                rank: int = 0, world: int = 1, gather=None, log=None) -> list[dict]:
    """Decode `requests` as a shard of a world of ranks -> every result, in input order (on every rank).
    decode_batch(list of requests, group) -> their results; groups/lengths/costs: per request (task, length hint,
    cost); parts: where results are kept between runs (None: nowhere); gather(obj) -> [obj of every rank]."""
    batches = plan_batches(groups, lengths, batch_size)
    mine = deal([sum(costs[i] for i in b) for b in batches], world)[rank]
    done = parts.done(label) if parts is not None else {}
    todo = [b for b in mine if not all(i in done for i in batches[b])]
    skipped = sum(len(batches[b]) for b in mine) - sum(len(batches[b]) for b in todo)
    if log is not None and skipped:
        log(f"rank {rank}: {skipped} {label} inputs already decoded (in {parts.dir}): skipped")
    results = {i: done[i] for b in mine for i in batches[b] if i in done}
    for b in todo:
        idx = batches[b]
        out = decode_batch([requests[i] for i in idx], groups[idx[0]])
        if parts is not None:
            parts.append(label, zip(idx, out))
        results.update(zip(idx, out))
    everything = {}
    for part in (gather(results) if gather is not None and world > 1 else [results]):
        everything.update(part)
    missing = [i for i in range(len(requests)) if i not in everything]
    if missing:                                      # cannot happen unless a rank lost its part
        raise RuntimeError(f"{len(missing)} inputs have no result (first: input {missing[0]})")
    return [everything[i] for i in range(len(requests))]
