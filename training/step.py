"""One optimisation step and one evaluation pass: plain PyTorch, no Ray, so the same code runs in
a Ray Train worker, in a test and in a bare GPU timing script."""
from __future__ import annotations

import copy
import ctypes
import math
import time
from typing import Iterable

import torch
import torch.nn.functional as F

from models import autocast, choose_precision, detach_state, reset_state_rows
from training.windows import IGNORE, Window



def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 1 GB in the heap instead of handing them back to the
    kernel. By default every block over its mmap threshold is mapped and unmapped afresh, so a
    training step faults its activation buffers in anew each time (thousands of page faults a
    step): measured about a tenth of a small model's step on CPU. The memory stays reserved for
    the next step, which needs it again. True if applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def choose_training_precision(requested: str, model, window: Window, state, device) -> tuple[str, str]:
    """(precision to train in, why): models.choose_precision, whose `auto` probes forward +
    backward of this very batch."""
    timings = {}

    def probe_ms(precision: str) -> float:
        if not timings:
            timings.update(probe_precision(model, window, state, device))
        return timings[precision]

    return choose_precision(requested, device, probe_ms, "forward+backward of this batch")


def probe_precision(model, window: Window, state, device, repeats: int = 3) -> dict:
    """Milliseconds per forward + backward of `model` (a copy: the model, its gradients and the
    random generators are left as they were) on `window` in float32 and in bf16, the best of
    `repeats` after one warm-up each."""
    probe, timings = copy.deepcopy(model), {}
    with torch.random.fork_rng(devices=[]):
        for precision in ("fp32", "bf16"):
            best = math.inf
            for attempt in range(repeats + 1):
                started = time.perf_counter()
                loss, _ = window_loss(probe, window, state, device, precision)
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if attempt:
                    best = min(best, time.perf_counter() - started)
                probe.zero_grad(set_to_none=True)
            timings[precision] = round(best * 1000, 2)
    return timings


def to_tensors(window: Window, device: torch.device):
    return (torch.from_numpy(window.inputs).to(device, non_blocking=True),
            torch.from_numpy(window.targets).to(device, non_blocking=True),
            torch.from_numpy(window.reset).to(device))


def loss_sum(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of targets) over the real targets: cross-entropy in nats for token ids
    (logits out), squared error for values (predictions out)."""
    if targets.is_floating_point():
        real = ~torch.isnan(targets)
        error = torch.where(real, outputs.float() - targets, 0.0)
        return (error * error).sum(), real.sum()
    total = F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def window_loss(model, window: Window, state, device, precision: str = "fp32"):
    """Mean loss over the window's real targets, and the state after it."""
    inputs, targets, reset = to_tensors(window, device)
    state = reset_state_rows(detach_state(state), reset)
    with autocast(device, precision):
        outputs, state = model(inputs, state)
    total, count = loss_sum(outputs, targets)
    return total / count.clamp(min=1), state


def train_step(model, optimizer, scheduler, window: Window, state, clip: float, device, precision: str = "fp32"):
    """Forward, backward, clip the gradient norm, step. Returns (loss, grad_norm, state)."""
    model.train()
    loss, state = window_loss(model, window, state, device, precision)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    return loss.detach(), grad_norm.detach(), state


@torch.no_grad()
def evaluate(model, windows: Iterable[Window], device, state=None, precision: str = "fp32") -> tuple[float, int]:
    """(summed loss, number of targets) over `windows`, state carried across them."""
    model.eval()
    total, count = 0.0, 0
    for window in windows:
        inputs, targets, reset = to_tensors(window, device)
        state = model.init_state(len(window.inputs)) if state is None else reset_state_rows(state, reset)
        with autocast(device, precision):
            outputs, state = model(inputs, state)
        window_total, window_count = loss_sum(outputs, targets)
        total += window_total.item()
        count += int(window_count)
    return total, count


def make_optimizer(model, lr: float, schedule: str, total_steps: int):
    """Adam, and a learning-rate schedule: constant, or cosine decay to lr/10 over total_steps.
    Adam is PyTorch's fused kernel (CPU and CUDA): one pass over each parameter instead of a
    series of elementwise ops, which is a real share of a small network's step (BENCHMARKS.md,
    session 20)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    if schedule == "cosine":
        factor = lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    else:
        factor = lambda step: 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
