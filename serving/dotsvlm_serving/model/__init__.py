"""The dots.vlm1 model: config, preprocessing, chat template, vision tower, LLM wiring, checkpoints.

Kept empty on purpose: importing `dotsvlm_serving.model` must not import torch, so light callers
(config readers, the CLI) stay cheap. Import the submodules you need:

- `config`: `load_config`, `DotsVLMConfig`, `VisionConfig`, `PreprocessConfig` (no torch)
- `preprocess`: image decode / resize / normalise / patchify
- `prompt`: the dots-vlm chat template and tokenizer loading
- `vision`: `DotsVisionTower`
- `llm`: DeepSeek-V3 from transformers, image-embedding injection, greedy reference decode
- `checkpoint`: loading and saving Hugging Face-style sharded safetensors, FP8 dequantisation
- `tiny`: a tiny seeded checkpoint of the same architecture
"""
