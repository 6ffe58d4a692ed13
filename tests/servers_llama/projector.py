"""A tiny Gemma 3 vision projector (mmproj) for llama.cpp's server, written with `gguf`.

llama.cpp's multimodal library (mtmd) takes an image only with a projector beside the text
model. Gemma 3's is a SigLIP vision encoder followed by an average pool and a linear projection
into the text model's embedding (`clip.projector_type` "gemma3"). This one has the real
architecture at a toy size, one encoder block, and random weights: it turns any photo into four
embeddings of noise, so a model behind it sees no food, but the server takes the image, encodes it
and answers as it would with a real projector.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

IMAGE_SIZE = 32  # pixels a side: the server resizes every photo to this
PATCH_SIZE = 4  # 8 x 8 patches
POOL = 4  # Gemma 3's average pool over 4 x 4 patches: 2 x 2 = 4 image tokens
WIDTH = 64  # the encoder's embedding
HEADS = 4
FEED_FORWARD = 128
BLOCKS = 1


def write_gemma3_projector(path: Path, text_embedding: int, *, seed: int = 0) -> Path:
    """Write a Gemma 3 projector for a text model of `text_embedding` width to `path`."""
    random = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (random.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    def zeros(size: int) -> np.ndarray:
        return np.zeros(size, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), arch="clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name("tiny random gemma3 projector")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_image_size(IMAGE_SIZE)
    writer.add_vision_patch_size(PATCH_SIZE)
    writer.add_vision_embedding_length(WIDTH)
    writer.add_vision_feed_forward_length(FEED_FORWARD)
    writer.add_vision_projection_dim(text_embedding)
    writer.add_vision_block_count(BLOCKS)
    writer.add_vision_head_count(HEADS)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_use_gelu(True)
    writer.add_vision_projector_scale_factor(POOL)

    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    # numpy shapes are ggml's dimensions reversed: a linear layer is (outputs, inputs).
    writer.add_tensor("v.patch_embd.weight", weights(WIDTH, 3, PATCH_SIZE, PATCH_SIZE))
    writer.add_tensor("v.patch_embd.bias", zeros(WIDTH))
    writer.add_tensor("v.position_embd.weight", weights(patches, WIDTH))
    for block in range(BLOCKS):
        prefix = f"v.blk.{block}"
        for layer in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{prefix}.{layer}.weight", weights(WIDTH, WIDTH))
            writer.add_tensor(f"{prefix}.{layer}.bias", zeros(WIDTH))
        for norm in ("ln1", "ln2"):
            writer.add_tensor(f"{prefix}.{norm}.weight", ones(WIDTH))
            writer.add_tensor(f"{prefix}.{norm}.bias", zeros(WIDTH))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(FEED_FORWARD, WIDTH))
        writer.add_tensor(f"{prefix}.ffn_up.bias", zeros(FEED_FORWARD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(WIDTH, FEED_FORWARD))
        writer.add_tensor(f"{prefix}.ffn_down.bias", zeros(WIDTH))
    writer.add_tensor("v.post_ln.weight", ones(WIDTH))
    writer.add_tensor("v.post_ln.bias", zeros(WIDTH))
    writer.add_tensor("mm.soft_emb_norm.weight", ones(WIDTH))
    # Applied transposed: (encoder width, text width) maps each pooled patch into the text model.
    writer.add_tensor("mm.input_projection.weight", weights(WIDTH, text_embedding))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
