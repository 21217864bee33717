"""Exports for deployment: Hugging Face (`export.hf`), GGUF (`export.gguf`), ONNX with explicit past
key/values and optional int8 dynamic quantisation (`export.onnx`).

Each is a stage whose input is a `checkpoint` artifact and whose output is an artifact like any other:
hashed, signed when the store has a signing key, encrypted at rest when the recipe says so, traced to
the checkpoint it came from. Every export checks itself before it is published (tensors read back,
logits compared against our own model) and refuses to publish one that does not reproduce the model.
"""
