"""Tiny pretrained models on disk, built from config with random weights, for the `diffusers`
and `transformers` families: a Stable-Diffusion-1.x-shaped pipeline, an XL-shaped one (two
text encoders), and a GPT-2-shaped causal LM with a chat template.

There is no hub here, so the tokenizers are made locally: the CLIP tokenizer from a vocabulary
of the 256 byte symbols (alone and word-final) with no merges, the LM's tokenizer a byte-level
BPE trained with `tokenizers` on a few sentences. Every weight is saved as safetensors, the way
a downloaded model folder looks. Each builder is seeded, so a folder is the same every time.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A painting of a red fox in the snow, highly detailed.",
    "genq runs generative models: images, text, training and fine-tuning.",
    "def hello(name):\n    return 'hello ' + name\n",
    "Stable diffusion turns a prompt into an image in a few steps.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def clip_tokenizer():  # type: ignore[no-untyped-def]
    """A CLIP tokenizer over the 256 byte symbols (alone and word-final), without merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def clip_text_encoder(seed: int, projection: bool = False):  # type: ignore[no-untyped-def]
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=16,
        projection_dim=16,
        vocab_size=514,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _vae(seed: int):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _scheduler():  # type: ignore[no-untyped-def]
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )


def build_tiny_sd(path: Path) -> Path:
    """A Stable Diffusion 1.x layout (model_index.json; unet, vae, text_encoder, tokenizer,
    scheduler folders) with a few thousand random weights, 32x32 images by default."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(1),
        text_encoder=clip_text_encoder(2),
        tokenizer=clip_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_sdxl(path: Path) -> Path:
    """A Stable Diffusion XL layout: two text encoders (the second with a projection) and
    two tokenizers, a UNet conditioned on pooled text and image sizes."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text + 6 size numbers
        cross_attention_dim=32,  # the two encoders' hidden states side by side
        norm_num_groups=4,
    )
    from diffusers import EulerDiscreteScheduler

    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(1),
        text_encoder=clip_text_encoder(2),
        text_encoder_2=clip_text_encoder(3, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def build_tiny_lm(
    path: Path, chat_template: bool = True, context: int = 128, init: float = 0.3
) -> Path:
    """A GPT-2-shaped causal LM (2 layers, 32 wide, `context` positions, weights drawn with
    standard deviation `init`) with a byte-level BPE tokenizer trained on CORPUS, saved with
    safetensors; with `chat_template` its tokenizer can format chats."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=context,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    config = GPT2Config(
        vocab_size=bpe.get_vocab_size(),
        n_positions=context,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        # By default wider than GPT-2's 0.02: the tied output embedding must be able to make
        # peaked logits, or adapters on the blocks (LoRA) could not lower the loss much.
        initializer_range=init,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow dot"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 40)]


def captioned_folder(root: Path) -> Path:
    """A captioned_images data set as the upload leaves it: images and captions.jsonl."""
    from PIL import Image

    root.mkdir(parents=True)
    rows = []
    for i, (text, colour) in enumerate(zip(CAPTIONS, COLOURS, strict=True)):
        image = Image.new("RGB", (40, 40), colour)
        image.paste((255, 255, 255), (10 + i, 10, 25 + i, 30))
        image.save(root / f"pic-{i}.png")
        rows.append(json.dumps({"file": f"pic-{i}.png", "text": text}))
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return root
