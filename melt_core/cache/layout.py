"""Cache layouts: which slot the rows of (loop, layer) live in, decided here and nowhere else.

A slot holds one K and one V row per token (``cache.rows``). A layout maps each (loop, layer) of a
forward to a slot and says how many slots each loop adds, which sizes every cache and every byte
count (``OuroConfig.kv_slots_per_loop``):

- ``per_loop``: Ouro. One slot per (loop, layer), loops the outer dimension: memory grows linearly
  with the loop count.
- ``shared``: MELT. One slot per layer, written at loop 1 and overwritten by every later loop: a
  later token reads each earlier token's final row.
- ``first_then_shared``: two slots per layer: loop 1's rows are kept apart (a later token's loop 1
  attends over exactly what Ouro's loop 1 would), loops 2 and later share the second slot. Twice
  ``shared``'s memory, whatever the loop count (the serving engines' first-then-shared policy).

What a row holds (the k/v of the loop's input ``u`` for Ouro, of the latent state ``h`` that an
update rule moves from loop to loop for MELT) is the model's KV policy (``models.kv``), not the
layout's: "update rule" and "cache layout" are two names for two things.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class CacheLayout:
    """The slots of a model with ``num_layers`` layers."""

    num_layers: int
    name: ClassVar[str]
    # whether a later token reads each earlier token's row of its last loop at every loop (what
    # adaptive depth needs: a token that stops early leaves its final row where the others read)
    final_rows_only: ClassVar[bool] = False

    def slot(self, loop: int, layer: int) -> int:
        """The slot that layer ``layer`` (0-based) writes and attends over at loop ``loop`` (0-based)."""
        raise NotImplementedError

    def slots_per_loop(self, loops: int) -> list[int]:
        """The slots each of ``loops`` loops adds to a cache (a slot first used at that loop)."""
        raise NotImplementedError

    def num_slots(self, loops: int) -> int:
        return sum(self.slots_per_loop(loops))


class PerLoopLayout(CacheLayout):
    name = "per_loop"

    def slot(self, loop: int, layer: int) -> int:
        return loop * self.num_layers + layer

    def slots_per_loop(self, loops: int) -> list[int]:
        return [self.num_layers] * loops


class SharedLayout(CacheLayout):
    name = "shared"
    final_rows_only = True

    def slot(self, loop: int, layer: int) -> int:
        return layer

    def slots_per_loop(self, loops: int) -> list[int]:
        return [self.num_layers] + [0] * (loops - 1)


class FirstThenSharedLayout(CacheLayout):
    name = "first_then_shared"

    def slot(self, loop: int, layer: int) -> int:
        return layer if loop == 0 else self.num_layers + layer

    def slots_per_loop(self, loops: int) -> list[int]:
        return ([self.num_layers] + [self.num_layers] + [0] * (loops - 2))[:loops]


CACHE_LAYOUTS: dict[str, type[CacheLayout]] = {
    cls.name: cls for cls in (PerLoopLayout, SharedLayout, FirstThenSharedLayout)
}
MELT_LAYOUTS = ("shared", "first_then_shared")  # the layouts of a model whose rows an update rule makes


def cache_layout(name: str, num_layers: int) -> CacheLayout:
    """The layout called ``name`` (``CACHE_LAYOUTS``) for a model of ``num_layers`` layers."""
    if name not in CACHE_LAYOUTS:
        raise InvalidArgumentError(f"unknown cache layout {name!r}; use one of {', '.join(CACHE_LAYOUTS)}")
    return CACHE_LAYOUTS[name](num_layers)
