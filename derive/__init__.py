"""derive: symbolic derivation, explanation, verification and code generation for backprop."""

from __future__ import annotations

__version__ = "0.1.0"
