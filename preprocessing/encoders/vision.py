"""Vision towers: CLIP, SigLIP, SigLIP2 and DINOv2, any width; the last hidden state or a chosen layer's tokens
(CLS included where present)."""

import numpy as np
import torch
from PIL import Image
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    Dinov2Model,
    Siglip2ImageProcessorPil,
    Siglip2VisionModel,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)

from .base import FrozenEncoder, require_local_dir

PREPROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINOv2's normalisation


def check_rgb(image, sample_id: str):
    """An RGB PIL image or an H x W x 3 uint8 array; anything else is refused with the sample named."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"sample {sample_id}: expected an RGB image, got PIL mode {image.mode!r}")
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"sample {sample_id}: expected an RGB uint8 array H x W x 3, "
                             f"got {image.dtype} {image.shape}")
        return image
    raise ValueError(f"sample {sample_id}: expected a PIL image or a numpy array, got {type(image).__name__}")


class VisionEncoder(FrozenEncoder):
    model_class = None
    processor_class = None

    def __init__(self, model_dir, device="cpu", dtype=torch.float32, image_size: int | None = None,
                 layer: int | None = None):
        """`image_size` overrides the processor's square input size (ViTs interpolate their position grid);
        `layer` indexes the hidden states (0: the embeddings, -1: the last block's output before the final norm;
        None: the model's last_hidden_state, after the final norm where it has one)."""
        path = require_local_dir(model_dir)
        super().__init__(path, self.model_class.from_pretrained(path, local_files_only=True), device, dtype)
        if (path / PREPROCESSOR_FILE).is_file():
            self.processor = self.processor_class.from_pretrained(path, local_files_only=True)
        else:
            self.processor = self.default_processor(self.model.config)
        if image_size:
            self.processor.size = {"height": image_size, "width": image_size}
            self.processor.do_center_crop = False
        layers = self.model.config.num_hidden_layers
        if layer is not None and not -(layers + 1) <= layer <= layers:
            raise ValueError(f"{path}: layer {layer} is not one of the model's hidden states (-{layers + 1}..{layers})")
        self.layer = layer

    def hidden(self, inputs) -> torch.Tensor:
        """[B, L, D]: the chosen layer's tokens."""
        if self.layer is None:
            return self.model(**inputs).last_hidden_state
        return self.model(**inputs, output_hidden_states=True).hidden_states[self.layer]

    def default_processor(self, config):
        size = config.image_size
        return self.processor_class(size={"height": size, "width": size}, do_center_crop=False)

    def model_inputs(self, images):
        # channels_last said, not guessed: an image 3 pixels high or less would otherwise be read as channels-first
        return self.processor(images=images, return_tensors="pt", input_data_format="channels_last")

    def encode_batch(self, items, ids) -> list[torch.Tensor]:
        images = [check_rgb(im, sid) for im, sid in zip(items, ids)]
        inputs = {k: v.to(self.device) for k, v in self.model_inputs(images).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return list(self.hidden(inputs).float().cpu().unbind(0))


class CLIPEncoder(VisionEncoder):
    kind, model_class, processor_class = "clip", CLIPVisionModel, CLIPImageProcessorPil

    def default_processor(self, config):
        size = config.image_size
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class SiglipEncoder(VisionEncoder):
    kind, model_class, processor_class = "siglip", SiglipVisionModel, SiglipImageProcessorPil


class Dinov2Encoder(VisionEncoder):
    kind, model_class, processor_class = "dinov2", Dinov2Model, BitImageProcessorPil

    def default_processor(self, config):
        size = config.image_size
        return BitImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False,
                                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


class Siglip2Encoder(VisionEncoder):
    """SigLIP2 (NaFlex): variable patch counts; each image keeps only its real patches."""

    kind, model_class, processor_class = "siglip2", Siglip2VisionModel, Siglip2ImageProcessorPil

    def default_processor(self, config):
        return Siglip2ImageProcessorPil(patch_size=config.patch_size, max_num_patches=config.num_patches)

    def encode_batch(self, items, ids) -> list[torch.Tensor]:
        images = [check_rgb(im, sid) for im, sid in zip(items, ids)]
        inputs = {k: v.to(self.device) for k, v in self.model_inputs(images).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        hidden = self.hidden(inputs).float().cpu()
        mask = inputs["pixel_attention_mask"].bool().cpu()
        return [h[m] for h, m in zip(hidden, mask)]


VISION_ENCODERS = {cls.kind: cls for cls in (CLIPEncoder, SiglipEncoder, Siglip2Encoder, Dinov2Encoder)}
