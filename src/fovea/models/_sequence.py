"""Recurrent models that read an image as a sequence of rows, many-to-one (the course's RNN chapter, seed 002).

Row t of the image, all three channels side by side, is the input x_t (d = 3 x S values); the hidden state after
the last row (and, bidirectional, after the first row read backwards) goes to a linear classifier. ``rnn`` is the
Elman cell (tanh), ``lstm`` and ``gru`` the gated ones. ``parameter_formulas`` writes the course's counts out
for ``fovea summary``: a cell with input size d and hidden size h has h(h + d) + h parameters per gate (the
input and recurrent weights and a bias), one gate for the RNN, 3 for the GRU, 4 for the LSTM, per direction and
layer; PyTorch keeps two bias vectors per gate (b_ih and b_hh, cuDNN's layout), one h more per gate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fovea.models._architectures import Headed, register_model

GATES = {"rnn": 1, "gru": 3, "lstm": 4}
_CELLS: dict[str, Any] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
DEFAULT_SIZE = 32  # 32 rows of 96 values: the mlp's input size, so the two read the same pixels


class RowRNN(Headed):
    """An RNN, GRU or LSTM over the image's rows; the last hidden state (both directions') -> dropout -> linear."""

    no_cam = ("a recurrent model reads the image row by row and keeps no spatial feature map, so Grad-CAM and CAM "
              "do not apply")

    def __init__(self, num_classes: int, image_size: int = DEFAULT_SIZE, cell: str = "lstm", hidden: int = 128,
                 layers: int = 1, bidirectional: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell must be one of {', '.join(GATES)}, not {cell!r}")
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden and layers must be at least 1, got {hidden} and {layers}")
        self.cell, self.hidden, self.layers, self.bidirectional = cell, int(hidden), int(layers), bool(bidirectional)
        self.input_size = 3 * image_size  # one row, RGB side by side
        self.rnn = _CELLS[cell](self.input_size, self.hidden, num_layers=self.layers, batch_first=True,
                                bidirectional=self.bidirectional)
        self.num_features = self.hidden * (2 if self.bidirectional else 1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, T = rows, d = 3 x width)
        _, state = self.rnn(seq)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n); (layers x dirs, B, H)
        dirs = 2 if self.bidirectional else 1
        return h_n[-dirs:].permute(1, 0, 2).reshape(b, -1)  # the last layer's final state(s): (B, dirs x H)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(self.drop(x))

    def parameter_formulas(self) -> list[str]:
        """The course's parameter count of every recurrent layer and the classifier, checked against PyTorch's."""
        g, h, dirs = GATES[self.cell], self.hidden, 2 if self.bidirectional else 1
        gates = {1: "", 3: "3 x ", 4: "4 x "}[g]
        lines, total = [], 0
        for layer in range(self.layers):
            d = self.input_size if layer == 0 else dirs * h
            course = g * (h * (h + d) + h)
            torch_n = course + g * h  # the second bias vector
            counted = sum(p.numel() for n, p in self.rnn.named_parameters() if n.endswith(f"_l{layer}")
                          or n.endswith(f"_l{layer}_reverse"))
            total += dirs * torch_n
            lines.append(f"{self.cell} layer {layer + 1}: {gates}(h(h + d) + h) = {gates}({h}x({h} + {d}) + {h}) = "
                         f"{course:,} per direction; + {g * h:,} for PyTorch's second bias (b_hh) = {torch_n:,}"
                         + (f"; x 2 directions = {2 * torch_n:,}" if dirs == 2 else "")
                         + f" (counted: {counted:,})")
        assert isinstance(self.head, nn.Linear)
        classes = self.head.out_features
        n_head = self.num_features * classes + classes
        lines.append(f"classifier: {self.num_features} x {classes} + {classes} = "
                     f"{n_head:,}; total {total + n_head:,}")
        return lines


def _factory(cell: str) -> Any:
    def build(num_classes: int, image_size: int = DEFAULT_SIZE, **kwargs: Any) -> nn.Module:
        return RowRNN(num_classes, image_size, cell=cell, **kwargs)

    build.__name__ = cell
    build.__doc__ = {
        "rnn": "recurrent (Elman, tanh) over the image's rows, many-to-one (--bidirectional, --arch hidden=128)",
        "gru": "GRU over the image's rows, many-to-one (--bidirectional, --arch hidden=128)",
        "lstm": "LSTM over the image's rows, many-to-one (--bidirectional, --arch hidden=128)",
    }[cell]
    build.default_size = DEFAULT_SIZE  # type: ignore[attr-defined]
    # Adam-style steps: plain SGD at the convnets' 0.1 diverged or stalled on recurrent cells in our runs
    build.config = {"optimizer": "adamw", "kind": "recurrent"}  # type: ignore[attr-defined]
    return build


for _cell in GATES:
    register_model(_factory(_cell))
