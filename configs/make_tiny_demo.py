"""Regenerate the tiny random-weight demo model in configs/tiny/ (run: python -m configs.make_tiny_demo).

Everything is real except the size and the weights: a Flux-architecture flow model and an autoencoder as
BFL-layout safetensors, and T5 / CLIP text encoders saved by `transformers` with tokenizers trained here,
on a small made-up corpus, with `sentencepiece` (T5) and `tokenizers` BPE (CLIP).
"""

import json
import random
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from modules.autoencoder import AutoEncoder, AutoEncoderParams
from modules.flux_model import Flux, FluxParams

OUT = Path(__file__).resolve().parent / "tiny"
TEXT_DIM = 32  # T5 d_model and CLIP hidden size of the tiny encoders
FLOW_PARAMS = dict(
    in_channels=64,
    vec_in_dim=TEXT_DIM,
    context_in_dim=TEXT_DIM,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[8, 12, 12],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
AE_PARAMS = dict(
    resolution=256,
    in_channels=3,
    ch=32,
    out_ch=3,
    ch_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)
WORDS = (
    "a an the of in on with and at by from under over near photo painting portrait drawing render close-up "
    "cat dog fox owl horse bird fish dragon robot astronaut woman man child city forest mountain river lake "
    "ocean beach desert castle street garden sky night sunset sunrise morning rain snow fog storm light shadow "
    "red blue green yellow orange purple black white golden silver bright dark soft sharp detailed cinematic "
    "old new tiny huge ancient futuristic neon wooden glass stone metal paper sitting running flying standing "
    "reading sleeping wearing holding hat coat book flower tree house window door lamp moon sun star cloud "
    "highly realistic style oil watercolor 35mm lens bokeh depth field 4k 8k art trending masterpiece"
).split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(4, 16))
        lines.append(" ".join(words) + rng.choice(["", ".", ",", "!", " (1.2)", ": 3"]))
    return lines


def flow_state_dict(params: dict = FLOW_PARAMS, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    torch.manual_seed(seed)
    model = Flux(FluxParams(**params))
    with torch.no_grad():
        for name, p in model.named_parameters():  # random everywhere, but QK-norm scales near 1 so that
            if name.endswith(".scale"):  # attention logits (and so RoPE positions) matter
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.05 if p.ndim > 1 else 0.02)
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def ae_state_dict(params: dict = AE_PARAMS, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in AutoEncoder(AutoEncoderParams(**params)).state_dict().items()}


def make_t5(out_dir: Path, text: list[str]) -> None:

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text("\n".join(text))
        spm.SentencePieceTrainer.train(
            input=str(Path(tmp) / "corpus.txt"),
            model_prefix=str(out_dir / "spiece"),
            vocab_size=400,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spiece.model"))
    # the same pipeline T5's own fast tokenizer uses: Unigram pieces with Metaspace and a closing </s>
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", sp.eos_id())])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )
    config = T5Config(
        vocab_size=sp.get_piece_size(),
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=sp.pad_id(),
        eos_token_id=sp.eos_id(),
    )
    torch.manual_seed(1)
    T5EncoderModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def make_clip(out_dir: Path, text: list[str]) -> None:

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # CLIP's split: specials, contractions, letter runs, single digits, other symbol runs
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[bos, eos],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos, model_max_length=77
    )
    config = CLIPTextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=tok.token_to_id(bos),
        eos_token_id=tok.token_to_id(eos),
        pad_token_id=tok.token_to_id(eos),
    )
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def tiny_config(out: Path = OUT) -> dict:
    return {
        "version": "flux-dev",
        "params": FLOW_PARAMS,
        "ae_params": AE_PARAMS,
        "ckpt_path": str(out / "flux-tiny.safetensors"),
        "ae_path": str(out / "ae-tiny.safetensors"),
        "text_enc_path": str(out / "t5"),
        "clip_path": str(out / "clip"),
        "text_enc_max_length": 64,
        "flux_device": "cpu",
        "text_enc_device": "cpu",
        "ae_device": "cpu",
        "flow_dtype": "bfloat16",
        "ae_dtype": "float32",
        "text_enc_dtype": "bfloat16",
        "text_enc_quantization_dtype": None,
        "clip_quantization_dtype": None,
        "flow_quantization_dtype": "qfloat8",
        "f8_calibration_size": 128,  # static fp8 scales calibrated at the tiny model's own scale
    }


def make_all(out: Path = OUT) -> dict:
    """Write every asset under `out` and return the config that points at them (absolute paths)."""
    out.mkdir(parents=True, exist_ok=True)
    text = corpus()
    save_file(flow_state_dict(), out / "flux-tiny.safetensors")
    save_file(ae_state_dict(), out / "ae-tiny.safetensors")
    make_t5(out / "t5", text)
    make_clip(out / "clip", text)
    return tiny_config(out)


if __name__ == "__main__":
    config = make_all()
    # the committed config uses paths relative to configs/, so the repo works wherever it is cloned
    rel = {k: (str(Path(v).relative_to(OUT.parent)) if k.endswith("_path") else v) for k, v in config.items()}
    (OUT.parent / "config-tiny-cpu.json").write_text(json.dumps(rel, indent=4) + "\n")
    print(f"wrote {OUT} and configs/config-tiny-cpu.json")
