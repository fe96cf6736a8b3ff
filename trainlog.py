"""trainlog.py: what a training run shows and records as it goes (rank 0): the progress bar with the mean loss,
learning rate and throughput of the last steps, and with train.py --tensorboard DIR the same as TensorBoard curves
(plus the gradient norm and every dev and test evaluation). train.py writes metrics.jsonl and the checkpoints.

    tensorboard --logdir DIR        # then open http://localhost:6006
"""
import math
import sys
import time

from tqdm import tqdm

import files

TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package (pip install tensorboard; "
                       "requirements-test.txt has it), or leave the flag out: metrics.jsonl is written either way")


def require_tensorboard():
    """Before any long work: the SummaryWriter can be made (files.InputError with what to install if not)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (optional dependency)
    except ImportError:
        raise files.InputError(TENSORBOARD_MISSING) from None


class Curves:
    """TensorBoard event files in log_dir: train/loss, train/lr, train/samples_per_s, train/grad_norm (means over
    the progress window) and, for every evaluation, {split}/{task}_f1, _p, _r, _cer and {split}/mean_f1. A resumed
    run passes purge_step = the first step it takes (its checkpoint's + 1), so that what the killed run wrote after
    its last checkpoint is dropped and no curve goes back on itself."""

    def __init__(self, log_dir, purge_step=None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, step, values: dict):
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def evaluation(self, split, step, scores: dict, mean_f1: float):
        """scores: {task: {"f1", "p", "r", "cer", ...}} in percent, as train.Run.evaluate has them."""
        values = {f"{split}/{task}_{k}": s[k] for task, s in scores.items() for k in ("f1", "p", "r", "cer")
                  if k in s and s[k] is not None}
        self.scalars(step, {**values, f"{split}/mean_f1": mean_f1})

    def close(self):
        self.writer.close()


def finite_mean(values) -> float:
    """The mean of the finite values (NaN when there is none)."""
    kept = [x for x in values if math.isfinite(x)]
    return sum(kept) / len(kept) if kept else float("nan")


class Progress:
    """Progress bar (rank 0) with the mean loss, lr and samples/s over the last log_every steps."""

    def __init__(self, total_steps, step, master, log_every, curves: Curves | None = None):
        # redirected to a file: a line every 30 s, not every 0.1 s
        self.bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="train",
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)
        self.total_steps, self.master, self.log_every = total_steps, master, log_every
        self.losses, self.norms, self.t_window, self.samples = [], [], time.time(), 0
        self.curves = curves

    def update(self, step, loss, lr, samples, grad_norm=float("nan")):
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.samples += samples
        if self.master and (step % self.log_every == 0 or step == self.total_steps):
            dt = time.time() - self.t_window
            loss, rate = sum(self.losses) / len(self.losses), self.samples / max(dt, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            if self.curves is not None:                   # a skipped step's NaN does not blank the window
                self.curves.scalars(step, {"train/loss": finite_mean(self.losses), "train/lr": lr,
                                           "train/samples_per_s": rate, "train/grad_norm": finite_mean(self.norms)})
            self.losses, self.norms, self.t_window, self.samples = [], [], time.time(), 0
        self.bar.update(1)
