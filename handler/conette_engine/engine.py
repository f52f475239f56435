"""CaptioningEngine: the one entry point of the package (loading, audio in, captions and tags out)."""

import csv
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from . import audio as audio_io
from .checkpoint import Checkpoint, load_checkpoint
from .decoding import BeamResult, DecodingOptions, beam_search
from .errors import AudioError, CheckpointError, NonFiniteResultError, OptionError, WorkLimitError
from .model import CoNeTTE, ModelDimensions
from .segments import Span, segment_bounds


# The one version string of the project: pyproject.toml and build_mar.sh (the .mar's model version) read this
# file too. A file next to the code, not package metadata: inside a .mar the package is not installed.
ENGINE_VERSION = (Path(__file__).resolve().parent / "VERSION").read_text().strip()

# ---- Work of one item, so that no accepted batch can overrun TorchServe's responseTimeout or the memory limit ----
# Upper estimates for the documented hardware (2 dedicated CPU cores, 2 torch threads, full-size model: ConvNeXt
# 3,3,9,3, 6 decoder layers, d_model 256), from tools/bench_batch_work.py (docs/reliability.md, "Limits and the
# work of one batch").
# Encoder (log-mel + ConvNeXt + projection), one clip at a time: 0.017-0.021 s per audio second on a quiet host; 0.028
# and 0.035 (CPU time / 2 threads) in batches of 64 and 48 x 30 s clips on a busy one.
ENCODE_S_PER_AUDIO_S = 0.035
# Beam search: a fixed cost per step (0.002 s measured) and a cost per live hypothesis per step, which grows with
# the number of hypotheses in the batch (memory-bound: every hypothesis reads its own cross-attention keys/values):
# 0.45 ms with 16 hypotheses, 2.9 ms (CPU time / 2 threads) with 256. min_pred_size = max_pred_size forces every
# step, so max_pred_size bounds the steps.
DECODE_S_PER_STEP = 0.002
DECODE_S_PER_HYPOTHESIS_STEP = 0.003
# Decoder memory held during the beam search, per hypothesis: cross-attention keys/values over the clip's encoder
# frames plus the self-attention cache over its tokens (n_layers x K,V x d_model float32 = 12 KiB with 6 layers).
# Encoder frames: 100 STFT frames per second, downsampled 32 times.
BYTES_PER_HYPOTHESIS_FRAME = 12 * 1024
ENCODER_FRAMES_PER_S = 100 / 32

# Defaults for TorchServe's batchSize 8 and responseTimeout 120 s in a 4 GiB pod: a whole batch of 8 requests at
# their limit is at most 84 s of compute (70 % of responseTimeout) and 1 GiB of beam-search memory on top of the
# worker's ~2 GiB peak. Eight 30 s clips at the default options (beam 3, 20 tokens: 10.2 s) fit in one request.
DEFAULT_REQUEST_WORK_S = 84.0 / 8
DEFAULT_REQUEST_BEAM_BYTES = 1024**3 // 8


@dataclass(frozen=True)
class Work:
    """Estimated cost of engine items: compute seconds (documented hardware) and beam-search memory in bytes."""

    seconds: float
    beam_bytes: int

    def __add__(self, other: "Work") -> "Work":
        return Work(self.seconds + other.seconds, self.beam_bytes + other.beam_bytes)


def item_work(duration_s: float, options: DecodingOptions) -> Work:
    """Upper estimate of one engine item's cost: a clip (or one window of a longer clip) with its options."""
    steps = options.max_pred_size
    seconds = (ENCODE_S_PER_AUDIO_S * duration_s
               + steps * (DECODE_S_PER_STEP + DECODE_S_PER_HYPOTHESIS_STEP * options.beam_size))
    frames = math.ceil(ENCODER_FRAMES_PER_S * duration_s) + 1
    return Work(seconds, options.beam_size * (frames + steps) * BYTES_PER_HYPOTHESIS_FRAME)

# Longest clip accepted for segmented captioning (segment_s) when its windows do not overlap; overlapping windows
# (hop_s < segment_s) lower it in proportion, so that the audio the encoder sees stays within it. A window costs
# what a clip of its length costs (docs/long-recordings.md has the measurements). Chosen to agree with the work
# limit: a request at this limit in windows of 10 s or more passes check_request_work at the default options
# (180 s in 18 windows of 10 s: 0.035 x 180 + 18 x 0.22 = 10.3 s <= DEFAULT_REQUEST_WORK_S).
DEFAULT_MAX_SEGMENTED_DURATION_S = 180.0


