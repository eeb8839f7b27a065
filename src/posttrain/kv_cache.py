"""The engine's KV cache: transformers' cache API over buffers with spare room, whose rows can be dropped and joined.

`RowCache` is a transformers `Cache` whose layers keep keys and values of shape [rows, kv heads, width, head dim]
in a buffer with spare columns: a decoding step writes one column in place instead of `torch.cat`-ing the whole
cache into a new tensor (measured at 6-22% of the engine's time on CPU). When the buffer is full it is
reallocated with half as much room again, so copies are amortised.

Rows are right-aligned (left padding, as in the engine's batches): column j of every row is the same step, the
attention mask hides each row's padding. The engine changes the set of rows between steps:

* `select(indices)` keeps some rows (finished ones are dropped) and `trim(columns)` forgets leading columns that
  are padding in every remaining row;
* `join(other, width)` appends the rows of another cache (newly prefilled prompts), both sides left padded with
  zeros to the wider one's width (zeros, not garbage: a masked column still enters attention as 0 x value).

Every layer is kept whole, sliding-window layers included: the model's own mask applies the window, which is
correct for any layer layout that transformers masks (full and sliding attention). Models with other kinds of
layers (linear attention, recurrent states) cannot drop or join rows: `supports_rows(config)` says so and the
engine then decodes fixed batches with transformers' DynamicCache.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

GROWTH_MIN = 64  # columns of spare room added at least when a buffer fills


class RowLayer(DynamicLayer):
    """One layer's keys and values: views [:, :, start:end] of buffers with spare columns after `end`."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None
        self.start = self.end = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        if self.key_buffer is None or self.end + added > self.key_buffer.shape[-2]:
            self._reallocate(key_states, value_states, self.end - self.start + added)
        self.key_buffer[:, :, self.end:self.end + added] = key_states
        self.value_buffer[:, :, self.end:self.end + added] = value_states
        self.end += added
        self._view()
        return self.keys, self.values

    def _reallocate(self, key_states, value_states, needed: int) -> None:
        """Move the live columns to the front of new buffers with room for `needed` columns and more."""
        width = needed + max(GROWTH_MIN, needed // 2)
        keys = key_states.new_empty(*key_states.shape[:2], width, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:2], width, value_states.shape[-1])
        live = self.end - self.start
        if live:
            keys[:, :, :live] = self.keys
            values[:, :, :live] = self.values
        self.key_buffer, self.value_buffer, self.start, self.end = keys, values, 0, live

    def _view(self) -> None:
        self.keys = self.key_buffer[:, :, self.start:self.end]
        self.values = self.value_buffer[:, :, self.start:self.end]

    def get_seq_length(self) -> int:
        return self.end - self.start if self.is_initialized and self.key_buffer is not None else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length():
            self._replace(self.keys.index_select(0, indices), self.values.index_select(0, indices))

    def trim(self, columns: int) -> None:
        if columns and self.get_seq_length():
            self.start += columns
            self._view()

    def join(self, other: "RowLayer", width: int) -> None:
        """Append other's rows; both sides left padded with zeros to `width` columns."""
        mine, theirs = self.get_seq_length(), other.get_seq_length()
        keys = _stack_right_aligned(self.keys, other.keys, mine, theirs, width)
        values = _stack_right_aligned(self.values, other.values, mine, theirs, width)
        self._replace(keys, values)

    def _replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.key_buffer = self.value_buffer = None
        self.start = self.end = 0
        self.keys, self.values = keys, values  # _reallocate copies these into buffers with spare room
        self.end = keys.shape[-2]
        self._reallocate(keys, values, keys.shape[-2])
        self._view()


def _stack_right_aligned(a: torch.Tensor, b: torch.Tensor, width_a: int, width_b: int, width: int) -> torch.Tensor:
    out = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], width, a.shape[-1])
    out[:a.shape[0], :, width - width_a:] = a
    out[a.shape[0]:, :, width - width_b:] = b
    return out


class RowCache(Cache):
    """A transformers Cache of RowLayers (see the module docstring)."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=RowLayer)

    def width(self) -> int:
        return self.layers[0].get_seq_length() if self.layers else 0

    def select(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def trim(self, columns: int) -> None:
        for layer in self.layers:
            layer.trim(columns)

    def join(self, other: "RowCache", width: int) -> None:
        if len(self.layers) != len(other.layers):
            raise RuntimeError("cannot join caches of different depths")
        for mine, theirs in zip(self.layers, other.layers):
            mine.join(theirs, width)


def supports_rows(config) -> bool:
    """True when every layer is (full or sliding-window) attention: what RowCache can hold."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"]
    return all(kind in ("full_attention", "sliding_attention") for kind in layer_types)
