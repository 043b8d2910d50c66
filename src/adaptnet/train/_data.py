"""What ``fit`` and ``evaluate`` read batches from.

Two kinds of source:

- **Indexed**: ``(inputs, targets)`` tensors, a ``TensorDataset`` or a
  map-style ``Dataset``. adaptnet draws the order: epoch ``e`` is a
  permutation from a generator seeded with ``(seed, e)``, and under
  ``torchrun`` each global batch is split evenly across ranks.
- **Batches**: a ``DataLoader``, an ``IterableDataset`` (batched by a
  ``DataLoader`` of ``batch_size``), or any other iterable of batches. The
  source draws the order. Before each epoch a ``DistributedSampler`` (or any
  sampler with ``set_epoch``) gets the epoch; the random states the iterator
  is created from (torch's, the loader's and the sampler's generators) are
  recorded, so that a run resumed mid-epoch re-creates the same iterator and
  skips the batches already trained on.

A batch is ``(inputs, targets)`` or a mapping read through ``keys`` (e.g.
``("image", "label")``); inputs may be a tensor or a tuple/dict of tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
    default_collate,
)

from adaptnet._io import shown
from adaptnet.errors import ConfigError

__all__ = ["Batches", "Indexed", "Source", "source"]


def source(data: Any, what: str, *, keys: tuple[str, str] | None, batch_size: int,
           reads: int, caller: str) -> Source:
    """The source for ``data``; ``reads`` is how many times it will be read through."""
    if isinstance(data, TensorDataset):
        data = data.tensors
    if isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor)
                                                      for t in data):
        return Indexed(tuple(data), what, caller)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and \
            hasattr(data, "__len__"):  # a map-style Dataset need not define it (torch)
        return Indexed(data, what, caller)
    if isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping | torch.Tensor):
        return Batches(data, what, keys, reads, caller)
    raise ConfigError(f"{caller}: {what} must be (inputs, targets) tensors, a Dataset, a "
                      f"DataLoader, or an iterable of (inputs, targets) batches, got "
                      f"{type(data).__name__}.")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):  # the common case, without a pytree walk
        return value.to(device, non_blocking=True)
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor)
                    else t, value)


class Indexed:
    """Tensors or a map-style dataset, read by index in an order adaptnet draws."""

    def __init__(self, data: tuple[torch.Tensor, ...] | Dataset, what: str, caller: str) -> None:
        self.what = what
        if isinstance(data, tuple):
            lengths = {len(t) for t in data}
            if len(data) != 2 or len(lengths) != 1:
                raise ConfigError(f"{caller}: {what} must be (inputs, targets) with one row "
                                  f"per sample, got {len(data)} tensor(s) with "
                                  f"{sorted(lengths)} rows.")
            self.tensors, self.dataset, self.n = data, None, lengths.pop()
        else:
            self.tensors, self.dataset, self.n = None, data, len(data)
        if self.n == 0:
            raise ConfigError(f"{caller}: {what} is empty.")

    def length(self, per_step: int, drop_last: bool) -> int:
        full, rest = divmod(self.n, per_step)
        return full + (1 if rest and not (drop_last and full) else 0)

    def epoch(self, epoch: int, seed: int, per_step: int, drop_last: bool, start: int,
              world: int, rank: int, device: torch.device) -> Iterator[tuple[Any, Any]]:
        """The batches of ``epoch`` from batch ``start`` on (this rank's share of each)."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + epoch))
        batches = order.split(per_step)[:self.length(per_step, drop_last)]
        for idx in batches[start:]:
            yield self.batch(idx if world == 1 else idx.tensor_split(world)[rank], device)

    def in_order(self, batch_size: int, device: torch.device) -> Iterator[tuple[Any, Any]]:
        for idx in torch.arange(self.n).split(batch_size):
            yield self.batch(idx, device)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[Any, Any]:
        if self.tensors is not None:
            x, y = (t[idx] for t in self.tensors)
        else:
            x, y = default_collate([self.dataset[int(i)] for i in idx])
        return _to(x, device), _to(y, device)


def _generators(data: Any) -> list[torch.Generator]:
    """The generators an iterator over ``data`` draws its order from, besides torch's."""
    # torch's API, probed: a DataLoader has samplers (a user's iterable may not), a sampler
    # may hold a generator
    batch = getattr(data, "batch_sampler", None)
    holders = (data, getattr(data, "sampler", None), batch, getattr(batch, "sampler", None))
    found = (getattr(h, "generator", None) for h in holders)
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


class Batches:
    """A DataLoader or other iterable of batches, read in the order it yields them."""

    def __init__(self, data: Iterable, what: str, keys: tuple[str, str] | None, reads: int,
                 caller: str) -> None:
        self.data, self.what, self.keys, self.caller = data, what, keys, caller
        if isinstance(data, Iterator) and reads > 1:  # a generator: read once, then empty
            raise ConfigError(
                f"{caller}: {what} is a one-shot iterator ({type(data).__name__}), and it "
                f"would be read {reads} times (once per epoch). Pass something that starts "
                "again on each iter(): a DataLoader, a list of batches, or an object whose "
                "__iter__ is a generator function.")

    def length(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None

    def samplers(self) -> list[Any]:
        """The loader's sampler, batch sampler and the batch sampler's sampler, each once."""
        # torch's API, probed: a user's batch sampler may have no inner sampler
        batch = getattr(self.data, "batch_sampler", None)
        found = (getattr(self.data, "sampler", None), batch, getattr(batch, "sampler", None))
        return list({id(s): s for s in found if s is not None}.values())

    def distributed(self) -> bool:
        return any(isinstance(s, DistributedSampler) for s in self.samplers())

    def state(self) -> dict[str, Any]:
        """The random states the next iterator will be drawn from."""
        return {"torch": torch.get_rng_state(),
                "generators": [g.get_state() for g in _generators(self.data)]}

    def epoch(self, epoch: int, start: int, order: dict[str, Any] | None,
              device: torch.device) -> Iterator[tuple[Any, Any]]:
        """The batches of ``epoch`` from batch ``start`` on.

        ``order``: the random states recorded when this epoch's iterator was
        first created (a run resumed mid-epoch). The iterator is re-created
        from them and the first ``start`` batches are drawn again, unused (a
        sampler draws its seed on the first batch, and transforms may draw
        too); torch's state is then put back, so the run goes on from the
        checkpoint's, and the loader's generators stand where they stood.
        """
        for sampler in self.samplers():
            if hasattr(sampler, "set_epoch"):  # DistributedSampler's (torch's API)
                sampler.set_epoch(epoch)
        if order is None:
            batches = enumerate(self.data)
        else:
            now = torch.get_rng_state()
            self._set(order)
            batches = enumerate(self.data)
            for _ in range(start):
                next(batches, None)
            torch.set_rng_state(now)
        for b, batch in batches:
            yield self.split(batch, b, device)

    def in_order(self, batch_size: int, device: torch.device) -> Iterator[tuple[Any, Any]]:
        for b, batch in enumerate(self.data):
            yield self.split(batch, b, device)

    def _set(self, state: dict[str, Any]) -> None:
        gens = _generators(self.data)
        if len(gens) != len(state["generators"]):
            raise ConfigError(f"{self.caller}: cannot resume: {self.what} draws its order from "
                              f"{len(gens)} generator(s), the checkpoint recorded "
                              f"{len(state['generators'])}. Resume with the same DataLoader "
                              "set-up as the run that wrote the checkpoint.")
        torch.set_rng_state(state["torch"])
        for g, s in zip(gens, state["generators"], strict=True):
            g.set_state(s)

    def split(self, batch: Any, index: int, device: torch.device) -> tuple[Any, Any]:
        """``(inputs, targets)`` of one batch, on ``device``."""
        if type(batch) in (tuple, list) and len(batch) == 2 and \
                isinstance(batch[1], torch.Tensor) and batch[1].dim():  # the common case
            return _to(batch[0], device), batch[1].to(device, non_blocking=True)
        if isinstance(batch, Mapping):
            if self.keys is None:
                raise ConfigError(
                    f"{self.caller}: {self.what} batch {index} is a mapping with keys "
                    f"{', '.join(map(repr, list(batch)[:8]))}; name the inputs and targets "
                    "with batch_keys, e.g. batch_keys=('image', 'label').")
            missing = [k for k in self.keys if k not in batch]
            if missing:
                raise ConfigError(
                    f"{self.caller}: {self.what} batch {index} has no key "
                    f"{', '.join(map(repr, missing))} (batch_keys={self.keys!r}); it has "
                    f"{', '.join(map(repr, list(batch)[:8]))}.")
            x, y = batch[self.keys[0]], batch[self.keys[1]]
        elif isinstance(batch, tuple | list) and len(batch) == 2:
            x, y = batch
        else:
            got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(
                batch, tuple | list) else f"a {type(batch).__name__}"
            raise ConfigError(f"{self.caller}: {self.what} batch {index} is {got}; each batch "
                              "must be (inputs, targets) or a mapping read through "
                              "batch_keys.")
        if not isinstance(y, torch.Tensor) or y.dim() == 0:
            raise ConfigError(f"{self.caller}: {self.what} batch {index}: the targets must be "
                              f"a tensor with one row per sample, got {shown(y, 60)}.")
        return _to(x, device), _to(y, device)


Source = Indexed | Batches