@dataclass
class CaptionResult:
    caption: str
    score: float
    candidates: list[tuple[str, float]]  # slot order, as the reference's mult_cands
    candidate_tokens: list[list[int]]
    best_tokens: list[int]
    task: str
    tags: list[tuple[str, float]]  # by class index, as the reference's tags
    clip_probs: Tensor  # (n_classes,)
    audio: audio_io.DecodedAudio

    def to_dict(self) -> dict:
        """JSON-ready: candidates and tags best first."""
        return {**self._caption_dict(), "task": self.task, "tags": _tags_dict(self.tags),
                "audio": _audio_dict(self.audio)}

    def _caption_dict(self) -> dict:
        order = sorted(range(len(self.candidates)), key=lambda i: -self.candidates[i][1])
        return {
            "caption": self.caption,
            "score": self.score,
            "candidates": [{"caption": self.candidates[i][0], "score": self.candidates[i][1]} for i in order],
        }


@dataclass
class Segment(Span):
    """One window of a segmented clip and its caption."""

    result: CaptionResult  # exactly what caption() gives for that slice alone


@dataclass
class SegmentedResult:
    """A clip captioned as a timeline of windows (options.segment_s), see segments.py."""

    segments: list[Segment]  # time order
    task: str
    tags: list[tuple[str, float]]  # clip level: per label the maximum probability over the windows, thresholded
    clip_probs: Tensor  # (n_classes,) that maximum
    audio: audio_io.DecodedAudio

    def to_dict(self) -> dict:
        """JSON-ready: segments in time order (each with its candidates and tags best first), clip-level tags."""
        return {
            "segments": [
                {"start_s": segment.start_s, "end_s": segment.end_s, **segment.result._caption_dict(),
                 "tags": _tags_dict(segment.result.tags)}
                for segment in self.segments
            ],
            "tags": _tags_dict(self.tags),
            "task": self.task,
            "audio": _audio_dict(self.audio),
        }


def _tags_dict(tags: list[tuple[str, float]]) -> list[dict]:
    return [{"label": label, "score": score} for label, score in sorted(tags, key=lambda t: -t[1])]


def _audio_dict(audio: audio_io.DecodedAudio) -> dict:
    return {"duration_s": audio.duration_s, "sample_rate": audio.sample_rate, "channels": audio.channels}


