"""The Fracast-0 release (config.json + fp32 model.safetensors in the `fracast` wheel) -> our FracastNet dir.

Only the context encoder (`core.*`) is kept: the forecast head is not part of a feature extractor. The
release's options are checked against what FracastNet implements, so a different release fails loudly.
"""

import json
from pathlib import Path

from safetensors.torch import load_file

from ..fracast import FracastConfig, FracastNet, save_fracast
from .wheels import wheel_file

# release options FracastNet hard-codes (the shipped Fracast-0 values)
FIXED_OPTIONS = {"causal": True, "separable_conv": True, "share_stages": True, "scale_cond": "film",
                 "recency_encoding": True, "periodic_phase": True, "periodic_harmonics": 1}


def fracast_config(release: dict) -> FracastConfig:
    model = release["model"]
    unsupported = {k: model.get(k) for k, v in FIXED_OPTIONS.items() if model.get(k) != v}
    if unsupported or release.get("pyramid", {}).get("ratios") or model["level_widths"] != [model["W"]]:
        raise ValueError(f"Fracast release options not supported by FracastNet: {unsupported or 'pyramid levels'}")
    return FracastConfig(
        d_model=model["d_model"], context=model["W"], stages=model["n_stages"], dilation_base=model["dilation_base"],
        kernel=model["kernel_size"], ffn_mult=model["ffn_mult"], scale_features=model["scale_cond_dim"],
        periods=model["periodic_topk"], min_period=model["periodic_min_period"], period_alpha=model["periodic_alpha"],
    )


def export_fracast_release(release_dir, out_dir) -> Path:
    release_dir = Path(release_dir)
    model = FracastNet(fracast_config(json.loads((release_dir / "config.json").read_text())))
    state = load_file(release_dir / "model.safetensors")
    model.load_state_dict({k.removeprefix("core."): v for k, v in state.items() if k.startswith("core.")}, strict=True)
    return save_fracast(model, out_dir)


def export_fracast(out_dir) -> Path:
    """Fracast-0 (Apache-2.0) from the `fracast` wheel, fp32 weights."""
    return export_fracast_release(wheel_file("fracast", "weights/model.safetensors", "fracast").parent, out_dir)
