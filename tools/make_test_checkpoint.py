#!/usr/bin/env python
"""Write a small random-weight CoNeTTE checkpoint in the official Hugging Face format.

    python tools/make_test_checkpoint.py OUT_DIR [--seed 0] [--depths 1,1,1,1] [--layers 2] [--ffn 512]
                                                   [--vocab-size 300]

OUT_DIR gets exactly what `CoNeTTEModel.save_pretrained(dir)` writes for the hub repo Labbeti/conette:
    config.json         the CoNeTTE config (tokenizer_state: null), with the decoder sizes given here
    pytorch_model.bin   torch.save of the state dict, tensors in the reference's order, plus the uint8 tensor
                        `_extra_state_`: a pickle of {"model.tokenizers.0._extra_state": <AACTokenizer txt state>}
The pickle is made with pickle.dumps of plain dicts, lists, str, int and bool only.

The model is made for tests, not for listening: weights are random but scaled so that outputs are finite and
depend on the audio, captions vary in content and length, and <eos> has a bias so captions end. The same seed
gives byte-identical files. Nothing here imports the `conette` package.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_DATA = REPO_ROOT / "handler" / "conette_engine" / "data"

TASKS = (
    "clotho",
    "audiocaps",
    "macs",
    "wavcaps_audioset_sl",
    "wavcaps_bbc_sound_effects",
    "wavcaps_freesound",
    "wavcaps_soundbible",
)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
EOS_ID = 2
ENCODER_DIMS = (96, 192, 384, 768)
N_MELS, N_FFT, SAMPLE_RATE, F_MIN, F_MAX = 224, 1024, 32000, 50.0, 14000.0
N_AUDIOSET_CLASSES = 527
MAX_POSITIONS = 5000
EOS_BIAS = 6.0
# Larger gains on the audio -> text path so captions depend on the audio, as with a trained model.
GAIN_CROSS_ATTN_IN = 4.0
GAIN_CROSS_ATTN_OUT = 0.5


def config_dict(d_model: int, nhead: int, layers: int, ffn: int) -> dict:
    """The official config.json fields; only the decoder sizes differ from the real model."""
    return {
        "acti_name": "gelu",
        "architectures": ["CoNeTTEModel"],
        "beam_size": 3,
        "betas": [0.9, 0.999],
        "d_model": d_model,
        "decoder_dropout_p": 0.2,
        "dim_feedforward": ffn,
        "eps": 1e-08,
        "gen_test_cands": "generate",
        "gen_val_cands": "generate",
        "label_smoothing": 0.2,
        "lr": 0.0005,
        "max_pred_size": 20,
        "min_pred_size": 3,
        "mixup_alpha": 0.4,
        "nhead": nhead,
        "num_decoder_layers": layers,
        "optim_name": "AdamW",
        "proj_name": "lin768",
        "sched_freq": 1,
        "sched_interval": "epoch",
        "sched_n_steps": 400,
        "sched_name": "cos_decay",
        "task_mode": "ds_src",
        "task_names": list(TASKS),
        "tokenizer_state": None,
        "torch_dtype": "float32",
        "transformers_version": "4.30.2",
        "use_custom_wd": True,
        "verbose": 0,
        "weight_decay": 2.0,
    }


def read_stopwords() -> list[str]:
    return [w.strip() for w in (ENGINE_DATA / "stopwords_english.txt").read_text().splitlines() if w.strip()]


def build_words(vocab_size: int) -> list[str]:
    """Caption-like words: common stopwords interleaved with words of the AudioSet label names."""
    stopwords = [w for w in read_stopwords() if re.fullmatch(r"[a-z]+", w)]
    label_words: list[str] = []
    with open(ENGINE_DATA / "class_labels_indices.csv", newline="") as f:
        for row in csv.DictReader(f):
            label_words += re.findall(r"[a-z]+", row["display_name"].lower())
    words: list[str] = []
    for word in [w for pair in zip(stopwords, label_words) for w in pair] + label_words:
        if word not in words:
            words.append(word)
    if len(words) < vocab_size:
        raise SystemExit(f"only {len(words)} distinct words available, --vocab-size {vocab_size} is too large")
    return words[:vocab_size]


def tokenizer_state(words: list[str]) -> dict:
    """AACTokenizer.get_extra_state() of a word-level tokenizer fit on `words`, task tokens added after."""
    task_tokens = [f"<bos_{task}>" for task in TASKS]
    itos_list = list(SPECIAL_TOKENS) + words + task_tokens
    max_sentence_size = 12
    return {
        "_target_": "conette.tokenization.aac_tokenizer.AACTokenizer",
        "_version_": "2.2.0",
        "_type_": "txt",
        "tokenizer": {
            "hparams": {"level": "word", "lowercase": True, "punctuation_mode": "remove", "normalize": True},
            "normalize": True,
            "added_special_tokens": task_tokens,
            "max_sentence_size": max_sentence_size,
            "min_sentence_size": 4,
            "n_sentences_fit": math.ceil(len(words) / max_sentence_size),
            "itos": dict(enumerate(itos_list)),
            "stoi": {token: i for i, token in enumerate(itos_list)},
            # Fit counts: each word was seen once, special and task tokens never.
            "vocab": {token: int(token in words) for token in itos_list},
        },
    }


def stft_kernels() -> tuple[torch.Tensor, torch.Tensor]:
    """torchlibrosa STFT conv kernels: the DFT basis times a periodic Hann window, (n_fft//2+1, 1, n_fft)."""
    n = torch.arange(N_FFT, dtype=torch.float64)
    k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[:, None]
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    angle = -2.0 * math.pi * k * n / N_FFT
    real = (torch.cos(angle) * window).float()[:, None, :]
    imag = (torch.sin(angle) * window).float()[:, None, :]
    return real, imag


def mel_filterbank() -> torch.Tensor:
    """librosa-style (Slaney) mel filterbank, (n_fft//2+1, n_mels)."""
    import torchaudio

    return torchaudio.functional.melscale_fbanks(
        N_FFT // 2 + 1, F_MIN, F_MAX, N_MELS, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
    ).float()


def sinusoid_positions(d_model: int) -> torch.Tensor:
    position = torch.arange(MAX_POSITIONS, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(MAX_POSITIONS, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table.float()[:, None, :]


class RandomTensors:
    """Seeded random tensors; every tensor draws from one generator in file order (deterministic)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (mean + std * torch.randn(shape, generator=self.generator, dtype=torch.float64)).float()

    def weight(self, *shape: int, gain: float = 1.0) -> torch.Tensor:
        """~ gain / sqrt(fan_in): keeps activations of order one through the layers."""
        return self.normal(*shape, std=gain / math.sqrt(math.prod(shape[1:])))

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.05)

    def norm_weight(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.1, mean=1.0)


def encoder_tensors(rand: RandomTensors, depths: list[int]) -> OrderedDict:
    prefix = "preprocessor.encoder."
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    real, imag = stft_kernels()
    sd[prefix + "spectrogram_extractor.stft.conv_real.weight"] = real
    sd[prefix + "spectrogram_extractor.stft.conv_imag.weight"] = imag
    sd[prefix + "logmel_extractor.melW"] = mel_filterbank()
    sd[prefix + "bn0.weight"] = rand.norm_weight(N_MELS)
    sd[prefix + "bn0.bias"] = rand.bias(N_MELS)
    sd[prefix + "bn0.running_mean"] = rand.normal(N_MELS, std=4.0, mean=-24.0)  # log-mel dB domain
    sd[prefix + "bn0.running_var"] = rand.normal(N_MELS, std=8.0, mean=144.0).abs()
    sd[prefix + "bn0.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    # downsample_layers.0 = [stem conv 4x4, LayerNorm]; the others = [LayerNorm, conv 2x2].
    sd[prefix + "downsample_layers.0.0.weight"] = rand.weight(ENCODER_DIMS[0], 1, 4, 4)
    sd[prefix + "downsample_layers.0.0.bias"] = rand.bias(ENCODER_DIMS[0])
    sd[prefix + "downsample_layers.0.1.weight"] = rand.norm_weight(ENCODER_DIMS[0])
    sd[prefix + "downsample_layers.0.1.bias"] = rand.bias(ENCODER_DIMS[0])
    for i in range(1, 4):
        dim_in, dim_out = ENCODER_DIMS[i - 1], ENCODER_DIMS[i]
        sd[prefix + f"downsample_layers.{i}.0.weight"] = rand.norm_weight(dim_in)
        sd[prefix + f"downsample_layers.{i}.0.bias"] = rand.bias(dim_in)
        sd[prefix + f"downsample_layers.{i}.1.weight"] = rand.weight(dim_out, dim_in, 2, 2)
        sd[prefix + f"downsample_layers.{i}.1.bias"] = rand.bias(dim_out)
    for stage, (depth, dim) in enumerate(zip(depths, ENCODER_DIMS)):
        for block in range(depth):
            p = prefix + f"stages.{stage}.{block}."
            # A large layer scale (the reference init is 1e-6) so every block changes the output.
            sd[p + "scale_layer"] = rand.normal(dim, std=0.25)
            sd[p + "dwconv.weight"] = rand.weight(dim, 1, 7, 7)
            sd[p + "dwconv.bias"] = rand.bias(dim)
            sd[p + "norm.weight"] = rand.norm_weight(dim)
            sd[p + "norm.bias"] = rand.bias(dim)
            sd[p + "pwconv1.weight"] = rand.weight(4 * dim, dim)
            sd[p + "pwconv1.bias"] = rand.bias(4 * dim)
            sd[p + "pwconv2.weight"] = rand.weight(dim, 4 * dim)
            sd[p + "pwconv2.bias"] = rand.bias(dim)
    sd[prefix + "norm.weight"] = rand.norm_weight(ENCODER_DIMS[-1])
    sd[prefix + "norm.bias"] = rand.bias(ENCODER_DIMS[-1])
    sd[prefix + "head_audioset.weight"] = rand.weight(N_AUDIOSET_CLASSES, ENCODER_DIMS[-1])
    # Bias around -3.5 so a minority of tags pass the default 0.3 threshold.
    sd[prefix + "head_audioset.bias"] = rand.normal(N_AUDIOSET_CLASSES, std=0.75, mean=-3.5)
    return sd


def decoder_tensors(rand: RandomTensors, itos: list[str], d_model: int, layers: int, ffn: int) -> OrderedDict:
    vocab_size = len(itos)
    stopwords = set(read_stopwords())
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["model.task_id_to_token_id"] = torch.tensor([itos.index(f"<bos_{t}>") for t in TASKS], dtype=torch.int64)
    # Repetition ban for content words: True for every token except stopwords (special tokens included).
    sd["model.forbid_rep_mask"] = torch.tensor([token not in stopwords for token in itos], dtype=torch.bool)
    sd["model.projection.2.weight"] = rand.weight(d_model, ENCODER_DIMS[-1])
    sd["model.projection.2.bias"] = rand.bias(d_model)
    for layer in range(layers):
        p = f"model.decoder.layers.{layer}."
        sd[p + "self_attn.in_proj_weight"] = rand.weight(3 * d_model, d_model)
        sd[p + "self_attn.in_proj_bias"] = rand.bias(3 * d_model)
        sd[p + "self_attn.out_proj.weight"] = rand.weight(d_model, d_model)
        sd[p + "self_attn.out_proj.bias"] = rand.bias(d_model)
        sd[p + "multihead_attn.in_proj_weight"] = rand.weight(3 * d_model, d_model, gain=GAIN_CROSS_ATTN_IN)
        sd[p + "multihead_attn.in_proj_bias"] = rand.bias(3 * d_model)
        sd[p + "multihead_attn.out_proj.weight"] = rand.weight(d_model, d_model, gain=GAIN_CROSS_ATTN_OUT)
        sd[p + "multihead_attn.out_proj.bias"] = rand.bias(d_model)
        sd[p + "linear1.weight"] = rand.weight(ffn, d_model)
        sd[p + "linear1.bias"] = rand.bias(ffn)
        sd[p + "linear2.weight"] = rand.weight(d_model, ffn)
        sd[p + "linear2.bias"] = rand.bias(d_model)
        for norm in ("norm1", "norm2", "norm3"):
            sd[p + f"{norm}.weight"] = rand.norm_weight(d_model)
            sd[p + f"{norm}.bias"] = rand.bias(d_model)
    # The decoder multiplies embeddings by sqrt(d_model): keep them small.
    sd["model.decoder.emb_layer.weight"] = rand.normal(vocab_size, d_model, std=1.0 / math.sqrt(d_model))
    sd["model.decoder.pos_encoding.pos_embedding"] = sinusoid_positions(d_model)
    sd["model.decoder.classifier.weight"] = rand.weight(vocab_size, d_model, gain=2.0)
    classifier_bias = rand.normal(vocab_size, std=0.5)
    classifier_bias[EOS_ID] = EOS_BIAS
    sd["model.decoder.classifier.bias"] = classifier_bias
    return sd


def make_checkpoint(out_dir: Path, seed: int, depths: list[int], layers: int, ffn: int, vocab_size: int,
                    d_model: int = 256, nhead: int = 8) -> None:
    words = build_words(vocab_size)
    state = tokenizer_state(words)
    itos = [state["tokenizer"]["itos"][i] for i in range(len(state["tokenizer"]["itos"]))]
    rand = RandomTensors(seed)
    sd = encoder_tensors(rand, depths)
    sd.update(decoder_tensors(rand, itos, d_model, layers, ffn))
    extra = pickle.dumps({"model.tokenizers.0._extra_state": state}, protocol=4)
    sd["_extra_state_"] = torch.frombuffer(bytearray(extra), dtype=torch.uint8).clone()
    for name, tensor in sd.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AssertionError(f"non-finite values in {name}")

    out_dir.mkdir(parents=True, exist_ok=True)
    config = config_dict(d_model, nhead, layers, ffn)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(sd, out_dir / "pytorch_model.bin")


def parse_depths(text: str) -> list[int]:
    depths = [int(d) for d in text.split(",")]
    if len(depths) != 4 or any(d < 1 for d in depths):
        raise argparse.ArgumentTypeError("expected four positive stage depths, e.g. 1,1,1,1 or 3,3,9,3")
    return depths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="directory to write config.json and pytorch_model.bin into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depths", type=parse_depths, default=[1, 1, 1, 1],
                        help="ConvNeXt stage depths (official model: 3,3,9,3)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (official model: 6)")
    parser.add_argument("--ffn", type=int, default=512, help="decoder feed-forward size (official model: 2048)")
    parser.add_argument("--vocab-size", type=int, default=300, help="number of words besides special/task tokens")
    args = parser.parse_args()
    make_checkpoint(args.out_dir, args.seed, args.depths, args.layers, args.ffn, args.vocab_size)
    print(f"wrote {args.out_dir}/config.json and {args.out_dir}/pytorch_model.bin")


if __name__ == "__main__":
    main()
