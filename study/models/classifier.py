"""SequenceClassifier: a DetachLSTM followed by a linear read-out on the steps a task reads."""

from __future__ import annotations

import torch
from torch import nn

from study.models.detach_lstm import DetachLSTM


class SequenceClassifier(nn.Module):
    """LSTM + linear head (paper Sec. 5): logits for the last `readout_steps` steps.

    The task, not the model, decides which steps are read (Task.readout_steps: all for copying,
    the last for MNIST); the model computes the head on those only.
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.lstm = DetachLSTM(input_size, hidden_size)
        self.head = nn.Linear(hidden_size, num_classes)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Every parameter uniform in (-1/sqrt(H), 1/sqrt(H)) from one generator (authors)."""
        self.lstm.reset_parameters(generator)
        bound = 1.0 / self.lstm.hidden_size**0.5
        with torch.no_grad():
            for parameter in self.head.parameters():
                parameter.uniform_(-bound, bound, generator=generator)

    def forward(
        self,
        x: torch.Tensor,
        detach_h: torch.Tensor | None = None,
        detach_c: torch.Tensor | None = None,
        readout_steps: int | None = None,
    ) -> torch.Tensor:
        """x (T, B, input) -> logits (readout_steps, B, classes); None reads every step."""
        output, (h_n, _) = self.lstm(x, detach_h=detach_h, detach_c=detach_c)
        if readout_steps == 1:
            # Only h_T reaches the loss: read h_n, so the backward gets no (T, B, H) gradient of
            # zeros to add at every step, and the head skips the other 783 steps of pixel MNIST.
            return self.head(h_n)
        if readout_steps is None or readout_steps >= output.shape[0]:
            return self.head(output)
        return self.head(output[-readout_steps:])