def load_label_names() -> list[str]:
    """AudioSet class names by index (527), from the shipped class_labels_indices.csv."""
    text = resources.files(__package__).joinpath("data/class_labels_indices.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    return [row["display_name"] for row in sorted(rows, key=lambda row: int(row["index"]))]


class CaptioningEngine:
    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu",
                 max_duration_s: float = audio_io.DEFAULT_MAX_DURATION_S, encoder_batch_size: int | None = None,
                 max_request_work: Work = Work(DEFAULT_REQUEST_WORK_S, DEFAULT_REQUEST_BEAM_BYTES),
                 max_segmented_duration_s: float = DEFAULT_MAX_SEGMENTED_DURATION_S):
        self.device = torch.device(device)
        self.max_duration_s = float(max_duration_s)
        # Per request: TorchServe batches up to batchSize requests, so batchSize x this bounds one batch.
        self.max_request_work = max_request_work
        self.max_segmented_duration_s = float(max_segmented_duration_s)
        if not self.max_segmented_duration_s > 0:
            raise ValueError(f"max_segmented_duration_s must be positive, got {max_segmented_duration_s}")
        # On CPU one clip at a time is fastest (batching equal-length clips lowered the encoder's GFLOP/s
        # from ~150 to ~120 on 2 cores: larger activations fall out of cache); GPUs want batches.
        self.encoder_batch_size = encoder_batch_size or (1 if self.device.type == "cpu" else 16)
        self.checkpoint_sha256 = checkpoint.sha256
        self.version = ENGINE_VERSION
        self.vocabulary = checkpoint.vocabulary
        self.dims = ModelDimensions.from_checkpoint(checkpoint.state_dict, checkpoint.config)
        if self.dims.vocab_size != len(self.vocabulary):
            raise CheckpointError(f"vocabulary has {len(self.vocabulary)} tokens, decoder has {self.dims.vocab_size}")
        self.tasks = list(checkpoint.config["task_names"])
        if len(self.tasks) != self.dims.n_tasks:
            raise CheckpointError(f"config lists {len(self.tasks)} tasks, checkpoint has {self.dims.n_tasks}")

        self.model = CoNeTTE.from_state_dict(self.dims, checkpoint.state_dict).to(self.device)

        config = checkpoint.config
        self.defaults = DecodingOptions(
            task=self.tasks[0],
            beam_size=int(config.get("beam_size", 3)),
            min_pred_size=int(config.get("min_pred_size", 3)),
            max_pred_size=int(config.get("max_pred_size", 20)),
        )
        self.label_names = load_label_names()
        if len(self.label_names) != self.dims.n_classes:
            raise CheckpointError(f"{len(self.label_names)} AudioSet labels for {self.dims.n_classes} classes")
        self._task_token = dict(zip(self.tasks, self.model.model.task_id_to_token_id.tolist()))
        vocab_size = self.dims.vocab_size
        self._forbid_masks = {
            None: self.model.model.forbid_rep_mask.to(self.device),
            "content_words": self.vocabulary.content_words_mask().to(self.device),
            "all": torch.ones(vocab_size, dtype=torch.bool, device=self.device),
            "none": torch.zeros(vocab_size, dtype=torch.bool, device=self.device),
        }

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu",
             max_duration_s: float = audio_io.DEFAULT_MAX_DURATION_S,
             encoder_batch_size: int | None = None,
             max_request_work: Work = Work(DEFAULT_REQUEST_WORK_S, DEFAULT_REQUEST_BEAM_BYTES),
             max_segmented_duration_s: float = DEFAULT_MAX_SEGMENTED_DURATION_S) -> "CaptioningEngine":
        return cls(load_checkpoint(model_dir), device=device, max_duration_s=max_duration_s,
                   encoder_batch_size=encoder_batch_size, max_request_work=max_request_work,
                   max_segmented_duration_s=max_segmented_duration_s)

    def parse_options(self, values) -> DecodingOptions:
        return DecodingOptions.parse(values, tasks=self.tasks, defaults=self.defaults)

    def load_audio(self, source, sample_rate: int | None = None, options: DecodingOptions | None = None
                   ) -> audio_io.DecodedAudio:
        """Decode and validate one clip for the options it will be captioned with.

        Whole clips are limited to max_duration_s. Segmented ones (options.segment_s) to max_segmented_duration_s
        times hop_s / segment_s: overlapping windows encode each moment more than once.
        """
        if options is None or not options.segmented:
            return audio_io.load_audio(source, sample_rate=sample_rate, max_duration_s=self.max_duration_s)
        hop_s = options.window_hop_s
        limit = self.max_segmented_duration_s * min(1.0, hop_s / options.segment_s)
        try:
            return audio_io.load_audio(source, sample_rate=sample_rate, max_duration_s=limit, segmented=True)
        except AudioError as error:
            if error.type != "audio_too_long" or hop_s >= options.segment_s:
                raise
            raise AudioError(
                f"{error.message} (windows overlapping with hop_s {hop_s:g} < segment_s {options.segment_s:g} lower "
                f"the limit of {self.max_segmented_duration_s:g} s in proportion)", type=error.type) from None

    def check_request_work(self, items) -> Work:
        """items: (DecodedAudio, DecodingOptions) pairs of one request. Returns their estimated Work; raises
        WorkLimitError (400) when it exceeds max_request_work, before any model work is spent on them."""
        items = list(items)
        # A segmented clip is as many engine items as it has windows; overlapping windows cover more than the clip.
        pieces = [((stop - start) / audio_io.SAMPLE_RATE, opts) for audio, opts in items
                  for start, stop in (segment_bounds(audio.waveform.shape[0], opts.segment_s, opts.hop_s)
                                      if opts.segmented else [(0, audio.waveform.shape[0])])]
        work = sum((item_work(duration_s, opts) for duration_s, opts in pieces), Work(0.0, 0))
        limit = self.max_request_work
        if work.seconds > limit.seconds or work.beam_bytes > limit.beam_bytes:
            audio_s = sum(duration_s for duration_s, _ in pieces)
            advice = ("Send fewer or shorter clips per request, use longer windows (segment_s), or lower beam_size / "
                      "max_pred_size" if any(opts.segmented for _, opts in items) else
                      "Send fewer or shorter clips per request, or lower beam_size / max_pred_size")
            raise WorkLimitError(
                f"this request is too expensive: {len(pieces)} clip(s) or windows, {audio_s:.1f} s of audio, up to "
                f"{max(o.beam_size for _, o in items)} beams x {max(o.max_pred_size for _, o in items)} tokens "
                f"is about {work.seconds:.1f} s of compute and {work.beam_bytes / 2**20:.0f} MiB of decoder memory; "
                f"one request may use {limit.seconds:.1f} s and {limit.beam_bytes / 2**20:.0f} MiB. {advice}"
            )
        return work

    @torch.inference_mode()
    def encode(self, waveforms: list[Tensor], timings: dict | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Mono 32 kHz waveforms (n_i,) -> per item: decoder memory (n_frames_i, d_model), clip probs (n_classes,).

        Only items of equal length share an encoder batch (up to encoder_batch_size): padding never enters
        the encoder, so an item's features do not depend on the rest of the batch.
        """
        timings = timings if timings is not None else {}
        groups: dict[int, list[int]] = defaultdict(list)
        for i, waveform in enumerate(waveforms):
            groups[waveform.shape[-1]].append(i)
        chunks = [indices[start:start + self.encoder_batch_size]
                  for indices in groups.values() for start in range(0, len(indices), self.encoder_batch_size)]
        memories: list[Tensor | None] = [None] * len(waveforms)
        clip_probs: list[Tensor | None] = [None] * len(waveforms)
        encoder = self.model.encoder
        for indices in chunks:
            batch = torch.stack([waveforms[i] for i in indices]).to(self.device)
            with _timed(timings, "logmel"):
                log_mel = encoder.log_mel(batch)
            with _timed(timings, "encoder"):
                frame_embs, probs = encoder(log_mel)
                memory = self.model.project(frame_embs)
            for j, i in enumerate(indices):
                memories[i], clip_probs[i] = memory[j], probs[j]
        return memories, clip_probs

    @torch.inference_mode()
    def caption(self, audios: list, options: list[DecodingOptions] | DecodingOptions | None = None,
                timings: dict | None = None) -> list[CaptionResult]:
        """audios: DecodedAudio (from load_audio: validated, 32 kHz mono); options: one per item (or one for all).

        Whole clips only: options with segment_s are refused (caption_segments cuts those clips into windows).
        """
        options = self._checked_items(audios, options)
        if any(opts.segmented for opts in options):
            raise OptionError("segment_s/hop_s ask for a timeline of windows, which whole-clip captioning does not "
                              "give (segmented clips are captioned by CaptioningEngine.caption_segments)")
        return self._caption_items([(a.waveform, o, a) for a, o in zip(audios, options)], timings)

    @torch.inference_mode()
    def caption_segments(self, audios: list, options: list[DecodingOptions] | DecodingOptions | None = None,
                         timings: dict | None = None) -> list[CaptionResult | SegmentedResult]:
        """Like caption(), but an item whose options set segment_s is cut into windows (segments.segment_bounds)
        and answered with a SegmentedResult; the others get a CaptionResult. Every window of every item goes
        through one encoder pass (equal-length windows share encoder batches on GPU) and one beam search, so a
        batch mixing segmented and whole-clip requests is one engine call. Each window's result is exactly
        caption() of its slice alone (a 32 kHz DecodedAudio).
        """
        options = self._checked_items(audios, options)
        items, spans = [], []  # items: (waveform, options, audio) for the encoder and the beam search
        for audio, opts in zip(audios, options):
            if not opts.segmented:
                spans.append(None)
                items.append((audio.waveform, opts, audio))
                continue
            bounds = segment_bounds(audio.waveform.shape[0], opts.segment_s, opts.hop_s)
            spans.append(bounds)
            window_options = replace(opts, segment_s=None, hop_s=None)
            for start, stop in bounds:
                window = audio.waveform[start:stop]
                items.append((window, window_options, audio_io.DecodedAudio(
                    waveform=window, sample_rate=audio_io.SAMPLE_RATE, channels=1,
                    duration_s=(stop - start) / audio_io.SAMPLE_RATE)))
        results = iter(self._caption_items(items, timings))
        answers: list[CaptionResult | SegmentedResult] = []
        for audio, opts, bounds in zip(audios, options, spans):
            if bounds is None:
                answers.append(next(results))
                continue
            windows = [next(results) for _ in bounds]
            clip_probs = torch.stack([w.clip_probs for w in windows]).max(dim=0).values
            answers.append(SegmentedResult(
                segments=[Segment(start, stop, window) for (start, stop), window in zip(bounds, windows)],
                task=opts.task, tags=self._tags(clip_probs, opts.threshold), clip_probs=clip_probs, audio=audio,
            ))
        return answers

    def _checked_items(self, audios: list, options) -> list[DecodingOptions]:
        if options is None or isinstance(options, DecodingOptions):
            options = [options or self.defaults] * len(audios)
        if len(options) != len(audios):
            raise ValueError(f"{len(options)} options for {len(audios)} audios")
        for opts in options:
            if opts.task not in self._task_token:
                raise OptionError(f"task must be one of {self.tasks}, got {opts.task!r}")
            opts.check_segmentation()
        if not all(isinstance(a, audio_io.DecodedAudio) for a in audios):
            raise TypeError("caption() takes DecodedAudio items: pass clips through load_audio() first")
        return list(options)

    def _caption_items(self, items: list[tuple[Tensor, DecodingOptions, audio_io.DecodedAudio]],
                       timings: dict | None) -> list[CaptionResult]:
        """items: (mono 32 kHz waveform, options, the DecodedAudio it is reported as).

        One encoder pass and one beam search for all of them."""
        if not items:
            return []
        timings = timings if timings is not None else {}
        memories, clip_probs = self.encode([waveform for waveform, _, _ in items], timings)
        with _timed(timings, "beam_search"):
            beams = self._beam_search(memories, [opts for _, opts, _ in items])
        return [self._result(beam, probs, opts, audio)
                for beam, probs, (_, opts, audio) in zip(beams, clip_probs, items)]

    def _beam_search(self, memories: list[Tensor], options: list[DecodingOptions]) -> list[BeamResult]:
        lengths = torch.tensor([m.shape[0] for m in memories], device=self.device)
        memory = torch.nn.utils.rnn.pad_sequence(memories, batch_first=True)
        return beam_search(
            self.model.decoder,
            memory,
            lengths,
            bos_ids=torch.tensor([self._task_token[o.task] for o in options], device=self.device),
            forbid_masks=torch.stack([self._forbid_masks[o.forbid_rep_mode] for o in options]),
            beam_sizes=[o.beam_size for o in options],
            min_pred_sizes=[o.min_pred_size for o in options],
            max_pred_sizes=[o.max_pred_size for o in options],
            eos_id=self.vocabulary.eos_id,
        )

    def _result(self, beam: BeamResult, probs: Tensor, opts: DecodingOptions, audio) -> CaptionResult:
        probs = probs.float().cpu()
        if not (all(math.isfinite(score) for score in beam.scores) and bool(torch.isfinite(probs).all())):
            raise NonFiniteResultError(
                f"non-finite caption score or tag probability (audio: {audio.duration_s:.2f} s, "
                f"peak |sample| {float(audio.waveform.abs().max()):.3g})"
            )
        captions = [self.vocabulary.decode(tokens) for tokens in beam.tokens]
        best = beam.best
        return CaptionResult(
            caption=captions[best],
            score=beam.scores[best],
            candidates=list(zip(captions, beam.scores)),
            candidate_tokens=beam.tokens,
            best_tokens=beam.tokens[best],
            task=opts.task,
            tags=self._tags(probs, opts.threshold),
            clip_probs=probs,
            audio=audio,
        )

    def _tags(self, probs: Tensor, threshold: float | tuple[float, ...]) -> list[tuple[str, float]]:
        """AudioSet labels with probability >= threshold (one for all classes, or one per class), by class index."""
        tag_ids = (probs >= torch.as_tensor(threshold, dtype=probs.dtype)).nonzero()[:, 0].tolist()
        return [(self.label_names[i], float(probs[i])) for i in tag_ids]


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
