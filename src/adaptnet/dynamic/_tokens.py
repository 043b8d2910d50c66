"""Per-token adaptive depth for decoders: a cache-capable causal block, Mixture-of-Depths
Mixture-of-Recursions and per-token early exit.

A token-level construct works on ``(B, T, d)`` hidden states with
``(B, T)`` positions. Attention is causal by *position*, not by index, so a
block may run on any subset of a sequence's tokens (gathered in causal
order, their positions with them: rotary embeddings rotate by the gathered
positions) and attend among exactly those.

Decoding keeps one :class:`KVCache` per block. Its slots are per row: a
token that skipped a block writes nothing there, so rows of one batch hold
different numbers of keys; each slot records its position and whether it
holds a key, and attention reads only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.errors import ConfigError, DynamicError

__all__ = ["CausalBlock", "KVCache", "MixtureOfDepths", "MixtureOfRecursions", "Routing",
           "TokenEarlyExit", "TokenExits", "rope"]


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of ``x`` ``(B, H, T, dh)`` at ``(B, T)``
    positions: pairs of channels ``(i, i + dh/2)`` rotated by ``position * base**(-2i/dh)``."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions[:, None, :, None].to(torch.float32) * freq  # (B, 1, T, half)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class KVCache:
    """Keys and values one block has seen, per row of the batch (see the module docstring).

    Attributes:
        keys, values: ``(B, S, H, dh)``; slot ``s`` of row ``b`` is used when
            ``s < length[b]`` and ``valid[b, s]``.
        positions: ``(B, S)`` the position of each slot's token.
        length: ``(B,)`` slots written per row.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.keys = self.values = None
        self.positions = torch.zeros(batch, 0, dtype=torch.long)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool)
        self.length = torch.zeros(batch, dtype=torch.long)

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Append ``T`` slots to each of ``rows``: ``k``, ``v`` ``(b, T, H, dh)``."""
        if self.keys is None:
            shape = (self.batch, 0, *k.shape[2:])
            self.keys, self.values = k.new_zeros(shape), v.new_zeros(shape)
            self.positions = self.positions.to(k.device)
            self.valid, self.length = self.valid.to(k.device), self.length.to(k.device)
        t = k.shape[1]
        slots = self.length[rows, None] + torch.arange(t, device=k.device)  # (b, T)
        need = int(slots.max()) + 1 if slots.numel() else 0
        if need > self.keys.shape[1]:  # grow by doubling: amortised O(1) per token
            grow = max(need, 2 * self.keys.shape[1]) - self.keys.shape[1]
            self.keys = F.pad(self.keys, (0, 0, 0, 0, 0, grow))
            self.values = F.pad(self.values, (0, 0, 0, 0, 0, grow))
            self.positions = F.pad(self.positions, (0, grow))
            self.valid = F.pad(self.valid, (0, grow))
        r = rows[:, None]
        self.keys[r, slots] = k
        self.values[r, slots] = v
        self.positions[r, slots] = positions
        self.valid[r, slots] = valid
        self.length[rows] += t

    def held(self) -> torch.Tensor:
        """``(B,)`` keys each row holds: rows differ when their tokens skipped differently."""
        used = torch.arange(self.valid.shape[1], device=self.length.device) < self.length[:, None]
        return (self.valid & used).sum(1)

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(keys, values, positions, valid)`` of ``rows``, up to their longest length."""
        n = int(self.length[rows].max())
        used = torch.arange(n, device=self.length.device) < self.length[rows, None]
        return (self.keys[rows, :n], self.values[rows, :n], self.positions[rows, :n],
                self.valid[rows, :n] & used)


