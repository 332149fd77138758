"""Deterministic seeds: every random draw comes from (run seed, epoch, batch, stream).

A video batch is a pure function of (dataset, config, run seed, epoch, batch
index) - spec section 9.  We derive independent 63-bit seeds for each purpose
("plan", "params", "noise") with a cryptographic hash, so neighbouring triples
give unrelated streams and no global RNG state is ever touched.
"""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any sequence of ints/strings."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def make_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded from ``parts``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen
