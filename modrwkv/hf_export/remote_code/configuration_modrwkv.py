"""ModRWKV's configuration for `transformers` (trust_remote_code), written by `modrwkv export --to hf`.

The fields are ModRWKV's own config as its `modrwkv_config.json` holds it, so nothing is renamed on the way:

    backbone          RWKV-7 sizes: vocab_size, n_layer, n_embd, head_size, dim_ffn and the LoRA ranks
                      decay_lora (D_w), a_lora (D_a), v_lora (D_v), gate_lora (D_g)
    projectors        per modality (image, audio, series): encoder_dim, model_dim, kernel and stride of the
                      Conv1D compression (0, 0: none), adapter_scale (m), normalize (none, standardize, whiten)
    forecast_horizon  > 0: a linear head forecasts this many future series values from the last hidden state
    forecast_lookback > 0: the forecast adds a linear map of the last forecast_lookback lookback values
    series_encoder    the WaveNet run on raw series items (in_channels, hidden, layers, kernel), or None
    placeholder_ids   per modality, the token id whose positions receive that modality's adapted features
    encoders          per modality, the frozen encoder the features must come from (kind, layer, weights hash)
    turn_end_ids      the token ids a reply's turn end ("\n\n") lies in: "within" one, or across one that "ends" with
                      "\n" and the next that "starts" with it; generate() stops there (TurnEnd)
"""

from transformers import PretrainedConfig


class ModRWKVConfig(PretrainedConfig):
    model_type = "modrwkv"

    def __init__(self, backbone=None, projectors=None, forecast_horizon=0, forecast_lookback=0, series_encoder=None,
                 placeholder_ids=None, encoders=None, turn_end_ids=None, tie_word_embeddings=False, **kwargs):
        self.backbone = dict(backbone or {})
        self.projectors = dict(projectors or {})
        self.forecast_horizon = forecast_horizon
        self.forecast_lookback = forecast_lookback
        self.series_encoder = series_encoder
        self.placeholder_ids = dict(placeholder_ids or {})
        self.encoders = dict(encoders or {})
        self.turn_end_ids = dict(turn_end_ids or {})
        # the names transformers' generic code reads (generation, resizing)
        self.vocab_size = self.backbone.get("vocab_size")
        self.hidden_size = self.backbone.get("n_embd")
        self.num_hidden_layers = self.backbone.get("n_layer")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
