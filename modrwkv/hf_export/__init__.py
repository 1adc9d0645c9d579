"""Exports of a trained ModRWKV for other tools (`modrwkv export`): `exporter.py` writes them; `remote_code/` holds
the `transformers` modelling, configuration and tokenizer files an export ships, copied as they are."""
