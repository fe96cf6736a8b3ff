"""trainlog.py: what a training run shows and records as it goes: the progress bar (rank 0) with the mean loss,
learning rate and throughput of the last steps. train.py writes metrics.jsonl and checkpoints."""
import sys
import time

from tqdm import tqdm


class Progress:
    """Progress bar (rank 0) with the mean loss, lr and samples/s over the last log_every steps."""

    def __init__(self, total_steps, step, master, log_every):
        # redirected to a file: a line every 30 s, not every 0.1 s
        self.bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="train",
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)
        self.total_steps, self.master, self.log_every = total_steps, master, log_every
        self.losses, self.t_window, self.samples = [], time.time(), 0

    def update(self, step, loss, lr, samples):
        self.losses.append(loss)
        self.samples += samples
        if self.master and (step % self.log_every == 0 or step == self.total_steps):
            dt = time.time() - self.t_window
            self.bar.set_postfix(loss=f"{sum(self.losses) / len(self.losses):.4f}", lr=f"{lr:.2e}",
                                 samples_s=f"{self.samples / max(dt, 1e-9):.1f}")
            self.losses, self.t_window, self.samples = [], time.time(), 0
        self.bar.update(1)
