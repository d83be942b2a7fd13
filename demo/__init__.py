"""NADA Studio's Gradio UI: one module per tab; all model work goes through nada_core."""
