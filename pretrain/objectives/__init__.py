"""Pretraining objectives: token masking, v2 MLM and v3 RTD."""
