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

from .base import EncoderInputs, FrozenEncoder, check_model_type, require_local_dir, right_padded, ships_processor

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


class ImageInputs(EncoderInputs):
    """An image -> the processor's pixels at the model's fixed input size: {"pixel_values": [3, H, W]}."""

    def __init__(self, processor):
        self.processor = processor

    def processed(self, image, sample_id: str) -> dict[str, np.ndarray]:
        # channels_last said, not guessed: an image 3 pixels high or less would otherwise be read as channels-first
        inputs = self.processor(images=[check_rgb(image, sample_id)], return_tensors="np",
                                input_data_format="channels_last")
        return {name: value[0] for name, value in inputs.items()}

    def prepare(self, image, sample_id: str) -> dict[str, np.ndarray]:
        return {"pixel_values": self.processed(image, sample_id)["pixel_values"]}


class NaFlexInputs(ImageInputs):
    """SigLIP2's NaFlex: the image resized (aspect kept) to at most `max_num_patches` patches; only its real
    patches travel: {"patches": [n, 3 * patch^2], "spatial_shapes": [2]}."""

    def prepare(self, image, sample_id: str) -> dict[str, np.ndarray]:
        inputs = self.processed(image, sample_id)
        real = int(inputs["pixel_attention_mask"].sum())  # the processor pads after the real patches
        return {"patches": inputs["pixel_values"][:real], "spatial_shapes": inputs["spatial_shapes"]}


class VisionEncoder(FrozenEncoder):
    model_class = None
    processor_class = None
    inputs_class = ImageInputs
    forward_options = {}  # what the model's forward needs told to take `image_size` (DINOv2 interpolates always)

    def __init__(self, model_dir, device="cpu", dtype=torch.float32, image_size: int | None = None,
                 layer: int | None = None):
        """`image_size` overrides the processor's square input size (ViTs interpolate their position grid; for
        SigLIP2's NaFlex, the patch budget of that square: `Siglip2Encoder.build_inputs`);
        `layer` indexes the hidden states (0: the embeddings, -1: the last block's output before the final norm;
        None: the model's last_hidden_state, after the final norm where it has one)."""
        path = require_local_dir(model_dir)
        # a whole CLIP or SigLIP model (`clip` beside `clip_vision_model`) is fine: its vision tower is read
        expected = self.model_class.config_class.model_type
        check_model_type(path, self.kind, expected, expected.removesuffix("_vision_model"))
        model = self.model_class.from_pretrained(path, local_files_only=True)
        super().__init__(path, model, self.build_inputs(path, image_size, model.config), device, dtype)
        layers = self.model.config.num_hidden_layers
        if layer is not None and not -(layers + 1) <= layer <= layers:
            raise ValueError(f"{path}: layer {layer} is not one of the model's hidden states (-{layers + 1}..{layers})")
        self.layer = layer

    @classmethod
    def build_inputs(cls, model_dir, image_size: int | None = None, config=None) -> ImageInputs:
        """The processor the folder ships (its own defaults from the model's config when it ships none), with
        `image_size` as the square input size."""
        path = require_local_dir(model_dir)
        config = config or cls.model_class.config_class.from_pretrained(path, local_files_only=True)
        if ships_processor(path):
            processor = cls.processor_class.from_pretrained(path, local_files_only=True)
        else:
            processor = cls.default_processor(config)
        if image_size:
            if image_size % config.patch_size:  # the convolution's last partial patch is dropped, without a word
                raise ValueError(f"{model_dir}: {cls.kind}'s image_size {image_size} is not a multiple of its patch "
                                 f"size {config.patch_size}: the last {image_size % config.patch_size} pixels of "
                                 "each row and column would be left out")
            processor.size = {"height": image_size, "width": image_size}
            processor.do_resize, processor.do_center_crop = True, False
        return cls.inputs_class(processor)

    def hidden(self, inputs) -> torch.Tensor:
        """[B, L, D]: the chosen layer's tokens."""
        if self.layer is None:
            return self.model(**inputs, **self.forward_options).last_hidden_state
        return self.model(**inputs, **self.forward_options, output_hidden_states=True).hidden_states[self.layer]

    @classmethod
    def default_processor(cls, config):
        size = config.image_size
        return cls.processor_class(size={"height": size, "width": size}, do_center_crop=False)

    def forward(self, prepared) -> list[torch.Tensor]:
        # a batch of one pixel size at a time: a processor may size each image its own way (a shortest-edge resize
        # with no crop after it, or none), where a mixed batch failed to stack and stopped the encode job
        features = [None] * len(prepared)
        for size in dict.fromkeys(p["pixel_values"].shape for p in prepared):
            rows = [i for i, p in enumerate(prepared) if p["pixel_values"].shape == size]
            pixels = self.to_model([prepared[i]["pixel_values"] for i in rows])
            for i, hidden in zip(rows, self.hidden({"pixel_values": pixels}).float().cpu().unbind(0)):
                features[i] = hidden
        return features


