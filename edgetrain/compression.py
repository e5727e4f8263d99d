"""Compressed updates: send (trained - global) in a narrow dtype, and carry what was lost into the next round.

Error feedback (Seide et al., "1-bit SGD", 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", 2019): the
part of the update that compression dropped is kept and added to the next update, so nothing is lost for good.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from edgetrain import serde


class ErrorFeedback:
    """One agent's residuals, by tensor name, and the run's own upload dtype (`wire_dtype`).

    A round may ask for another dtype (the coordinator's `--update-dtype auto`, RoundHeader.update_dtype): `delta`
    takes it per call. Going back to float32 sends the residual with that delta, exactly, and clears it.
    """

    def __init__(self, wire_dtype: str) -> None:
        serde.roundtrip(torch.zeros(1), wire_dtype)  # validates the name
        self.wire_dtype = wire_dtype
        self.residual: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """The run's own dtype compresses: every update travels as a delta."""
        return self.wire_dtype != "float32"

    @property
    def pending(self) -> bool:
        """Residuals left from compressed rounds: the next update should be a delta that carries them."""
        return bool(self.residual)

    def wire_for(self, asked: str) -> str:
        """The upload dtype for a round that asked for `asked`: that one, or the run's ("" or unknown to us)."""
        return asked if asked in serde.UPDATE_DTYPES else self.wire_dtype

    def delta(self, trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
              wire_dtype: str | None = None) -> dict[str, torch.Tensor]:
        """The update to send: trained - base + residual for floating tensors (the rest as they are)."""
        wire = wire_dtype or self.wire_dtype
        out: dict[str, torch.Tensor] = {}
        for name, t in trained.items():
            if not t.is_floating_point():
                out[name] = t
                continue
            d = t - base[name]
            if name in self.residual:
                d = d + self.residual[name]
            if wire == "float32":  # sent exactly: nothing left over
                self.residual.pop(name, None)
            else:
                self.residual[name] = d - serde.roundtrip(d, wire)
            out[name] = d
        return out


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained weights from a received delta: base + delta for floating tensors."""
    return {k: (base[k] + v if v.is_floating_point() else v) for k, v in delta.items()}
