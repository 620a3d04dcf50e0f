"""One optimisation step and one evaluation pass: plain PyTorch, no Ray, so the same code runs in
a Ray Train worker, in a test and in a bare GPU timing script."""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.nn.functional as F

from models import detach_state, reset_state_rows
from training.windows import IGNORE, Window


def autocast_for(device: torch.device):
    """bf16 autocast on GPU; float32 on CPU, where bf16 LSTMs are slower and less exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def window_loss(model, window: Window, state, device):
    """Mean loss over the window's real targets, and the state after it."""
    inputs, targets, reset = to_tensors(window, device)
    state = reset_state_rows(detach_state(state), reset)
    with autocast_for(device):
        outputs, state = model(inputs, state)
    total, count = loss_sum(outputs, targets)
    return total / count.clamp(min=1), state


def train_step(model, optimizer, scheduler, window: Window, state, clip: float, device):
    """Forward, backward, clip the gradient norm, step. Returns (loss, grad_norm, state)."""
    model.train()
    loss, state = window_loss(model, window, state, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    return loss.detach(), grad_norm.detach(), state


@torch.no_grad()
def evaluate(model, windows: Iterable[Window], device, state=None) -> tuple[float, int]:
    """(summed loss, number of targets) over `windows`, state carried across them."""
    model.eval()
    total, count = 0.0, 0
    for window in windows:
        inputs, targets, reset = to_tensors(window, device)
        state = model.init_state(len(window.inputs)) if state is None else reset_state_rows(state, reset)
        with autocast_for(device):
            outputs, state = model(inputs, state)
        window_total, window_count = loss_sum(outputs, targets)
        total += window_total.item()
        count += int(window_count)
    return total, count


def make_optimizer(model, lr: float, schedule: str, total_steps: int):
    """Adam, and a learning-rate schedule: constant, or cosine decay to lr/10 over total_steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if schedule == "cosine":
        factor = lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    else:
        factor = lambda step: 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
