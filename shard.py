"""shard.py: decoding spread over processes and machines (torchrun), resumable, merged in input order.

    torchrun --nproc_per_node 2 decode.py --ckpt best.pt --input big.jsonl --out preds.jsonl

Every rank cuts the inputs into the same batches (plan_batches: by task, longest first, as Recognizer.run would
batch them in one process), deals the batches to the ranks balanced by cost (deal: audio seconds, or characters
read at CHARS_PER_SECOND, largest first to the least loaded rank), decodes its own, and appends each batch's results
to its part file (Parts: OUT.parts/LABEL.rankR.jsonl, flushed and synced per batch) before the next. A rerun with the
same arguments (each part file starts with the fingerprint of its run: input, checkpoint, options) skips every batch
whose results are written, so a killed run loses at most the batch each rank had in flight. At the end the results
travel to every rank (gather) and come back in input order; decode.py writes OUT and every rank removes its parts.
Since the batches are the same whatever the number of processes, N processes write what one writes (same threads
per process: matrix products split their sums by thread count).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import files

CHARS_PER_SECOND = 4.5     # a text input costs as much as this many characters of speech a second (for balancing)


def plan_batches(groups, lengths, batch_size: int, keep_order: bool = False) -> list[list[int]]:
    """Input indices -> batches: grouped by groups[i] (the task) in order of first appearance, longest first (ties
    in input order; keep_order: in input order, as --modelscope-padding needs), batch_size at a time:
    Recognizer.run's own batching of the same list."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batches = []
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        idx = idx if keep_order else sorted(idx, key=lambda i: -lengths[i])
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
    """The results written so far for one output file, in OUT.parts/: LABEL.rankR.jsonl per rank and label, its
    first line the fingerprint of the run that wrote it ({"run": ...}), then one {"i": input index, "result": ...}
    a line. Every rank checks every part file it sees: results of a run with other arguments are refused, never
    mixed (on a machine without a shared disk a rank sees its own files, and checks those). A file holding no
    result yet is simply started anew."""

    def __init__(self, out, run: dict, rank: int = 0):
        self.dir, self.rank, self.run = Path(str(out) + ".parts"), rank, run
        self.headed = set()                      # labels whose file of this rank starts with this run's fingerprint
        if rank == 0:
            files.check_output_dir(self.dir, "parts folder")
        for path in sorted(self.dir.glob("*.rank*.jsonl")):
            head, has_results = self._head(path)
            if has_results and head != {"run": run}:
                before = (head or {}).get("run") or {} if isinstance(head, dict) else {}
                changed = sorted(k for k in set(run) | set(before) if before.get(k) != run.get(k))
                raise files.InputError(f"{path}: results of a run with other arguments ({', '.join(changed)} "
                                       "differ): rerun with the same arguments to finish it, or remove "
                                       f"{self.dir}")

    @staticmethod
    def _head(path) -> tuple:
        """(the parsed first line of a part file or None, whether a line follows it): read, not the whole file."""
        with open(path, "rb") as f:
            first, second = f.readline(), f.readline()
        try:
            return json.loads(first.decode("utf-8")), bool(second.strip())
        except ValueError:
            return None, bool(second.strip())

    @staticmethod
    def _lines(path) -> list:
        """The parsed lines of a part file; a line that does not parse (torn by a kill in mid-write, even inside a
        multi-byte character) is None."""
        out = []
        for raw in Path(path).read_bytes().split(b"\n"):
            if raw.strip():
                try:
                    out.append(json.loads(raw.decode("utf-8")))
                except ValueError:                   # UnicodeDecodeError and JSONDecodeError alike
                    out.append(None)
        return out

    def done(self, label: str) -> dict[int, dict]:
        """{input index: result} of every part file of this label that this machine sees (a later line for the same
        input wins)."""
        found = {}
        for path in sorted(self.dir.glob(f"{label}.rank*.jsonl")):
            for item in self._lines(path)[1:]:
                if isinstance(item, dict) and isinstance(item.get("i"), int) and "result" in item:
                    found[item["i"]] = item["result"]
        return found

    def append(self, label: str, indexed_results) -> None:
        """One batch's [(input index, result)], written in one go, flushed and synced before the next batch."""
        self.dir.mkdir(parents=True, exist_ok=True)     # another machine's rank without a shared file system
        path = self.dir / f"{label}.rank{self.rank}.jsonl"
        lines, mode = [{"i": i, "result": r} for i, r in indexed_results], "a+b"
        if label not in self.headed:           # once per label: a file of this run's, or one started anew
            if not (path.is_file() and self._head(path)[0] == {"run": self.run}):
                lines, mode = [{"run": self.run}] + lines, "wb"  # (__init__ refused one with other results)
            self.headed.add(label)
        text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
        with open(path, mode) as f:
            f.seek(0, os.SEEK_END)
            if f.tell():                           # a torn line from a kill ends where the next batch begins
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """This rank's part files, then the folder once it is empty (every rank calls it after the last barrier)."""
        for path in self.dir.glob(f"*.rank{self.rank}.jsonl"):
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:                               # other ranks' files still there, or gone already
            pass


def run_sharded(decode_batch, requests, groups, lengths, costs, batch_size, parts: Parts | None, label: str,
                rank: int = 0, world: int = 1, gather=None, log=None, keep_order=False, on_start=None) -> list[dict]:
    """Decode `requests` as a shard of a world of ranks -> every result, in input order (on every rank).
    decode_batch(list of requests, group) -> their results; groups/lengths/costs: per request (task, length hint,
    cost); parts: where results are kept between runs (None: nowhere); gather(obj) -> [obj of every rank];
    keep_order: batches in input order (plan_batches); on_start(input indices this rank will decode): before the
    first batch (a progress bar's total). A rank that fails still meets the others at the gather, so that every
    rank stops with the failure instead of waiting for it."""
    batches = plan_batches(groups, lengths, batch_size, keep_order)
    mine = deal([sum(costs[i] for i in b) for b in batches], world)[rank]
    results, failure = {}, None
    try:
        done = parts.done(label) if parts is not None else {}
        todo = [b for b in mine if not all(i in done for i in batches[b])]
        skipped = sum(len(batches[b]) for b in mine) - sum(len(batches[b]) for b in todo)
        if log is not None and skipped:
            log(f"rank {rank}: {skipped} {label} inputs already decoded (in {parts.dir}): skipped")
        if on_start is not None:
            on_start([i for b in todo for i in batches[b]])
        results = {i: done[i] for b in mine for i in batches[b] if i in done}
        for b in todo:
            idx = batches[b]
            out = decode_batch([requests[i] for i in idx], groups[idx[0]])
            if parts is not None:
                parts.append(label, zip(idx, out))
            results.update(zip(idx, out))
    except Exception as e:                           # raised below, after the others heard of it
        failure = e
    gathered = gather((failure is not None and f"rank {rank}: {failure}", results)) if gather is not None and \
        world > 1 else [(None, results)]
    if failure is not None:
        raise failure
    # a peer that failed after its own last gather (rank 0 writing the output) sends its failure instead
    failed = [g[0] if isinstance(g, tuple) else f"a rank failed: {g}" for g in gathered
              if not isinstance(g, tuple) or g[0]]
    if failed:
        raise RuntimeError(f"another rank failed: {failed[0]}")
    everything = {}
    for _, part in gathered:
        everything.update(part)
    missing = [i for i in range(len(requests)) if i not in everything]
    if missing:                                      # cannot happen unless a rank lost its part
        raise RuntimeError(f"{len(missing)} inputs have no result (first: input {missing[0]})")
    return [everything[i] for i in range(len(requests))]