# at the model's own input size the interpolation hands back its position embeddings unchanged
INTERPOLATE = {"interpolate_pos_encoding": True}


class CLIPEncoder(VisionEncoder):
    kind, model_class, processor_class, forward_options = "clip", CLIPVisionModel, CLIPImageProcessorPil, INTERPOLATE

    @classmethod
    def default_processor(cls, config):
        size = config.image_size
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class SiglipEncoder(VisionEncoder):
    kind, model_class, processor_class, forward_options = "siglip", SiglipVisionModel, SiglipImageProcessorPil, \
        INTERPOLATE


class Dinov2Encoder(VisionEncoder):
    kind, model_class, processor_class = "dinov2", Dinov2Model, BitImageProcessorPil

    @classmethod
    def default_processor(cls, config):
        size = config.image_size
        return BitImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False,
                                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


class Siglip2Encoder(VisionEncoder):
    """SigLIP2 (NaFlex): variable patch counts; each image keeps only its real patches."""

    kind, model_class, processor_class, inputs_class = "siglip2", Siglip2VisionModel, Siglip2ImageProcessorPil, \
        NaFlexInputs

    @classmethod
    def build_inputs(cls, model_dir, image_size: int | None = None, config=None) -> ImageInputs:
        """NaFlex fits each image, at its own aspect ratio, into a budget of patches and never reads `size`:
        `image_size` sets that budget to a square of its side's, (image_size / patch)² patches (384 at patch 16: 576,
        the paper's 577 tokens less a CLS SigLIP2 has not). Default: the preprocessor's own (256 for the base)."""
        inputs = super().build_inputs(model_dir, config=config)
        if image_size:
            patch = inputs.processor.patch_size
            if image_size % patch:
                raise ValueError(f"{model_dir}: siglip2's image_size {image_size} is not a multiple of its patch "
                                 f"size {patch}")
            inputs.processor.max_num_patches = (image_size // patch) ** 2
        return inputs

    @classmethod
    def default_processor(cls, config):
        return Siglip2ImageProcessorPil(patch_size=config.patch_size, max_num_patches=config.num_patches)

    def forward(self, prepared) -> list[torch.Tensor]:
        # padded to the processor's patch budget, as it pads a batch itself: the same attention, the same numbers
        patches, mask = right_padded([p["patches"] for p in prepared], self.inputs.processor.max_num_patches)
        shapes = np.stack([p["spatial_shapes"] for p in prepared])
        inputs = {"pixel_values": torch.from_numpy(patches).to(self.device, self.dtype),
                  "pixel_attention_mask": torch.from_numpy(mask.astype(np.int32)).to(self.device),
                  "spatial_shapes": torch.from_numpy(shapes).to(self.device)}
        hidden = self.hidden(inputs).float().cpu()
        return [h[: len(p["patches"])] for h, p in zip(hidden, prepared)]


VISION_ENCODERS = {cls.kind: cls for cls in (CLIPEncoder, SiglipEncoder, Siglip2Encoder, Dinov2Encoder)}
