"""Full-size pretrained folders with random weights, for bench/families_speed.py on a GPU: a
Stable-Diffusion-1.5-shaped pipeline and a GPT-2-small-shaped causal LM, built from the
published configurations (no hub here) and saved as safetensors, so the benchmark loads them
with the workers' own loading code. Speed does not depend on the weights' values.

The tokenizers are made locally: the CLIP one is the byte-level vocabulary of
tests/support/pretrained_models.py (its ids are a subset of the text encoder's 49,408), the LM's a
byte-level BPE trained on the `pydocs` corpus.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _init_device() -> torch.device:
    # Building an 860M-parameter UNet on the CPU takes minutes; on the GPU seconds.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_sd15(path: Path) -> Path:
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.support.pretrained_models import clip_tokenizer

    torch.manual_seed(0)
    with _init_device():
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=(
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=512,
                eos_token_id=513,
                pad_token_id=513,
            )
        )
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16 if torch.cuda.is_available() else torch.float32)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_gpt2_small(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from workers.datasets import pydocs_corpus

    text = pydocs_corpus().decode("utf-8", errors="replace")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=50257,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(text.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        model_max_length=1024,
    )
    # pydocs is too small for 50,257 merges: pad with special tokens (never in a text), so
    # the embedding and the output layer have GPT-2's exact size.
    missing = 50257 - len(tokenizer)
    if missing > 0:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [f"<|pad{i}|>" for i in range(missing)]}
        )
    # GPT-2 small: 12 layers, 12 heads, 768 wide, 1024 positions, 50,257 tokens.
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with _init_device():
        model = GPT2LMHeadModel(config)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
