"""Cross-attention capture: per-token attention maps of every ``attn2`` layer of a UNet.

Used by the sampler for a coarse background mask (the canvas token "green" attends to the
background) and by training's green-control loss ``L_g`` (maps of "green" against ``1 - M``).

How it works. :class:`AttentionCapture` wraps each cross-attention layer's processor in a
:class:`CaptureProcessor`. The wrapper lets the original processor (SDPA by default, or whatever
LoRA/IP-adapter processor is installed) compute the layer's output untouched, so the UNet's output
is exactly what it is without capture. On the side it recomputes the layer's query (only for the
conditional half of a classifier-free-guidance batch) and keys with the layer's own modules, takes
the softmax attention probabilities in float32, and reduces them to *groups* of tokens with a
weight matrix (see :func:`token_weights`): a group is a word, or several words, each possibly
spanning several BPE tokens; a group's map is the mean over its tokens, averaged over heads.

Maps have shape (batch, groups, h, w) at the layer's resolution. In *accumulate* mode (sampling)
each layer keeps a running mean over all calls (all denoising steps), detached. In training mode
(``accumulate=False, keep_graph=True``) each call's maps are kept in a list, with their autograd
graph, for the caller to turn into a loss and then :meth:`AttentionCapture.reset`.

CFG: when a layer receives twice as many samples as the token weights have rows, the batch is
(unconditional, conditional) as diffusers pipelines build it, and only the second half is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CROSS_ATTENTION_SUFFIX = "attn2.processor"


# ------------------------------------------------------------------------------ tokens


def word_positions(tokenizer: Any, prompt: str, words: Sequence[str], max_length: int | None = None) -> list[int]:
    """Token positions (in the padded prompt, BOS at 0) of every occurrence of any of ``words``.

    A word is matched as a whole (tokenised on its own, then found as a subsequence of the prompt's
    tokens), so "green" does not match inside "greenish". Positions beyond the tokenizer's
    ``model_max_length`` (truncated away by the pipeline) are dropped.
    """
    limit = max_length or int(getattr(tokenizer, "model_max_length", 77))
    ids = tokenizer(prompt, truncation=True, max_length=limit).input_ids
    found: set[int] = set()
    for word in words:
        piece = tokenizer(word, add_special_tokens=False).input_ids
        if not piece:
            continue
        n = len(piece)
        for i in range(1, len(ids) - n + 1):
            if ids[i : i + n] == piece:
                found.update(range(i, i + n))
    return sorted(found)


def token_weights(
    tokenizer: Any,
    prompts: Sequence[str],
    groups: Sequence[Sequence[str | Sequence[str]]],
    max_length: int | None = None,
) -> torch.Tensor:
    """Weights (batch, groups, tokens) that average each group's tokens; float32.

    ``groups[b][g]`` is a word or a list of words for prompt ``b``; every prompt has the same
    number of groups. A group whose words are absent from its prompt has an all-zero row, so its
    map is zero (check with ``weights.sum(-1) > 0``).
    """
    if len(groups) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(groups)} group lists")
    length = max_length or int(getattr(tokenizer, "model_max_length", 77))
    n_groups = len(groups[0]) if groups else 0
    out = torch.zeros(len(prompts), n_groups, length)
    for b, (prompt, row) in enumerate(zip(prompts, groups)):
        if len(row) != n_groups:
            raise ValueError("every prompt needs the same number of token groups")
        for g, words in enumerate(row):
            pos = word_positions(tokenizer, prompt, [words] if isinstance(words, str) else list(words), length)
            if pos:
                out[b, g, pos] = 1.0 / len(pos)
    return out


# ------------------------------------------------------------------------------ capture


def _layer_hw(tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) of a layer with ``tokens`` pixels, given the latent size (UNets halve it, ceil)."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(8):
            if h * w == tokens:
                return h, w
            h, w = (h + 1) // 2, (w + 1) // 2
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise RuntimeError(f"cannot tell the shape of a {tokens}-pixel attention map; set latent_hw")
    return side, side


class CaptureProcessor:
    """Wraps a cross-attention processor: same output, plus maps recorded into ``capture``."""

    def __init__(self, inner: Any, name: str, capture: AttentionCapture) -> None:
        self.inner = inner
        self.name = name
        self.capture = capture

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        cap = self.capture
        if cap.enabled and cap.weights is not None and encoder_hidden_states is not None:
            grad = cap.keep_graph and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                maps = self._maps(attn, hidden_states, encoder_hidden_states, temb, cap.weights, cap.latent_hw)
            cap._record(self.name, maps if grad else maps.detach())
        return out

    @staticmethod
    def _maps(
        attn: Any,
        hidden: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor | None,
        weights: torch.Tensor,
        latent_hw: tuple[int, int] | None,
    ) -> torch.Tensor:
        batch = weights.shape[0]
        if hidden.shape[0] == 2 * batch:  # classifier-free guidance: (uncond, cond)
            hidden, context = hidden[batch:], context[batch:]
            temb = temb[batch:] if temb is not None else None
        elif hidden.shape[0] != batch:
            raise RuntimeError(f"attention batch {hidden.shape[0]} does not match {batch} token-weight rows")
        # The query and keys as the layer's own processor computes them.
        if attn.spatial_norm is not None:
            hidden = attn.spatial_norm(hidden, temb)
        if hidden.ndim == 4:
            hidden = hidden.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key = attn.to_q(hidden), attn.to_k(context)
        heads = attn.heads
        query = query.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        key = key.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, L, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scale = attn.scale if attn.scale is not None else query.shape[-1] ** -0.5
        probs = torch.softmax((query.float() @ key.float().transpose(-1, -2)) * scale, dim=-1)
        w = weights.to(probs.device, probs.dtype)
        if w.shape[-1] != probs.shape[-1]:
            raise RuntimeError(f"token weights have {w.shape[-1]} tokens, the prompt embedding {probs.shape[-1]}")
        maps = torch.einsum("bhnl,bgl->bgn", probs, w) / heads  # (B, G, N)
        h, w_ = _layer_hw(maps.shape[-1], latent_hw)
        return maps.unflatten(-1, (h, w_))


class AttentionCapture:
    """Installs :class:`CaptureProcessor` on every cross-attention layer of ``unet``.

    Typical sampling use (the sampler does this)::

        cap = AttentionCapture(unet).install()
        cap.begin(token_weights(tok, prompts, [["green"], ...]), latent_hw=(64, 64))
        pipe(...)                      # maps accumulate over every step
        bg = cap.average(size=(512, 512))[:, 0]
        cap.end()

    Training use: ``AttentionCapture(unet, accumulate=False, keep_graph=True)``; after each UNet
    forward, ``cap.calls()`` holds the maps of that forward with their graph; ``cap.reset()``.
    ``enabled`` False makes the wrappers pass through with no cost but a flag test.
    """

    def __init__(self, unet: nn.Module, accumulate: bool = True, keep_graph: bool = False) -> None:
        self.unet = unet
        self.accumulate = accumulate
        self.keep_graph = keep_graph
        self.enabled = False
        self.weights: torch.Tensor | None = None
        self.latent_hw: tuple[int, int] | None = None
        self._originals: dict[str, Any] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._calls: dict[str, list[torch.Tensor]] = {}

    # -------------------------------------------------------------- installation

    def install(self) -> AttentionCapture:
        if self._originals is None:
            procs = dict(self.unet.attn_processors)
            self._originals = procs
            wrapped = {
                name: CaptureProcessor(proc, name.removesuffix(".processor"), self)
                if name.endswith(CROSS_ATTENTION_SUFFIX)
                else proc
                for name, proc in procs.items()
            }
            if not any(isinstance(p, CaptureProcessor) for p in wrapped.values()):
                raise ValueError("the UNet has no cross-attention (attn2) layers to capture")
            self.unet.set_attn_processor(wrapped)
        return self

    def remove(self) -> None:
        if self._originals is not None:
            self.unet.set_attn_processor(self._originals)
            self._originals = None
        self.end()

    @property
    def layer_names(self) -> list[str]:
        return [n.removesuffix(".processor") for n in self.unet.attn_processors if n.endswith(CROSS_ATTENTION_SUFFIX)]

    # -------------------------------------------------------------- recording

    def begin(self, weights: torch.Tensor, latent_hw: tuple[int, int] | None = None) -> None:
        """Start recording maps for token ``weights`` (B, G, L); clears earlier maps."""
        if self._originals is None:
            raise RuntimeError("install() the capture first")
        self.reset()
        self.weights = weights
        self.latent_hw = latent_hw
        self.enabled = True

    def end(self) -> None:
        self.enabled = False
        self.weights = None

    @contextmanager
    def recording(self, weights: torch.Tensor, latent_hw: tuple[int, int] | None = None) -> Iterator[AttentionCapture]:
        self.begin(weights, latent_hw)
        try:
            yield self
        finally:
            self.enabled = False

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self._calls.clear()

    def _record(self, name: str, maps: torch.Tensor) -> None:
        if self.accumulate:
            if name in self._sums:
                self._sums[name] = self._sums[name] + maps
                self._counts[name] += 1
            else:
                self._sums[name] = maps
                self._counts[name] = 1
        else:
            self._calls.setdefault(name, []).append(maps)

    # -------------------------------------------------------------- reading

    def maps(self) -> dict[str, torch.Tensor]:
        """Per layer, (B, G, h, w): the mean over calls (accumulate) or the last call's maps."""
        if self.accumulate:
            return {k: v / self._counts[k] for k, v in self._sums.items()}
        return {k: v[-1] for k, v in self._calls.items()}

    def calls(self) -> dict[str, list[torch.Tensor]]:
        """Per layer, every call's maps in order (training mode)."""
        return self._calls

    def average(self, size: tuple[int, int]) -> torch.Tensor:
        """All layers' maps resized to ``size`` and averaged: (B, G, *size)."""
        return average_maps(self.maps(), size)


def average_maps(maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize every layer's (B, G, h, w) map to ``size`` (bilinear) and average over layers."""
    items = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not items:
        raise ValueError("no attention maps were recorded")
    total = None
    for m in items:
        r = m if tuple(m.shape[-2:]) == tuple(size) else F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
        total = r.float() if total is None else total + r.float()
    assert total is not None
    return total / len(items)


def background_mask(canvas_map: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """A coarse background mask in [0, 1] (1 = background) from averaged canvas-token maps.

    ``canvas_map`` is (B, H, W) or (B, 1, H, W). Each sample is min-max normalised: attention
    probabilities are relative (their scale depends on the prompt length and the other tokens),
    so only the spatial pattern is meaningful. A constant map gives all zeros.
    """
    m = canvas_map.float()
    flat = m.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (m.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (m.ndim - 1)))
    return ((m - lo) / (hi - lo).clamp_min(eps)).clamp(0.0, 1.0)
