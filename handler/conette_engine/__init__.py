"""Pure-PyTorch CoNeTTE inference: audio in, captions and AudioSet tags out.

Pipeline stages, one module each:
    audio.py      decode (FFmpeg via torchcodec), validate, resample to 32 kHz, down-mix
    model.py      ModelDimensions; log-mel + ConvNeXt encoder + AudioSet head; projection; KV-cached decoder
    decoding.py   DecodingOptions + batched beam search with the reference's exact semantics
    tokenizer.py  vocabulary, detokenisation, restricted unpickler for `_extra_state_`
    checkpoint.py official (config.json + pytorch_model.bin) and serving (safetensors) formats
    segments.py   segmented captioning: the window rule, windows streamed from recordings of any length
    engine.py     CaptioningEngine: the one entry point the TorchServe handler uses

Public API (what the handler and the scripts use):

    engine = CaptioningEngine.load(model_dir, device="cpu", max_duration_s=30.0, max_segmented_duration_s=180.0)
    engine.tasks                 # list[str], from the checkpoint's config, first = default
    engine.checkpoint_sha256     # str
    opts = engine.parse_options(mapping)   # DecodingOptions.parse with the checkpoint's defaults; OptionError
    audio = engine.load_audio(source, sample_rate=None, options=opts)  # bytes|str|Path|Tensor; limits by opts
    results = engine.caption([audio, ...], [opts, ...], timings=None)  # -> list[CaptionResult] (whole clips)
    # timings, when given a dict, gets seconds per stage: "logmel", "encoder", "beam_search"
    results[i].to_dict()         # JSON-ready: caption, score, candidates, task, tags, audio
    results = engine.caption_segments([audio, ...], [opts, ...])  # items with opts.segment_s -> SegmentedResult
    results[i].to_dict()         # segmented: segments [{start_s, end_s, caption, score, candidates, tags}],
                                 #   tags (per label max over windows, thresholded), task, audio

Long recordings (any length, video too) for clients that cut windows themselves:

    for window in stream_windows(path, segment_s, hop_s):   # bounded memory; window.start/stop/waveform
        ...                      # window.waveform == load_audio(path, <no limit>).waveform[start:stop]

Errors a client caused are InputError subclasses (AudioError, OptionError) with `.type`
(short machine-readable str) and `.message` (says what is wrong and the limit).
"""

import importlib

# Imported on first use (PEP 562), so that `conette_engine.decoding` alone (the caption CLI's option flags)
# does not pay for FFmpeg decoding and torchaudio.
_EXPORTS = {
    "AudioStream": "audio", "DecodedAudio": "audio", "load_audio": "audio", "DecodingOptions": "decoding",
    "CaptioningEngine": "engine", "CaptionResult": "engine", "Segment": "engine", "SegmentedResult": "engine",
    "Window": "segments", "segment_bounds": "segments", "stream_windows": "segments",
    "AudioError": "errors", "CheckpointError": "errors", "InputError": "errors", "OptionError": "errors",
    "UnsafePickleError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
