"""Adapters: where a model keeps its layers (architectures), the PEFT methods one budget can buy (one record each),
the exact planner that counts them from a model config alone, and the model built from base + adapter + head."""