class CausalBlock(nn.Module):
    """A pre-norm decoder block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))``.

    Multi-head self-attention with rotary positions, causal by position.

    Args:
        d_model: width; ``heads`` must divide it (into an even head width).
        heads: attention heads.
        hidden: the MLP's hidden width (default ``4 * d_model``).
    """

    def __init__(self, d_model: int, heads: int, hidden: int | None = None) -> None:
        super().__init__()
        if d_model % heads or (d_model // heads) % 2:
            raise ConfigError(f"CausalBlock: d_model={d_model} must split into {heads} heads "
                              "of an even width (rotary embeddings rotate channel pairs).")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden or 4 * d_model), nn.GELU(),
                                 nn.Linear(hidden or 4 * d_model, d_model))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, *,
                valid: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: torch.Tensor | None = None, kv: tuple[torch.Tensor, ...] | None = None
                ) -> torch.Tensor:
        """``x`` ``(B, T, d)`` at ``positions`` ``(B, T)`` (default ``0..T-1``).

        Each token attends to the tokens of its row at positions up to its own:
        by default those of ``x`` (where ``valid``, default all); with ``kv``
        ``(keys, values, positions, valid)`` (``(B, S, H, dh)`` twice, ``(B, S)``
        twice: another pass's keys, e.g. :meth:`keys` of the states of tokens
        that left earlier, or :meth:`KVCache.read`), those instead; with a
        ``cache``, those it holds for ``rows`` (default all rows), which this
        call first extends with the keys of ``x``.
        """
        b, t, d = x.shape
        positions = _positions(x, positions)
        ok = torch.ones(b, t, dtype=torch.bool, device=x.device) if valid is None else valid
        h = self.norm1(x)
        if kv is None:  # one fused projection
            q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).unbind(2)
            k = rope(k.transpose(1, 2), positions).transpose(1, 2)
            kpos, kvalid = positions, ok
        else:
            if cache is not None:
                raise DynamicError("CausalBlock: give kv= (keys to attend to) or cache= (keys "
                                   "to extend and attend to), not both.")
            q = self._project(h, 0)
            k, v, kpos, kvalid = kv
        q = rope(q.transpose(1, 2), positions)  # (B, H, T, dh)
        if cache is not None:
            rows = torch.arange(b, device=x.device) if rows is None else rows
            cache.write(rows, k, v, kpos, kvalid)
            k, v, kpos, kvalid = cache.read(rows)
        if cache is None and valid is None and kv is None:  # dense: plain causal
            att = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
        else:
            mask = kvalid[:, None, :] & (kpos[:, None, :] <= positions[:, :, None])
            mask = mask | ~ok[:, :, None]  # padding rows attend anywhere: finite, unused
            att = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask[:, None])
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))

    def keys(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The keys (rotated) and values ``(B, T, H, dh)`` of states ``x`` at ``positions``."""
        h = self.norm1(x)
        k = rope(self._project(h, 1).transpose(1, 2), positions).transpose(1, 2)
        return k, self._project(h, 2)

    def remember(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 rows: torch.Tensor, valid: torch.Tensor) -> None:
        """Write the keys of states ``x`` (tokens that skip this block) to ``cache``."""
        k, v = self.keys(x, positions)
        cache.write(rows, k, v, positions, valid)

    def _project(self, h: torch.Tensor, part: int) -> torch.Tensor:
        """Queries (0), keys (1) or values (2) of normalised states ``h``, ``(B, T, H, dh)``."""
        d = h.shape[-1]
        w, bias = self.qkv.weight[part * d:(part + 1) * d], self.qkv.bias[part * d:(part + 1) * d]
        return F.linear(h, w, bias).unflatten(-1, (self.heads, d // self.heads))


@dataclass
class Routing:
    """What a token-routing block did in its last forward pass.

    Attributes:
        depth: ``(B, T)`` how many times each token went through the block
            (Mixture-of-Depths: 0 or 1; Mixture-of-Recursions: 0 to ``max_recursions``).
        aux_loss: training, expert choice: the causal predictors' binary
            cross-entropy against top-k membership (their inputs detached, so
            they do not steer the routers); None otherwise.
    """

    depth: torch.Tensor
    aux_loss: torch.Tensor | None

    @property
    def selected(self) -> torch.Tensor:
        """``(B, T)`` bool: the tokens processed at least once."""
        return self.depth > 0


def _check_capacity(owner: str, capacity: object) -> float:
    if isinstance(capacity, bool) or not isinstance(capacity, int | float) or \
            not 0.0 < capacity <= 1.0:
        raise ConfigError(f"{owner}: capacity is the fraction of tokens a block processes, in "
                          f"(0, 1]; got {capacity!r}.")
    return float(capacity)


def _predictor(d_model: int) -> nn.Module:
    """A token's own guess whether top-k would pick it (a logit), for causal decoding: a
    small MLP (hidden width ``d_model // 4``)."""
    hidden = max(d_model // 4, 1)
    return nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))


def _top_k(scores: torch.Tensor, k: int | torch.Tensor, active: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's ``k`` highest scores among ``active``, in causal order: ``(B, max k)``
    indices and, for ``k`` per row (``(B,)``), which are real (they come first); else None."""
    if active is not None:
        scores = scores.masked_fill(~active, float("-inf"))
    if isinstance(k, int):
        return scores.topk(k, dim=1).indices.sort(dim=1).values, None
    t = scores.shape[1]
    top = scores.topk(int(k.max()), dim=1).indices
    real = torch.arange(top.shape[1], device=top.device) < k[:, None]
    key = torch.where(real, top, top + t).sort(dim=1).values  # the real ones first, in order
    return key % t, key < t


def _quota(fraction: float, t: int, valid: torch.Tensor | None) -> int | torch.Tensor:
    """``ceil(fraction * n)`` of each row's ``n`` real tokens (``t`` each without ``valid``)."""
    if valid is None:
        return math.ceil(fraction * t)
    return torch.ceil(valid.sum(1).double() * fraction).long()


def _bce(guess: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Binary cross-entropy of the logits ``guess`` at the real tokens (mean)."""
    if valid is None:
        return F.binary_cross_entropy_with_logits(guess, target.to(guess.dtype))
    w = valid.to(guess.dtype)
    loss = F.binary_cross_entropy_with_logits(guess, target.to(guess.dtype), weight=w,
                                              reduction="sum")
    return loss / w.sum().clamp(min=1)


def _positions(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    b, t = x.shape[:2]
    return torch.arange(t, device=x.device).expand(b, t) if positions is None else positions


def _pack(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The rows with a selected token, each row's selected indices first (causal order) padded
    to the longest, and which are real: ``(rows, idx (b, n), valid (b, n))``; None if none."""
    counts = selected.sum(1)
    rows = counts.nonzero().squeeze(1)
    if not len(rows):
        return None
    n = int(counts.max())
    idx = torch.sort((~selected[rows]).to(torch.int8), dim=1, stable=True).indices[:, :n]
    return rows, idx, torch.arange(n, device=selected.device) < counts[rows, None]


def _update(x: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
            rows: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None, run) -> torch.Tensor:
    """``x`` with the tokens ``idx`` of ``rows`` moved by ``weight`` times ``run``'s update.

    ``run(picked, positions, valid, rows)`` maps the gathered ``(b, n, d)`` tokens
    to their new states; ``weight`` is ``(B, T)``.
    """
    r = rows[:, None]
    picked = x[r, idx]
    done = run(picked, positions[r, idx], valid, rows)
    new = picked + weight[r, idx][..., None] * (done - picked)
    if valid is not None:
        new = torch.where(valid[..., None], new, picked)
    out = x.clone()
    out[r, idx] = new.to(x.dtype)
    return out


def _call(block: nn.Module, picked: torch.Tensor, positions: torch.Tensor,
          valid: torch.Tensor | None, rows: torch.Tensor, cache: KVCache | None
          ) -> torch.Tensor:
    kwargs: dict = {} if valid is None else {"valid": valid}
    if cache is not None:
        kwargs |= {"cache": cache, "rows": rows}
    return block(picked, positions, **kwargs)


class MixtureOfDepths(nn.Module):
    """Mixture-of-Depths (Raposo et al. 2024): a block processes a fraction of the tokens.

    Training: a linear router scores each token; per sequence the top
    ``ceil(capacity * T)`` tokens (expert choice) go through ``block``, in causal
    order with their positions, attending among themselves only; the rest
    pass by the residual. A processed token's update is scaled by its router
    weight ``sigmoid(score)``: ``x + sigmoid(s) * (block(x) - x)``, which puts
    the router on the gradient path.

    Top-k over a sequence needs its future tokens, so evaluation and decoding
    use the paper's second method instead: a small predictor, trained beside
    the router on whether each token is in the top-k, decides per token
    (``logit > 0``) from that token alone. :attr:`last` holds what the last
    forward pass did and the predictor's loss.

    Args:
        block: a :class:`CausalBlock` (or a module with its ``forward``).
        capacity: the fraction of each sequence's tokens processed, in (0, 1].
        d_model: width of the router's input.
    """

    def __init__(self, block: nn.Module, capacity: float, d_model: int) -> None:
        super().__init__()
        self.block, self.capacity = block, _check_capacity("MixtureOfDepths", capacity)
        self.router = nn.Linear(d_model, 1)
        self.predictor = _predictor(d_model)
        self.last: Routing | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, *,
                valid: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> torch.Tensor:
        """``x`` ``(B, T, d)``; ``valid`` ``(B, T)`` marks the real tokens (padding is never
        processed, attended to or counted in the capacity)."""
        b, t, _ = x.shape
        positions = _positions(x, positions)
        weight = torch.sigmoid(self.router(x).squeeze(-1))  # (B, T)
        if self.training:
            if cache is not None:
                raise DynamicError("MixtureOfDepths: a KV cache is for decoding; call "
                                   "model.eval() first (training routes by top-k over the "
                                   "whole sequence).")
            idx, real = _top_k(weight, _quota(self.capacity, t, valid), valid)
            out = _update(x, positions, weight, torch.arange(b, device=x.device), idx, real,
                          lambda p, pos, v, rows: _call(self.block, p, pos, v, rows, None))
            selected = torch.zeros_like(weight, dtype=torch.bool).scatter_(
                1, idx, True if real is None else real)
            aux = _bce(self.predictor(x.detach()).squeeze(-1), selected, valid)
            self.last = Routing(selected.long(), aux)
            return out
        selected = self.predictor(x).squeeze(-1) > 0  # (B, T): each token on its own
        if valid is not None:
            selected = selected & valid
        self.last = Routing(selected.long(), None)
        packed = _pack(selected)
        if packed is None:
            return x
        return _update(x, positions, weight, *packed,
                       lambda p, pos, v, rows: _call(self.block, p, pos, v, rows, cache))


class MixtureOfRecursions(nn.Module):
    """Mixture-of-Recursions (Bae et al. 2025): one shared stack, applied per token up to
    ``max_recursions`` times.

    The stack's blocks are the same modules at every recursion: their weights
    are tied by reuse. Each recursion step runs ``len(blocks)`` layers on the
    tokens still going, gathered with their positions, attending among the
    tokens at that step; the others keep their state. A token's update is
    scaled by its router weight, as in :class:`MixtureOfDepths`.

    Which block each layer is follows :func:`adaptnet.share`'s strategies over
    the ``R * len(blocks)`` layers (step ``r`` runs layers ``r*L .. r*L+L-1``):
    ``share="cycle"`` (blocks 0 1 0 1 for two blocks, two steps: the paper's
    recursion) or ``"sequence"`` (0 0 1 1: step 0 runs block 0 twice).

    Routers:
        ``"expert"``: at step ``r`` (0-based) a router per step keeps the top
            ``ceil(T * (R - r) / R)`` of the tokens still going (hierarchical:
            all at step 0, fewer each step). Evaluation and decoding use one
            causal predictor per later step (trained beside the routers, as
            MoD's), on the token alone; step 0 takes every token.
        ``"token"``: one router assigns each token its depth up front (the
            argmax of ``R`` logits on its input state; weight: that depth's
            softmax probability). Causal as it stands.

    KV (``kv``): ``"cache"``, recursion-wise caching: each (step, layer) has
    its own :class:`KVCache` (:meth:`new_cache`), holding the keys of the
    tokens that ran that step; attention at a step is among its tokens.
    ``"share"``, recursive KV sharing: every token runs step 0, and at later
    steps a layer's queries attend to the keys and values that layer made at
    step 0, of every earlier token (one cache per layer).

    Args:
        blocks: the shared stack (:class:`CausalBlock` or compatible).
        max_recursions: ``R``, the most times a token goes through the stack.
        d_model: width of the routers' input.
        router: ``"expert"`` or ``"token"``.
        share: ``"cycle"`` or ``"sequence"``.
        kv: ``"cache"`` or ``"share"``.
    """

    def __init__(self, blocks: nn.Module | list[nn.Module], max_recursions: int, d_model: int,
                 router: str = "expert", *, share: str = "cycle", kv: str = "cache") -> None:
        super().__init__()
        if isinstance(max_recursions, bool) or not isinstance(max_recursions, int) or \
                max_recursions < 1:
            raise ConfigError(f"MixtureOfRecursions: max_recursions must be a whole number "
                              f">= 1, got {max_recursions!r}.")
        for name, value, allowed in (("router", router, ("expert", "token")),
                                     ("share", share, ("cycle", "sequence")),
                                     ("kv", kv, ("cache", "share"))):
            if value not in allowed:
                raise ConfigError(f"MixtureOfRecursions: {name} must be "
                                  f"{' or '.join(map(repr, allowed))}, got {value!r}.")
        self.blocks = nn.ModuleList(blocks if isinstance(blocks, list | tuple | nn.ModuleList)
                                    else [blocks])
        self.recursions, self.router_kind, self.kv = max_recursions, router, kv
        n, total = len(self.blocks), max_recursions * len(self.blocks)
        order = [i % n if share == "cycle" else i // max_recursions for i in range(total)]
        self.schedule = [order[r * n:(r + 1) * n] for r in range(max_recursions)]
        if router == "expert":
            self.routers = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(max_recursions))
            self.predictors = nn.ModuleList(_predictor(d_model)  # none for step 0: all go
                                            for _ in range(max_recursions - 1))
        else:
            self.depth_router = nn.Linear(d_model, max_recursions)
        self.last: Routing | None = None

    def new_cache(self, batch: int) -> list[KVCache]:
        """One cache per (recursion step, layer of the stack); with ``kv="share"`` per layer."""
        steps = 1 if self.kv == "share" else self.recursions
        return [KVCache(batch) for _ in range(steps * len(self.blocks))]

    def _stack(self, step: int, cache: list[KVCache] | None, first: list[KVCache] | None):
        """Step ``step``'s layers as ``_update``'s ``run``; ``first``: the step-0 keys."""
        def run(picked, positions, valid, rows):
            for j, b in enumerate(self.schedule[step]):
                block = self.blocks[b]
                if first is not None and step:  # recursive sharing: attend to step 0's keys
                    picked = block(picked, positions, valid=valid, kv=first[j].read(rows))
                else:
                    layer = first[j] if first is not None else \
                        cache[step * len(self.blocks) + j] if cache is not None else None
                    picked = _call(block, picked, positions, valid, rows, layer)
            return picked
        return run

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, *,
                valid: torch.Tensor | None = None, cache: list[KVCache] | None = None
                ) -> torch.Tensor:
        """``x`` ``(B, T, d)``; ``valid`` ``(B, T)`` marks the real tokens (padding is never
        processed, attended to or counted in a step's top-k)."""
        b, t, _ = x.shape
        positions = _positions(x, positions)
        if cache is not None and self.training:
            raise DynamicError("MixtureOfRecursions: a KV cache is for decoding; call "
                               "model.eval() first.")
        first = None
        if self.kv == "share":  # step 0's keys: the decoding cache, or kept for this pass
            first = cache if cache is not None else [KVCache(b) for _ in self.blocks]
        depth = torch.zeros(b, t, dtype=torch.long, device=x.device)
        going = torch.ones(b, t, dtype=torch.bool, device=x.device) if valid is None else valid
        aux = None
        if self.router_kind == "token":  # every depth chosen up front, from the input state
            weight, chosen = torch.softmax(self.depth_router(x), dim=-1).max(-1)
        for r in range(self.recursions):
            if self.router_kind == "token":
                going = chosen >= r  # depth chosen + 1 steps
                if valid is not None:
                    going = going & valid
            else:
                weight = torch.sigmoid(self.routers[r](x).squeeze(-1))
                if self.training:  # top-k of the tokens still going, hierarchically
                    k = _quota((self.recursions - r) / self.recursions, t, valid)
                    idx, real = _top_k(weight, k, going)
                    going = torch.zeros_like(going).scatter_(1, idx, True if real is None
                                                             else real)
                    if r:
                        loss = _bce(self.predictors[r - 1](x.detach()).squeeze(-1), going, valid)
                        aux = loss if aux is None else aux + loss
                    x = _update(x, positions, weight, torch.arange(b, device=x.device), idx,
                                real, self._stack(r, None, first))
                    depth += going
                    continue
                if r:  # step 0 takes every token, as in training
                    going = going & (self.predictors[r - 1](x).squeeze(-1) > 0)
            packed = _pack(going)
            if packed is None:
                break
            x = _update(x, positions, weight, *packed, self._stack(r, cache, first))
            depth += going
        self.last = Routing(depth, aux)
        return x


@dataclass(frozen=True)
class TokenExits:
    """What :class:`TokenEarlyExit` returns.

    Attributes:
        logits: ``(B, T, V)`` each token's prediction, from the exit it took
            (training: from the last block).
        exit_logits: training only: every exit's logits, first block to last.
        depth: ``(B, T)`` blocks each token went through.
        aux_loss: training with ``rule="learned"``: the exit classifiers' loss.
    """

    logits: torch.Tensor
    exit_logits: tuple[torch.Tensor, ...]
    depth: torch.Tensor
    aux_loss: torch.Tensor | None = None


class TokenEarlyExit(nn.Module):
    """Per-token early exit over causal blocks (CALM: Schuster et al. 2022).

    After each block but the last, ``head`` (e.g. the final norm and the output
    layer tied to the embedding: every exit shares it) reads each token still
    going; a token leaves when its confidence reaches ``threshold``. Training
    runs every block on every token and returns every exit's logits (for a
    joint loss).

    Confidence (``rule``): ``"confidence"``, the exit's top softmax
    probability; ``"learned"``, a linear classifier per exit on the token's
    state (CALM's early-exit classifier), trained beside the model (on
    detached states, :attr:`TokenExits.aux_loss`) to predict whether the exit's
    top token is the last block's.

    Keys for the blocks a token skips come by state propagation: its hidden
    state when it left stands for it in every later block, whose key and value
    projections (only) are applied to it, so later tokens attend to every
    earlier token at every block. Decoding with a KV cache writes those keys
    when the token leaves (:meth:`CausalBlock.remember`); recomputing the
    whole sequence gives the same keys.

    Args:
        blocks: the :class:`CausalBlock` stack.
        head: maps states ``(..., d)`` to logits ``(..., V)``; not a submodule
            here (it belongs to the model that passes it).
        threshold: the confidence to leave at, in (0, 1].
        rule: ``"confidence"`` or ``"learned"``.
        d_model: the states' width; needed by ``rule="learned"``.
    """

    def __init__(self, blocks: list[nn.Module], head, threshold: float,
                 rule: str = "confidence", d_model: int | None = None) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or \
                not 0.0 < threshold <= 1.0:
            raise ConfigError(f"TokenEarlyExit: threshold is the confidence to leave at, in "
                              f"(0, 1]; got {threshold!r}.")
        if rule not in ("confidence", "learned"):
            raise ConfigError(f"TokenEarlyExit: rule must be 'confidence' (top softmax "
                              f"probability) or 'learned' (a classifier per exit), got {rule!r}.")
        if rule == "learned" and not isinstance(d_model, int):
            raise ConfigError("TokenEarlyExit: rule='learned' needs d_model (the width of the "
                              f"states its classifiers read), got d_model={d_model!r}.")
        self.blocks, self.threshold, self.rule = nn.ModuleList(blocks), float(threshold), rule
        if rule == "learned":
            self.classifiers = nn.ModuleList(nn.Linear(d_model, 1)
                                             for _ in range(len(blocks) - 1))
        self._head = head

    def new_cache(self, batch: int) -> list[KVCache]:
        return [KVCache(batch) for _ in self.blocks]

    def confidence(self, i: int, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Exit ``i``'s confidence in its prediction ``logits`` of states ``h``, in [0, 1]."""
        if self.rule == "learned":
            return torch.sigmoid(self.classifiers[i](h).squeeze(-1))
        return torch.softmax(logits.float(), -1).amax(-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, *,
                valid: torch.Tensor | None = None, cache: list[KVCache] | None = None
                ) -> TokenExits:
        """``x`` ``(B, T, d)``; ``valid`` ``(B, T)`` marks the real tokens (padding is never
        processed or attended to; its logits are zero and its depth 0)."""
        b, t, _ = x.shape
        positions = _positions(x, positions)
        last = len(self.blocks) - 1
        if self.training:
            if cache is not None:
                raise DynamicError("TokenEarlyExit: a KV cache is for decoding; call "
                                   "model.eval() first.")
            exits, states = [], []
            for block in self.blocks:
                x = block(x, positions, valid=valid)
                states.append(x)
                exits.append(self._head(x))
            depth = torch.full((b, t), len(self.blocks), dtype=torch.long, device=x.device)
            if valid is not None:
                depth = depth * valid
            aux = None
            if self.rule == "learned":  # does exit i already say what the last block says?
                final = exits[-1].detach().argmax(-1)
                aux = sum(_bce(c(h.detach()).squeeze(-1), z.detach().argmax(-1) == final, valid)
                          for c, h, z in zip(self.classifiers, states, exits, strict=False))
            return TokenExits(exits[-1], tuple(exits), depth, aux)
        real = torch.ones(b, t, dtype=torch.bool, device=x.device) if valid is None else valid
        active = real
        depth = torch.zeros(b, t, dtype=torch.long, device=x.device)
        logits = None
        for i, block in enumerate(self.blocks):
            if cache is not None and (gone := _pack(real & ~active)) is not None:
                rows, idx, valid = gone  # their states stand in for them from now on
                block.remember(x[rows[:, None], idx], positions[rows[:, None], idx], cache[i],
                               rows, valid)
            packed = _pack(active)
            if packed is None:
                break
            rows, idx, valid = packed
            r = rows[:, None]
            picked = x[r, idx]
            if cache is not None:
                done = block(picked, positions[r, idx], valid=valid, cache=cache[i], rows=rows)
            else:
                kv = (*block.keys(x[rows], positions[rows]), positions[rows], real[rows])
                done = block(picked, positions[r, idx], valid=valid, kv=kv)
            x = x.clone()
            x[r, idx] = torch.where(valid[..., None], done, picked)
            depth += active
            out = self._head(done)  # (b, n, V)
            if logits is None:
                logits = out.new_zeros(b, t, out.shape[-1])
            leave = valid if i == last else \
                valid & (self.confidence(i, done, out) >= self.threshold)
            taken = torch.where(leave[..., None], out, logits[r, idx])
            logits[r, idx] = taken
            left = torch.zeros_like(active)
            left[r, idx] = leave
            active = active & ~left
        if logits is None:  # no real token at all
            empty = self._head(x[:, :0])
            logits = empty.new_zeros(b, t, empty.shape[-1])
        return TokenExits(logits, (), depth)
