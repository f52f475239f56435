"""Decoding options and the batched beam search, with the reference's exact semantics.

The reference (`conette.nn.decoding.beam.generate`) runs, per item and per step:
  * the first step expands hypothesis 0 only (all hypotheses start from the same task token);
  * EOS is banned while fewer than `min_pred_size` tokens were generated;
  * tokens of the repetition mask already present in a hypothesis (task token included) are banned;
  * top-k over (active hypotheses x vocabulary) of summed log-probs, k = number of still-active hypotheses,
    so the beam shrinks as hypotheses finish; the p-th best continues in the p-th active slot;
  * a hypothesis finishes on EOS, or is closed at `max_pred_size` tokens without EOS;
  * its score is the summed log-prob divided by its number of generated tokens (EOS included);
  * the best caption is the slot with the highest score.
Here every item of a batch advances in the same tensor operations: rows are the active hypotheses of all
items (item-major, slot order), and per-item top-k runs on a padded (items, max_beam * vocab) view.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from .errors import OptionError
from .model import KVCache, TextDecoder

FORBID_REP_MODES = ("none", "content_words", "all")
MAX_BEAM_SIZE = 16
MAX_PRED_SIZE_LIMIT = 100
# Longest text a numeric option may be: bounds int()/float() work and refuses digit strings Python cannot convert.
MAX_NUMBER_TEXT = 32
# Segmented captioning (segments.py): a window is captioned as a standalone clip, so its length stays within the
# 1-30 s the model was trained on. The last window may be extended by up to 1 s (segments.MIN_LAST_WINDOW_S), so
# windows are at most 29 s: every window, extended or not, is then also a clip a whole-clip request accepts
# (max_duration_s, 30 s), which is how the caption CLI sends them. A hop shorter than a quarter of the window would
# put each moment in more than MAX_WINDOW_OVERLAP windows: the encoder work per second of audio is bounded by that.
MIN_SEGMENT_S = 1.0
MAX_SEGMENT_S = 29.0
MIN_HOP_S = MIN_SEGMENT_S / 4
MAX_WINDOW_OVERLAP = 4
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²", which int() refuses
_DECIMAL_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def option(default, help: str, *, low=None, high=None, choices=None):
    """A client option: its default, one line of help, and its accepted range or choices.

    Values parse as the type of `low` (int or float), else as one of `choices` (None: the checkpoint's tasks).
    The handler, the caption CLI and the docs take option names and ranges from here.
    """
    kind = type(low) if low is not None else str
    return field(default=default, metadata={"help": help, "kind": kind, "low": low, "high": high, "choices": choices})


@dataclass(frozen=True)
class DecodingOptions:
    """Per-item options. `forbid_rep_mode=None` uses the checkpoint's own repetition mask (content words)."""

    task: str | None = option(None, "task token the caption is written for (dataset style)")
    beam_size: int = option(3, "beam width", low=1, high=MAX_BEAM_SIZE)
    min_pred_size: int = option(3, "minimum caption length in tokens", low=0, high=MAX_PRED_SIZE_LIMIT)
    max_pred_size: int = option(20, "maximum caption length in tokens", low=1, high=MAX_PRED_SIZE_LIMIT)
    forbid_rep_mode: str | None = option(None, "which tokens may not repeat", choices=FORBID_REP_MODES)
    threshold: float | tuple[float, ...] = option(0.3, "AudioSet tag probability threshold", low=0.0, high=1.0)
    segment_s: float | None = option(None, "caption the clip as a timeline of windows of this many seconds",
                                     low=MIN_SEGMENT_S, high=MAX_SEGMENT_S)
    hop_s: float | None = option(None, "seconds between window starts (default: segment_s; less overlaps windows)",
                                 low=MIN_HOP_S, high=MAX_SEGMENT_S)

    @classmethod
    def parse(cls, values: Mapping[str, Any], tasks: list[str], defaults: "DecodingOptions | None" = None
              ) -> "DecodingOptions":
        """Validate client-supplied options (str, bytes or JSON numbers); raises OptionError."""
        defaults = defaults or cls(task=tasks[0])
        specs = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise OptionError(f"unknown option(s) {unknown}; accepted: {sorted(specs)}", "unknown_option")
        parsed = {}
        for name, raw in values.items():
            value = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
            spec = specs[name]
            kind = spec.metadata["kind"]
            if kind is str:
                parsed[name] = _parse_choice(name, value, spec.metadata["choices"] or tasks)
            elif kind is int:
                parsed[name] = _parse_int(name, value, spec.metadata["low"], spec.metadata["high"])
            else:
                parsed[name] = _parse_float(name, value, spec.metadata["low"], spec.metadata["high"])
        options = replace(defaults, **parsed)
        if options.min_pred_size > options.max_pred_size:
            raise OptionError(
                f"min_pred_size ({options.min_pred_size}) must not exceed max_pred_size ({options.max_pred_size})",
                "invalid_option",
            )
        options.check_segmentation()
        return options

    def check_segmentation(self) -> None:
        """hop_s needs segment_s, and may neither leave gaps between windows nor overlap them too much."""
        if self.segment_s is None:
            if self.hop_s is not None:
                raise OptionError("hop_s needs segment_s (the window length)", "invalid_option")
            return
        hop_s = self.window_hop_s
        if not self.segment_s / MAX_WINDOW_OVERLAP <= hop_s <= self.segment_s:
            raise OptionError(
                f"hop_s ({hop_s:g}) must be between segment_s / {MAX_WINDOW_OVERLAP} "
                f"({self.segment_s / MAX_WINDOW_OVERLAP:g}) "
                f"and segment_s ({self.segment_s:g}): windows may overlap, each moment in at most "
                f"{MAX_WINDOW_OVERLAP} of them, but not leave gaps", "invalid_option",
            )

    @property
    def segmented(self) -> bool:
        return self.segment_s is not None

    @property
    def window_hop_s(self) -> float | None:
        """Seconds between window starts: hop_s, by default segment_s (None when not segmented)."""
        return self.segment_s if self.hop_s is None else self.hop_s


OPTION_NAMES = tuple(f.name for f in fields(DecodingOptions))


def describe_option(name: str) -> str:
    """The accepted values of an option, as error messages and the docs state them."""
    spec = next(f for f in fields(DecodingOptions) if f.name == name)
    meta = spec.metadata
    if meta["kind"] is str:
        return f"one of {list(meta['choices'])}" if meta["choices"] else "one of the checkpoint's tasks"
    what = "an integer" if meta["kind"] is int else "a number"
    return f"{what} in [{meta['low']}, {meta['high']}]"


def _parse_choice(name: str, value: Any, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{name} must be one of {list(choices)}, got {_shown(value)}")
    return value


def _parse_int(name: str, value: Any, low: int, high: int) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and len(value.strip()) <= MAX_NUMBER_TEXT and _INTEGER_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None or not low <= number <= high:
        raise OptionError(f"{name} must be an integer in [{low}, {high}], got {_shown(value)}")
    return number


def _parse_float(name: str, value: Any, low: float, high: float) -> float:
    number = None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif (isinstance(value, str) and len(value.strip()) <= MAX_NUMBER_TEXT
              and _DECIMAL_TEXT.fullmatch(value.strip())):
            number = float(value.strip())
    except OverflowError:  # an int too large for a float (a JSON number of hundreds of digits)
        number = None
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise OptionError(f"{name} must be a number in [{low}, {high}], got {_shown(value)}")
    return number


def _shown(value: Any) -> str:
    """repr of a client value, cut short: error messages must not echo megabytes (or 5000-digit numbers)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**MAX_NUMBER_TEXT else "a huge integer"
    return text if len(text) <= 2 * MAX_NUMBER_TEXT else text[: 2 * MAX_NUMBER_TEXT] + "..."


@dataclass
class BeamResult:
    """One item's hypotheses in slot order: token ids (no task token; EOS kept when generated), scores."""

    tokens: list[list[int]]
    scores: list[float]

    @property
    def best(self) -> int:
        return int(torch.tensor(self.scores).max(dim=0).indices)


@torch.inference_mode()
def beam_search(
    decoder: TextDecoder,
    memory: Tensor,
    memory_lengths: Tensor,
    bos_ids: Tensor,
    forbid_masks: Tensor,
    beam_sizes: list[int],
    min_pred_sizes: list[int],
    max_pred_sizes: list[int],
    eos_id: int,
) -> list[BeamResult]:
    """Decode B items at once.

    memory: (B, n_frames, d_model) zero-padded; memory_lengths: (B,) valid frames; bos_ids: (B,) task tokens;
    forbid_masks: (B, vocab_size) bool repetition masks; beam_sizes/min/max_pred_sizes: per item.
    """
    device = memory.device
    n_items, n_frames, _ = memory.shape
    vocab_size = decoder.classifier.out_features
    max_beam = max(beam_sizes)

    beam_sizes_t = torch.tensor(beam_sizes, device=device)
    min_pred_t = torch.tensor(min_pred_sizes, device=device)
    max_pred_t = torch.tensor(max_pred_sizes, device=device)

    # Rows = active hypotheses, item-major; `slot` is the fixed output position of each row.
    row_item = torch.repeat_interleave(torch.arange(n_items, device=device), beam_sizes_t)
    row_slot = torch.cat([torch.arange(k, device=device) for k in beam_sizes])
    tokens = bos_ids[row_item]
    sum_lprobs = torch.zeros(len(row_item), device=device)
    history = tokens[:, None]
    seen = torch.zeros(len(row_item), vocab_size, dtype=torch.bool, device=device)
    seen[torch.arange(len(row_item), device=device), tokens] = True

    # Cross-attention keys/values once per item, then one row per hypothesis: a hypothesis never changes item,
    # so these rows only shrink when hypotheses finish.
    memory_kv = [(k.index_select(0, row_item), v.index_select(0, row_item))
                 for k, v in decoder.memory_key_values(memory)]
    frame_valid = torch.arange(n_frames, device=device)[None, :] < memory_lengths[:, None]
    memory_mask = frame_valid.index_select(0, row_item)[:, None, None, :] if not bool(frame_valid.all()) else None
    cache = KVCache(len(decoder.layers))

    out_tokens: list[list[list[int] | None]] = [[None] * k for k in beam_sizes]
    out_scores: list[list[float]] = [[0.0] * k for k in beam_sizes]
    neg_inf = torch.tensor(-math.inf, device=device)

    step = 0
    while len(row_item) > 0:
        logits = decoder.step(tokens, step, cache, memory_kv, memory_mask)

        ban_eos = (step < min_pred_t)[row_item]
        logits[:, eos_id] = torch.where(ban_eos, neg_inf, logits[:, eos_id])
        logits = logits.masked_fill(seen & forbid_masks[row_item], -math.inf)

        # Scatter rows into a padded (items, max_beam, vocab) grid; the first step expands slot 0 only.
        active_per_item = torch.bincount(row_item, minlength=n_items)
        item_offset = torch.cumsum(active_per_item, 0) - active_per_item
        row_pos = torch.arange(len(row_item), device=device) - item_offset[row_item]
        candidates = torch.full((n_items, max_beam, vocab_size), -math.inf, device=device)
        lprobs = torch.log_softmax(logits, dim=1)
        if step == 0:
            first = row_pos == 0
            candidates[row_item[first], 0] = lprobs[first]
        else:
            candidates[row_item, row_pos] = sum_lprobs[:, None] + lprobs
        top_values, top_flat = torch.topk(candidates.view(n_items, -1), max_beam, dim=1)

        # Item j keeps its first k_j = (number of active rows of j) candidates, in its active slots.
        keep = torch.arange(max_beam, device=device)[None, :] < active_per_item[:, None]
        parent_local = torch.div(top_flat, vocab_size, rounding_mode="trunc")
        parents = (item_offset[:, None] + parent_local)[keep]
        new_tokens = (top_flat % vocab_size)[keep]
        sum_lprobs = top_values[keep]

        cache.select(parents)
        history = torch.cat([history.index_select(0, parents), new_tokens[:, None]], dim=1)
        seen = seen.index_select(0, parents)
        seen[torch.arange(len(parents), device=device), new_tokens] = True
        tokens = new_tokens

        n_generated = step + 1
        finished = (new_tokens == eos_id) | (n_generated >= max_pred_t[row_item])
        if bool(finished.any()):
            for row in finished.nonzero()[:, 0].tolist():
                item, slot = int(row_item[row]), int(row_slot[row])
                out_tokens[item][slot] = history[row, 1:].tolist()
                out_scores[item][slot] = float(sum_lprobs[row] / n_generated)
            unfinished = (~finished).nonzero()[:, 0]
            row_item, row_slot = row_item[unfinished], row_slot[unfinished]
            tokens, sum_lprobs = tokens[unfinished], sum_lprobs[unfinished]
            history, seen = history[unfinished], seen[unfinished]
            cache.select(unfinished)
            memory_kv = [(k.index_select(0, unfinished), v.index_select(0, unfinished)) for k, v in memory_kv]
            memory_mask = memory_mask.index_select(0, unfinished) if memory_mask is not None else None
        step += 1

    return [BeamResult(tokens=toks, scores=scores) for toks, scores in zip(out_tokens, out_scores)]

